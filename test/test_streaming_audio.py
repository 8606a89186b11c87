"""Streaming log-mel: the step computes only the newest frames, and that changes nothing.

The cache of frames is an optimisation, so every test here compares against
the whole window's log-mel computed from scratch, and counts the full
recomputations (resyncs) to prove that the cache was in fact used.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import MODALITIES
from mm_fusion_ros.engine.stream import FusionStream
from mm_fusion_ros.engine.torch_engine import TorchEngine
from mm_fusion_ros.model import build_model
from mm_fusion_ros.model.preprocess import AudioEncoder, LogMelFrames
from mm_fusion_ros.synthetic import SyntheticSensors

AUDIO = MODALITIES.index("audio")


def signal(n: int, seed: int = 0) -> np.ndarray:
    """A long microphone-like recording: tones that come and go, plus noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000.0
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (np.sin(2 * np.pi * 0.7 * t) > 0)
    return (tone + 0.2 * np.sin(2 * np.pi * 97 * t) + 0.02 * rng.standard_normal(n)).astype(np.float32)


def test_newest_frames_plus_moved_cache_equal_the_whole_windows_log_mel(default_config):
    cfg = default_config.model.audio
    n, hop, k = cfg.window_samples, cfg.hop, cfg.stream_frames
    whole = LogMelFrames(cfg)
    encoder = AudioEncoder(cfg, 64).eval()
    x = torch.from_numpy(signal(6 * n))
    end = 2 * n
    with torch.inference_mode():
        frames = whole(x[None, end - n:end])
        for shift in [0, 1, 2, k, 3, k - 1, 1, 0, 5]:
            end += shift * hop
            cached = torch.cat([frames[:, :, shift:], torch.full_like(frames[:, :, :shift], 1e3)], dim=2)
            cached[:, :, -k:] = 1e3   # the slots the step recomputes: poison them to prove they are
            token, frames = encoder(x[None, end - n:end], cached)
            reference = whole(x[None, end - n:end])
            torch.testing.assert_close(frames, reference, rtol=0, atol=1e-5)
            ref_token, _ = encoder(x[None, end - n:end], reference)
            torch.testing.assert_close(token, ref_token, rtol=0, atol=1e-6)


def test_stale_cached_frames_do_change_the_token(default_config):
    """Control for the test above: the cached frames are really read by the step."""
    cfg = default_config.model.audio
    encoder = AudioEncoder(cfg, 64).eval()
    x = torch.from_numpy(signal(cfg.window_samples))[None]
    with torch.inference_mode():
        good = LogMelFrames(cfg)(x)
        token, _ = encoder(x, good)
        other, _ = encoder(x, good * 0.5)
    assert (token - other).abs().max() > 1e-4


def _streams(default_config):
    model = build_model(default_config.model, seed=2)
    return (FusionStream(TorchEngine(model), default_config.model),   # streaming, given window ends
            FusionStream(TorchEngine(model), default_config.model))   # reference: no ends, whole window


def test_fusion_stream_with_window_ends_matches_whole_window_every_tick(default_config):
    """Windows moving by 0..K hops use the cache; moves by more, by part of a hop, after
    missing audio, after a rewrite or a reset recompute the whole window. Both give the
    same actions and state as recomputing every tick."""
    cfg = default_config.model
    n, hop, k = cfg.audio.window_samples, cfg.audio.hop, cfg.audio.stream_frames
    sensors = SyntheticSensors(cfg, seed=4)
    audio = signal(40 * n, seed=1)
    streaming, reference = _streams(default_config)
    rng = np.random.default_rng(7)
    end, expected_resyncs, worst = n + 37, 0, 0.0
    for i in range(260):
        moved, rewritten, mask = int(rng.integers(0, 3)) * hop, None, np.ones(len(MODALITIES), np.float32)
        fresh = i == 0
        if i % 40 == 20:
            moved = (k + 2) * hop       # the audio stalled, then a burst: more than K hops
            fresh = True
        elif i % 40 == 25:
            moved = 3 * hop + 17        # off the hop grid (a restarted driver)
            fresh = True
        elif i % 40 == 30:
            rewritten = end + moved - (k + 3) * hop   # older than the recomputed span
            fresh = True
        elif i % 40 == 31:
            rewritten = end + moved - (k - 2) * hop   # inside the recomputed span: the cache holds
        end += moved
        if 60 <= i < 70:
            mask[AUDIO] = 0.0           # audio masked for a while; the first tick back resyncs
        if i == 70 or i == 150:
            fresh = True
        if i == 150:
            streaming.reset()
            reference.reset()
        if mask[AUDIO] == 0.0:
            fresh = False
        expected_resyncs += fresh
        window = audio[end - n:end]
        t = 1.0 + 0.01 * i
        args = (sensors.camera(t), window, sensors.imu(t), sensors.lidar(t), sensors.joint_vector(t), mask, 0.01)
        a = streaming.step(*args, audio_end=end - 1, audio_rewritten_from=rewritten)
        b = reference.step(*args)
        worst = max(worst, float(np.abs(a.action - b.action).max()),
                    float(np.abs(streaming.state - reference.state).max()))
        if mask[AUDIO]:
            np.testing.assert_allclose(streaming.audio_frames, reference.audio_frames, rtol=0, atol=1e-5)
    assert worst < 1e-5
    assert streaming.counters["audio_frame_resyncs"] == expected_resyncs
    assert reference.counters["audio_frame_resyncs"] == 250   # every tick with audio present


def test_nonfinite_audio_never_enters_the_cache(default_config):
    cfg = default_config.model
    n, hop = cfg.audio.window_samples, cfg.audio.hop
    sensors = SyntheticSensors(cfg, seed=5)
    audio = signal(3 * n, seed=2)
    streaming, reference = _streams(default_config)
    mask = np.ones(len(MODALITIES), np.float32)
    for i in range(30):
        end = n + i * hop
        window = audio[end - n:end].copy()
        if i == 10:
            window[5] = np.nan
        t = 1.0 + 0.01 * i
        args = (sensors.camera(t), window, sensors.imu(t), sensors.lidar(t), sensors.joint_vector(t), mask, 0.01)
        a = streaming.step(*args, audio_end=end - 1)
        b = reference.step(*args)
        assert np.isfinite(streaming.audio_frames).all()
        np.testing.assert_allclose(a.action, b.action, rtol=0, atol=1e-5)
        assert a.mask[AUDIO] == (0.0 if i == 10 else 1.0)
    assert streaming.counters["nonfinite_audio"] == 1
    assert streaming.counters["audio_frame_resyncs"] == 2   # the first tick, and the one after the NaN


def test_stream_frames_equal_to_the_window_recomputes_in_the_step(default_config):
    """stream_frames = all frames: the step ignores the cache and needs no resync to be right."""
    cfg = default_config.model
    full = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, stream_frames=cfg.audio.n_frames))
    model = build_model(full, seed=1)
    n = cfg.audio.window_samples
    x = signal(n)
    sensors = SyntheticSensors(full, seed=1)
    inputs = {"camera": sensors.camera(1.0)[None], "audio": x[None], "imu": sensors.imu(1.0)[None],
              "lidar": sensors.lidar(1.0)[None], "joint_state": sensors.joint_vector(1.0)[None],
              "mask": np.ones((1, len(MODALITIES)), np.float32),
              "dt": np.array([[0.01]], np.float32), "state": np.zeros((1, len(MODALITIES), 64), np.float32)}
    engine = TorchEngine(model)
    zeros = engine.step({**inputs, "audio_frames": np.zeros((1, 64, cfg.audio.n_frames), np.float32)})
    junk = engine.step({**inputs, "audio_frames": np.full((1, 64, cfg.audio.n_frames), 7.0, np.float32)})
    np.testing.assert_array_equal(zeros["action"], junk["action"])
    with torch.inference_mode():
        expected = LogMelFrames(full.audio)(torch.from_numpy(x)[None]).numpy()
    np.testing.assert_allclose(zeros["new_audio_frames"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", [0, 98])
def test_stream_frames_outside_one_window_is_refused(default_config, value):
    from mm_fusion_ros.config import ConfigError

    audio = dataclasses.replace(default_config.model.audio, stream_frames=value)
    with pytest.raises(ConfigError, match=r"stream_frames.*\[1, 97\]"):
        audio.validate("model.audio")


def test_a_failed_step_leaves_no_half_moved_cache(default_config):
    """The cache is moved before the engine runs; if the engine raises, the next tick
    must not move it again from the old position."""
    cfg = default_config.model
    n, hop = cfg.audio.window_samples, cfg.audio.hop
    sensors = SyntheticSensors(cfg, seed=6)
    audio = signal(3 * n, seed=3)
    streaming, reference = _streams(default_config)
    real_step = streaming.engine.step
    mask = np.ones(len(MODALITIES), np.float32)
    for i in range(12):
        end = n + 2 * i * hop
        t = 1.0 + 0.01 * i
        args = (sensors.camera(t), audio[end - n:end], sensors.imu(t), sensors.lidar(t), sensors.joint_vector(t), mask,
                0.01)
        if i == 5:
            streaming.engine.step = lambda inputs: (_ for _ in ()).throw(RuntimeError("engine lost"))
            with pytest.raises(RuntimeError):
                streaming.step(*args, audio_end=end - 1)
            streaming.engine.step = real_step
            continue
        a = streaming.step(*args, audio_end=end - 1)
        b = reference.step(*args)
        np.testing.assert_allclose(streaming.audio_frames, reference.audio_frames, rtol=0, atol=1e-5)
        np.testing.assert_allclose(a.action, b.action, rtol=0, atol=1e-5)
    assert streaming.counters["audio_frame_resyncs"] == 2   # the first tick, and the one after the failure


class _WholeWindow(FusionStream):
    """The reference: a FusionStream that is never told where the window ends."""

    def prepare(self, *args, audio_end=None, audio_rewritten_from=None):
        return super().prepare(*args[:7])


@pytest.mark.parametrize("source_rate, chunk", [(16000, 320), (48000, 1024), (44100, 1024)])
def test_runtime_on_resampled_microphones_keeps_the_cache_and_the_same_actions(default_config, source_rate, chunk):
    """End to end through the aligner: a 48 or 44.1 kHz driver's chunks are resampled to the
    model rate, the resampler rewrites the newest few samples of the previous chunk, and the
    windows end wherever the chunks do. The streaming runtime matches one that recomputes the
    whole window every tick, and resyncs only on its first audio tick."""
    from mm_fusion_ros.runtime import Runtime
    from mm_fusion_ros.samples import AudioSample, ImuSample, JointStateSample, LidarSample

    cfg = dataclasses.replace(default_config, engine=dataclasses.replace(default_config.engine, backend="torch"))
    model = build_model(cfg.model, seed=8)
    streaming = Runtime(cfg, engine=TorchEngine(model), log=lambda _: None)
    reference = Runtime(cfg, engine=TorchEngine(model), log=lambda _: None)
    reference.stream = _WholeWindow(reference.engine, cfg.model)
    sensors = SyntheticSensors(cfg.model, seed=9)
    t0, period = 50.0, 1.0 / cfg.control_rate_hz
    recording = signal(3 * source_rate, seed=4)  # 3 s at the source rate
    next_chunk, worst, rewrites = 0, 0.0, 0
    for i in range(200):
        t = t0 + 1.0 + i * period
        while (next_chunk + chunk) / source_rate + t0 <= t - 0.002:   # delivered 2 ms after capture ends
            stamp = t0 + next_chunk / source_rate
            data = recording[next_chunk:next_chunk + chunk]
            for rt in (streaming, reference):
                assert rt.add(AudioSample(stamp, source_rate, data), t)
            next_chunk += chunk
        for rt in (streaming, reference):
            rt.add(ImuSample(t - 0.003, *np.split(sensors.imu(t - 0.003, n=1)[0], 2)), t)
            rt.add(JointStateSample(t - 0.002, *sensors.joint_state(t - 0.002)), t)
            if i % 10 == 0:
                rt.add(LidarSample(t - 0.01, sensors.lidar(t - 0.01)), t)
        a, b = streaming.tick(t), reference.tick(t)
        rewrites += a.observation.audio_rewritten_from is not None
        assert a.mask[AUDIO] == 1.0 or i == 0
        worst = max(worst, float(np.abs(a.raw_action - b.raw_action).max()),
                    float(np.abs(streaming.stream.state - reference.stream.state).max()))
    assert worst < 1e-5
    assert streaming.stream.counters["audio_frame_resyncs"] == 1
    assert reference.stream.counters["audio_frame_resyncs"] >= 199
    if source_rate != 16000:
        assert rewrites > 0   # the resampler did reach back, and the cache still held
