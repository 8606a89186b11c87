"""LogMelSpectrogram and mel_filterbank against librosa (the independent reference).

Reference: ``librosa.feature.melspectrogram(y=y[skip:], sr, n_fft, hop_length,
center=False, power=2.0, n_mels, fmin, fmax)`` (periodic Hann window, Slaney mel
scale and norm) followed by ``librosa.power_to_db(ref=1.0, amin=1e-10,
top_db=None)``, computed in float64. ``skip = (N - n_fft) % hop`` because our
frames are anchored at the end of the window. Ours is time-major, so librosa's
(n_mels, frames) is transposed.

Tolerances (measured over all signals and CONFIGS below with the two-stage STFT,
which runs in float32; the earlier radix-4 implementation measured within the same bounds):

* magnitude, every bin: |sqrt(mel_ours) - sqrt(mel_ref)| <= 3e-6 x sqrt(max mel power
  of that frame). This is float32 round-off of the DFT sums relative to the frame's
  loudest band (measured <= 6.5e-7). A wrong bin order, window or filter is off by
  O(1e-3..1) here.
* dB, bins above -80 dB and within 40 dB of the frame's loudest band:
  |dB_ours - dB_ref| <= 1e-3 dB (measured <= 2.7e-5 dB).
* dB, every bin of the signals whose spectrum has a noise floor (sine + noise, white
  noise at -60 dBFS, silence): <= 1e-3 dB above -80 dB (measured <= 2.1e-4 dB) and
  <= 0.05 dB elsewhere (measured <= 7.4e-6 dB); silence is exactly -100 dB in both.
* A pure chirp (and the square wave) are not held to an absolute-dB bound far below
  their peak: bands 80-140 dB under the frame's peak are at the float32 noise floor
  (measured up to 0.028 dB on chirp bands still above -80 dB absolute and 0.29 dB at
  -100 dB; librosa's own float32 STFT is off by 1.3e-3 dB above -80 dB on the same
  chirp), so the magnitude bound is what applies to them.
"""

from __future__ import annotations

import dataclasses

import librosa
import numpy as np
import pytest
import torch

from mm_fusion_ros.config import AudioConfig
from mm_fusion_ros.model.preprocess import LogMelSpectrogram, mel_filterbank, mel_groups, stft_radix

CONFIGS = {
    "default": AudioConfig(),
    # Other radices (16, 8, 20, 4, 8), an odd block length (120 / 8) and small shapes exercise the
    # two-stage bin order.
    "22k_1024": AudioConfig(sample_rate=22050, window_s=1.0, n_fft=1024, hop=256, n_mels=40,
                            f_min=50.0, f_max=7000.0),
    "8k_256": AudioConfig(sample_rate=8000, window_s=0.3, n_fft=256, hop=64, n_mels=32, f_min=0.0, f_max=4000.0),
    "n_fft_520": AudioConfig(n_fft=520, hop=160),  # K = 130, K/2 = 65 (odd)
    "n_fft_24": AudioConfig(sample_rate=8000, window_s=0.05, n_fft=24, hop=8, n_mels=4, f_min=300.0, f_max=4000.0),
    "odd_block": AudioConfig(sample_rate=8000, window_s=0.1, n_fft=120, hop=40, n_mels=16, f_min=0.0, f_max=4000.0),
}

MAG_RTOL = 3e-6
DB_TOL_HIGH = 1e-3
DB_TOL_LOW = 0.05


def reference_db(y: np.ndarray, cfg: AudioConfig) -> np.ndarray:
    """librosa log-mel of the window, (frames, n_mels), float64."""
    skip = (len(y) - cfg.n_fft) % cfg.hop
    mel = librosa.feature.melspectrogram(y=np.asarray(y[skip:], dtype=np.float64), sr=cfg.sample_rate,
                                         n_fft=cfg.n_fft, hop_length=cfg.hop, center=False, power=2.0,
                                         n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max)
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T


def signals(cfg: AudioConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = cfg.window_samples
    t = np.arange(n) / cfg.sample_rate
    f0 = min(440.0, cfg.sample_rate / 7)
    return {
        "sine+noise": 0.5 * np.sin(2 * np.pi * f0 * t + 0.3) + 0.01 * rng.standard_normal(n),
        "chirp": 0.8 * np.sin(2 * np.pi * (50.0 * t + 0.5 * (cfg.f_max - 50.0) * t ** 2 / t[-1])),
        "low_noise": 1e-3 * rng.standard_normal(n),
        "silence": np.zeros(n),
        "square": np.sign(np.sin(2 * np.pi * (f0 * 2.3) * t)),  # full scale, rich in harmonics
    }


def ours_db(cfg: AudioConfig, batch: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = LogMelSpectrogram(cfg)(torch.tensor(batch, dtype=torch.float32))
    return out.numpy().astype(np.float64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logmel_matches_librosa(name):
    cfg = CONFIGS[name]
    sigs = signals(cfg)
    # All signals in one batch: rows must not interact.
    batch = np.stack(list(sigs.values()))
    out = ours_db(cfg, batch)
    assert out.shape == (len(sigs), cfg.n_frames, cfg.n_mels)
    for i, (sig_name, y) in enumerate(sigs.items()):
        # librosa receives exactly what the model sees: the float32-rounded samples.
        ref = reference_db(y.astype(np.float32), cfg)
        got = out[i]
        assert got.shape == ref.shape, sig_name
        where = f"{name}/{sig_name}"

        frame_peak = 10.0 ** (ref.max(axis=1, keepdims=True) / 20.0)
        mag_err = np.abs(10.0 ** (got / 20.0) - 10.0 ** (ref / 20.0))
        assert np.all(mag_err <= MAG_RTOL * frame_peak), (
            f"{where}: magnitude error {np.max(mag_err / frame_peak):.3g} of the frame peak")

        err = np.abs(got - ref)
        near_peak = (ref > -80.0) & (ref >= ref.max(axis=1, keepdims=True) - 40.0)
        assert near_peak.any() or sig_name == "silence"
        assert np.all(err[near_peak] <= DB_TOL_HIGH), f"{where}: {err[near_peak].max():.3g} dB near the peak"

        if sig_name in ("sine+noise", "low_noise", "silence"):
            high = ref > -80.0
            assert np.all(err[high] <= DB_TOL_HIGH), f"{where}: {err[high].max():.3g} dB above -80 dB"
            assert np.all(err[~high] <= DB_TOL_LOW), f"{where}: {err[~high].max():.3g} dB below -80 dB"


def test_silence_is_minus_100_db_in_both():
    cfg = CONFIGS["default"]
    zeros = np.zeros((2, cfg.window_samples))
    assert np.all(ours_db(cfg, zeros) == -100.0)
    assert np.all(reference_db(zeros[0], cfg) == -100.0)


def test_sine_peaks_in_the_right_band():
    """Independent of librosa: a pure tone's energy lands in the mel band whose centre is nearest."""
    cfg = CONFIGS["default"]
    t = np.arange(cfg.window_samples) / cfg.sample_rate
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.f_min, fmax=cfg.f_max)[1:-1]
    for band in (5, 20, 40, 60):
        tone = 0.5 * np.sin(2 * np.pi * centres[band] * t)
        db = ours_db(cfg, tone[None])[0]
        assert np.all(db.argmax(axis=1) == band)


def test_frames_are_anchored_at_the_newest_sample():
    """Only the newest n_fft + (frames - 1) * hop samples matter; the oldest skip ones are ignored,
    and a click in the last sample shows up in the last frame only."""
    cfg = CONFIGS["default"]
    skip = (cfg.window_samples - cfg.n_fft) % cfg.hop
    assert skip > 0
    rng = np.random.default_rng(3)
    y = 0.1 * rng.standard_normal(cfg.window_samples)
    y2 = y.copy()
    y2[:skip] = 1.0
    np.testing.assert_array_equal(ours_db(cfg, y[None]), ours_db(cfg, y2[None]))
    quiet = 1e-4 * rng.standard_normal(cfg.window_samples)
    click = quiet.copy()
    click[-cfg.n_fft // 2] = 1.0  # mid-window of the last frame, where the Hann window is 1
    a, b = ours_db(cfg, quiet[None])[0], ours_db(cfg, click[None])[0]
    changed = np.abs(a - b).max(axis=1) > 1.0
    assert changed[-1] and changed.sum() <= -(-cfg.n_fft // cfg.hop)  # frames that overlap it


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mel_filterbank_matches_librosa(name):
    cfg = CONFIGS[name]
    ours = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min,
                              fmax=cfg.f_max, htk=False, norm="slaney", dtype=np.float64)
    assert ours.shape == ref.shape == (cfg.n_mels, cfg.n_fft // 2 + 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    # Also against librosa's default float32 output, the way it is usually called.
    ref32 = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min,
                                fmax=cfg.f_max)
    np.testing.assert_allclose(ours, ref32, rtol=0, atol=1e-6)


@pytest.mark.parametrize("window_s, skip", [(0.503, 16), (0.672, 0)])
def test_other_window_lengths_skip_the_oldest_samples(window_s, skip):
    cfg = dataclasses.replace(CONFIGS["default"], window_s=window_s)
    assert (cfg.window_samples - cfg.n_fft) % cfg.hop == skip
    sig = signals(cfg)["sine+noise"]
    out = ours_db(cfg, sig[None])[0]
    ref = reference_db(sig.astype(np.float32), cfg)
    assert out.shape == ref.shape == (cfg.n_frames, cfg.n_mels)
    assert np.abs(out - ref)[ref > -80].max() <= DB_TOL_HIGH


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mel_groups_drop_only_zero_weights(name):
    """The per-group mel products together are the full (n_mels x bins) product: every band in one
    group, in order, and every nonzero weight inside its group's rows."""
    cfg = CONFIGS[name]
    fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
    mel = fb
    groups = mel_groups(mel)
    assert groups[0][0] == 0 and groups[-1][1] == cfg.n_mels
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for first, end, lo, hi in groups:
        outside = np.ones(mel.shape[1], dtype=bool)
        outside[lo:hi] = False
        assert not np.any(mel[first:end][:, outside])
    if name == "default":
        assert len(groups) > 1
        assert sum((e - f) * (h - lo) for f, e, lo, h in groups) < 0.5 * mel.size


def test_stft_radix_divides_n_fft_and_hop():
    assert stft_radix(512, 160) == 16
    for n_fft, hop in [(1024, 256), (256, 64), (520, 160), (24, 8), (120, 40)]:
        r = stft_radix(n_fft, hop)
        assert n_fft % r == 0 and hop % r == 0 and r > 1
