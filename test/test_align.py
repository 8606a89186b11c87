"""The Aligner: ring buffers by capture stamp -> one Observation per control tick."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from scipy.signal import resample_poly

from mm_fusion_ros.align import Aligner
from mm_fusion_ros.config import MODALITIES, RobotConfig
from mm_fusion_ros.samples import AudioSample, CameraSample, ImuSample, JointStateSample, LidarSample

CAM, AUD, IMU, LID, JS = (MODALITIES.index(m) for m in ("camera", "audio", "imu", "lidar", "joint_state"))
DOF = 7
T0 = 1000.0
RATE = 16000


@pytest.fixture
def cfg(default_config) -> RobotConfig:
    return default_config


@pytest.fixture
def al(cfg) -> Aligner:
    return Aligner(cfg)


def frame(stamp: float, rgb=(10, 200, 30), size=(24, 32)) -> CameraSample:
    h, w = size
    pixels = np.empty((h, w, 3), np.uint8)
    pixels[...] = rgb
    return CameraSample(stamp=stamp, encoding="rgb8", width=w, height=h, step=3 * w, data=pixels.ravel())


def imu(stamp: float, accel=(0.0, 0.0, 9.81), gyro=(0.0, 0.0, 0.0)) -> ImuSample:
    return ImuSample(stamp=stamp, accel=np.asarray(accel, float), gyro=np.asarray(gyro, float))


def scan(stamp: float, value: float = 2.0, beams: int = 360) -> LidarSample:
    return LidarSample(stamp=stamp, ranges=np.full(beams, value, np.float32))


def joints(stamp: float, position=None, velocity=None) -> JointStateSample:
    """Joint k at 0.1 k rad moving at (k - 3) * 0.5 rad/s unless told otherwise."""
    k = np.arange(DOF, dtype=np.float64)
    q = 0.1 * k if position is None else np.asarray(position, np.float64)
    qd = (k - 3.0) * 0.5 if velocity is None else np.asarray(velocity, np.float64)
    return JointStateSample(stamp=stamp, position=q, velocity=qd)


def ramp(index: np.ndarray) -> np.ndarray:
    """A signal whose every sample says where it belongs: value = absolute sample index mod 1000 / 1000."""
    return ((index % 1000) / 1000.0).astype(np.float32)


def add_audio(al: Aligner, first: int, chunks: int, n: int = 160, skip=()) -> None:
    """Chunks of the ramp from absolute model-rate sample ``first``, stamped at their first sample."""
    for c in range(chunks):
        if c in skip:
            continue
        start = first + c * n
        stamp = start / RATE
        assert al.add(AudioSample(stamp, RATE, ramp(np.arange(start, start + n))), now=stamp + n / RATE + 0.003)


# ---------------------------------------------------------------- masking and shapes

def test_nothing_seen_everything_masked_with_model_shapes(al, cfg):
    obs = al.tick(T0, 0.01)
    m = cfg.model
    assert obs.camera.shape == (m.camera.height, m.camera.width, 3) and obs.camera.dtype == np.uint8
    assert obs.audio.shape == (m.audio.window_samples,) and obs.audio.dtype == np.float32
    assert obs.imu.shape == (m.imu.window_samples, 6) and obs.imu.dtype == np.float32
    assert obs.lidar.shape == (m.lidar.beams,) and obs.lidar.dtype == np.float32
    assert obs.joint_state.shape == (2 * m.action.dof,) and obs.joint_state.dtype == np.float32
    assert obs.mask.tolist() == [0.0] * 5 and not obs.reset and obs.dt == 0.01
    assert all(math.isinf(obs.ages[m]) and math.isnan(obs.stamps[m]) for m in MODALITIES)
    for array in (obs.camera, obs.audio, obs.imu, obs.lidar, obs.joint_state):
        assert not array.any()
    assert set(obs.timings) == {"align", "preprocess"}


# ---------------------------------------------------------------- camera

def test_camera_takes_the_newest_frame_at_or_before_t_and_decodes_it_once(al):
    now = T0 + 0.05
    assert al.add(frame(T0 - 0.030, (255, 0, 0)), now)
    assert al.add(frame(T0 - 0.010, (0, 255, 0)), now)
    assert al.add(frame(T0 + 0.020, (0, 0, 255)), now)    # after the first ticks: must not be used by them
    first = al.tick(T0, 0.01)
    assert first.mask[CAM] == 1.0 and first.stamps["camera"] == T0 - 0.010
    assert first.ages["camera"] == pytest.approx(0.010)
    assert (first.camera == (0, 255, 0)).all() and first.camera.shape == (96, 96, 3)
    assert first.notes.get("camera_decoded") == 1
    second = al.tick(T0 + 0.01, 0.01)
    assert (second.camera == (0, 255, 0)).all() and "camera_decoded" not in second.notes   # from the cache
    third = al.tick(T0 + 0.02, 0.01)
    assert (third.camera == (0, 0, 255)).all() and third.notes.get("camera_decoded") == 1
    third.camera[...] = 0   # the caller owns its arrays: the cache must not change
    assert (al.tick(T0 + 0.03, 0.01).camera == (0, 0, 255)).all()


def test_stale_camera_is_masked_but_its_age_reported(al):
    al.add(frame(T0 - 0.15), T0)
    obs = al.tick(T0, 0.01)
    assert obs.mask[CAM] == 0.0 and math.isnan(obs.stamps["camera"]) and not obs.camera.any()
    assert obs.ages["camera"] == pytest.approx(0.15)


def test_corrupt_compressed_frame_is_counted_once_and_masked(al):
    junk = CameraSample(T0 - 0.01, "jpeg", 0, 0, 0, np.frombuffer(b"\xff\xd8not a jpeg at all", np.uint8))
    assert al.add(junk, T0)   # decoding happens only when a tick uses the frame
    for k in range(3):
        obs = al.tick(T0 + 0.01 * k, 0.01)
        assert obs.mask[CAM] == 0.0 and math.isnan(obs.stamps["camera"])
    assert al.counters["camera.decode_failed"] == 1


# ---------------------------------------------------------------- audio

def on_hop_grid(index: int, hop: int = 160) -> int:
    """The last sample index at or before ``index`` that ends a hop: (k + 1) % hop == 0."""
    return (index + 1) // hop * hop - 1


def test_audio_window_ends_on_the_hop_grid_at_or_before_t(al):
    first = round(T0 * RATE) - 2 * RATE
    add_audio(al, first, chunks=220)     # 2.2 s: runs 0.2 s past the tick
    t = T0 + 0.0123456
    obs = al.tick(t, 0.01)
    newest = on_hop_grid(math.floor(t * RATE))
    assert math.floor(t * RATE) - newest < 160
    np.testing.assert_array_equal(obs.audio, ramp(np.arange(newest - RATE + 1, newest + 1)))
    assert obs.mask[AUD] == 1.0 and obs.audio_gap_samples == 0
    assert obs.audio_end == newest and obs.audio_rewritten_from is None
    assert obs.stamps["audio"] == newest / RATE and obs.ages["audio"] == pytest.approx(t - newest / RATE)


def test_consecutive_audio_windows_move_by_whole_hops(al):
    """Whatever the tick times and chunk sizes, window ends differ by whole hops, so the
    model's log-mel frames of one tick are the next tick's frames moved along."""
    start = round(T0 * RATE) - RATE
    add_audio(al, start - RATE, chunks=100)     # one full window before the odd chunks start
    rng = np.random.default_rng(3)
    ends, k, t = [], start, T0
    while t < T0 + 0.5:
        n = int(rng.integers(50, 700))             # odd chunk sizes, as a 44.1 kHz driver's resampled ones
        al.add(AudioSample(k / RATE, RATE, ramp(np.arange(k, k + n))), (k + n) / RATE + 0.003)
        k += n
        t = (k - 1) / RATE + float(rng.uniform(0.0, 0.004))
        obs = al.tick(t, 0.01)
        if obs.mask[AUD]:
            ends.append(obs.audio_end)
            np.testing.assert_array_equal(obs.audio, ramp(np.arange(obs.audio_end - RATE + 1, obs.audio_end + 1)))
    assert len(ends) > 20 and all((e + 1) % 160 == 0 for e in ends)
    assert len(set(np.diff(ends))) > 2   # the windows did move by different numbers of hops


def test_audio_ring_reports_samples_written_over_once():
    from mm_fusion_ros.align import _AudioRing

    ring = _AudioRing(RATE, 4 * RATE, 160)
    first = AudioSample(0.0, RATE, np.ones(800, np.float32))
    ring.write(1000, first.samples, False, first)
    assert ring.take_rewritten() is None
    # A resampler's recomputed lead reaches back over samples already written.
    lead = AudioSample(0.1, RATE, np.full(500, 2.0, np.float32))
    ring.write(1700, lead.samples, True, lead)
    assert ring.take_rewritten() == 1700
    assert ring.take_rewritten() is None      # reported once, for the tick that follows
    ring.write(2200, lead.samples, True, lead)  # only new samples: nothing rewritten
    assert ring.take_rewritten() is None


def test_audio_gap_is_zero_filled_and_counted(al):
    first = round(T0 * RATE) - 2 * RATE
    add_audio(al, first, chunks=200, skip={190})
    obs = al.tick(T0, 0.01)
    newest = round(T0 * RATE) - 1
    expected = ramp(np.arange(newest - RATE + 1, newest + 1))
    hole = slice(RATE - 10 * 160, RATE - 9 * 160)      # chunk 190 of 200
    expected[hole] = 0.0
    np.testing.assert_array_equal(obs.audio, expected)
    assert obs.audio_gap_samples == 160 and al.counters["audio.gap_samples"] == 160
    assert al.tick(T0 + 0.005, 0.005).audio_gap_samples == 160   # still in the window, no longer counted again
    assert al.counters["audio.gap_samples"] == 160


def test_audio_before_the_stream_started_is_counted_as_zeros(al):
    first = round(T0 * RATE) - RATE // 2
    add_audio(al, first, chunks=50)
    obs = al.tick(T0, 0.01)
    assert obs.mask[AUD] == 1.0 and obs.audio_gap_samples == RATE // 2
    assert not obs.audio[: RATE // 2].any()
    np.testing.assert_array_equal(obs.audio[RATE // 2:], ramp(np.arange(first, first + RATE // 2)))
    assert al.counters["audio.gap_samples"] == 0    # nothing was lost between chunks


def test_audio_overlap_tolerance_is_half_a_sample(al):
    n, s = 160, T0
    assert al.add(AudioSample(s, RATE, np.ones(n, np.float32)), T0)
    end = s + n / RATE
    assert al.add(AudioSample(end - 0.4 / RATE, RATE, np.ones(n, np.float32)), T0)      # jitter: continues
    end2 = end - 0.4 / RATE + n / RATE
    assert not al.add(AudioSample(end2 - 0.6 / RATE, RATE, np.ones(n, np.float32)), T0)  # overlaps: out of order
    assert not al.add(AudioSample(end - 0.4 / RATE, RATE, np.ones(n, np.float32)), T0)   # same stamp again
    assert not al.add(AudioSample(s - 1.0, RATE, np.ones(n, np.float32)), T0)
    assert al.counters["audio.out_of_order"] == 2 and al.counters["audio.duplicate"] == 1
    obs = al.tick(end2, 0.01)
    assert obs.audio_gap_samples == RATE - 2 * n and (obs.audio[-2 * n:] == 1.0).all()


def test_audio_at_48k_is_resampled_at_add_without_clicks(al):
    src, n = 48000, 960
    start = T0 - 1.2
    signal = (0.5 * np.sin(2 * np.pi * 440 * np.arange(60 * n) / src)).astype(np.float32)
    for c in range(60):
        stamp = start + c * n / src
        assert al.add(AudioSample(stamp, src, signal[c * n:(c + 1) * n]), stamp + 0.03)
    t = start + 1.2 - 1e-9
    obs = al.tick(t, 0.01)
    assert obs.mask[AUD] == 1.0 and obs.audio_gap_samples == 0
    spectrum = np.abs(np.fft.rfft(obs.audio * np.hanning(RATE)))
    assert np.argmax(spectrum) == pytest.approx(440, abs=1)   # 1 Hz per bin over a 1 s window
    whole = resample_poly(signal, 1, 3)
    newest = math.floor(t * RATE) - round(start * RATE)      # index of the window's last sample in `whole`
    reference = whole[newest - RATE + 1:newest + 1]
    # Identical to resampling the whole recording, except the last few samples, whose right-hand
    # neighbours have not arrived yet.
    np.testing.assert_allclose(obs.audio[:-20], reference[:-20], atol=1e-4)


# ---------------------------------------------------------------- imu

def test_imu_window_interpolates_a_linear_signal_exactly_and_ignores_later_samples(al, cfg):
    rng = np.random.default_rng(3)
    stamps = T0 - 0.1 + np.cumsum(rng.uniform(0.002, 0.007, 40))
    stamps = stamps[stamps < T0 - 0.001]

    def line(s):
        d = s - T0
        return (1.0 + 2.0 * d, -3.0 * d, 9.81 + d), (0.5 * d, 0.1, -d)

    for s in stamps:
        accel, gyro = line(s)
        assert al.add(imu(s, accel, gyro), T0)
    assert al.add(imu(T0 + 0.001, (1e6,) * 3, (1e6,) * 3), T0)   # after the tick: never used by it
    obs = al.tick(T0, 0.01)
    n = cfg.model.imu.window_samples
    grid = T0 - np.arange(n - 1, -1, -1) / cfg.model.imu.rate_hz
    held = np.clip(grid, stamps[0], stamps[-1])     # hold the edge values, never extrapolate
    expected = np.array([np.concatenate(line(g)) for g in held], np.float32)
    np.testing.assert_allclose(obs.imu, expected, atol=1e-5)
    assert (obs.imu[grid < stamps[0]] == expected[0]).all()    # the window starts before the first sample
    assert obs.mask[IMU] == 1.0 and obs.stamps["imu"] == stamps[-1]


def test_stale_imu_is_masked(al):
    al.add(imu(T0 - 0.06), T0)
    obs = al.tick(T0, 0.01)
    assert obs.mask[IMU] == 0.0 and not obs.imu.any() and obs.ages["imu"] == pytest.approx(0.06)


# ---------------------------------------------------------------- lidar

def test_lidar_takes_the_newest_scan_at_or_before_t_within_max_age(al):
    al.add(scan(T0 - 0.2, 3.0), T0)
    al.add(scan(T0 - 0.1, 4.0), T0)
    al.add(scan(T0 + 0.05, 5.0), T0)
    obs = al.tick(T0, 0.01)
    assert obs.mask[LID] == 1.0 and (obs.lidar == 4.0).all() and obs.stamps["lidar"] == T0 - 0.1
    late = al.tick(T0 + 0.04, 0.01)
    assert late.lidar[0] == 4.0
    stale = al.tick(T0 + 0.4, 0.01)          # the 5.0 scan is 0.35 s old by then: over 0.25
    assert stale.mask[LID] == 0.0 and stale.ages["lidar"] == pytest.approx(0.35)


# ---------------------------------------------------------------- joint state

def test_joint_state_is_carried_to_the_tick_by_its_velocity(al):
    """First-order hold: position + velocity * (t - stamp), velocities as measured, from the newest sample
    at or before t; one stamped after t is not used by that tick."""
    assert al.add(joints(T0 - 0.030, position=np.full(DOF, 9.0)), T0)
    newest = joints(T0 - 0.012)
    assert al.add(newest, T0)
    assert al.add(joints(T0 + 0.004, position=np.full(DOF, -9.0), velocity=np.zeros(DOF)), T0)   # after the tick
    obs = al.tick(T0, 0.01)
    assert obs.mask[JS] == 1.0 and obs.stamps["joint_state"] == T0 - 0.012
    assert obs.ages["joint_state"] == pytest.approx(0.012)
    expected_q = newest.position + newest.velocity * 0.012
    np.testing.assert_allclose(obs.joint_state[:DOF], expected_q, rtol=0, atol=1e-6)
    np.testing.assert_allclose(obs.joint_state[DOF:], newest.velocity, rtol=0, atol=1e-6)
    assert not np.allclose(obs.joint_state[:DOF], newest.position, atol=1e-3)   # it did move them on
    # The next tick takes the later sample: held at rest where it was.
    later = al.tick(T0 + 0.01, 0.01)
    assert later.stamps["joint_state"] == T0 + 0.004
    np.testing.assert_allclose(later.joint_state, np.concatenate([np.full(DOF, -9.0), np.zeros(DOF)]), atol=1e-6)


def test_joint_state_hold_is_exact_on_a_constant_velocity_arm(al):
    """An arm moving at constant velocity, sampled at 100 Hz with jitter and ticked off the sample grid:
    the held positions are where the joints really are at t."""
    rng = np.random.default_rng(4)
    qd = np.linspace(-1.0, 1.0, DOF)

    def q(t):
        return 0.3 + qd * (t - T0)

    stamps = T0 + np.arange(60) * 0.01 + rng.uniform(-0.001, 0.001, 60)
    checked = 0
    for k, stamp in enumerate(stamps):
        al.add(joints(stamp, q(stamp), qd), stamp + 0.001)
        t = stamp + float(rng.uniform(0.0, 0.009))
        if k + 1 < len(stamps) and t >= stamps[k + 1]:
            continue
        obs = al.tick(t, 0.01)
        assert obs.mask[JS] == 1.0 and obs.stamps["joint_state"] == stamp
        np.testing.assert_allclose(obs.joint_state[:DOF], q(t), rtol=0, atol=1e-5)
        np.testing.assert_allclose(obs.joint_state[DOF:], qd, rtol=0, atol=1e-6)
        checked += 1
    assert checked > 40


def test_stale_joint_state_is_masked_at_max_age_and_its_age_reported(al, cfg):
    max_age = cfg.inputs.joint_state.max_age
    assert max_age == 0.05
    al.add(joints(T0), T0)
    fresh = al.tick(T0 + 0.04, 0.01)
    assert fresh.mask[JS] == 1.0
    stale = al.tick(T0 + 0.06, 0.02)
    assert stale.mask[JS] == 0.0 and math.isnan(stale.stamps["joint_state"])
    assert stale.ages["joint_state"] == pytest.approx(0.06)
    assert not stale.joint_state.any()      # masked: zeros, never a guess extrapolated from an old sample


def test_joint_state_counts(al):
    assert al.add(joints(T0), T0) and al.add(joints(T0 + 0.01), T0 + 0.01)
    assert not al.add(joints(T0 + 0.01), T0 + 0.01)                              # duplicate
    assert not al.add(joints(T0 + 0.005), T0 + 0.01)                             # out of order
    assert not al.add(joints(T0 + 0.02, position=np.zeros(DOF - 1)), T0 + 0.02)  # a joint short
    assert not al.add(joints(T0 + 0.02, velocity=np.zeros(DOF + 1)), T0 + 0.02)
    assert not al.add(joints(T0 + 0.02, velocity=np.full(DOF, np.nan)), T0 + 0.02)
    assert not al.add(joints(T0 + 0.02, position=np.full(DOF, np.inf)), T0 + 0.02)
    assert {k: v for k, v in al.counters.items() if k.startswith("joint_state")} == {
        "joint_state.accepted": 2, "joint_state.duplicate": 1, "joint_state.out_of_order": 1,
        "joint_state.bad_shape": 2, "joint_state.non_finite": 2}
    obs = al.tick(T0 + 0.02, 0.01)
    assert obs.stamps["joint_state"] == T0 + 0.01 and np.isfinite(obs.joint_state).all()


def test_a_1khz_joint_state_stamped_ahead_of_the_clock_is_still_used(al, cfg):
    """joint_state_broadcaster runs at up to 1 kHz; a controller clock 0.2 s ahead of this one (within
    max_future_s) puts 200 samples after each tick in the buffer, and the ones at or before it must stay."""
    ahead = 0.2
    assert ahead < cfg.inputs.max_future_s
    k = 0
    for i in range(50):
        t = T0 + 0.01 * i
        while T0 - 0.05 + k / 1000.0 <= t + ahead:      # everything the robot has sent by now
            stamp = T0 - 0.05 + k / 1000.0
            assert al.add(joints(stamp, position=np.full(DOF, stamp - T0), velocity=np.ones(DOF)), now=t)
            k += 1
        obs = al.tick(t, 0.01)
        assert obs.mask[JS] == 1.0, (i, obs.ages["joint_state"])
        assert obs.stamps["joint_state"] <= t and obs.ages["joint_state"] < 0.0011
        np.testing.assert_allclose(obs.joint_state[:DOF], t - T0, atol=1e-5)   # carried exactly to t


# ---------------------------------------------------------------- drops

@pytest.mark.parametrize("make", [frame, imu, scan, joints], ids=["camera", "imu", "lidar", "joint_state"])
def test_out_of_order_duplicate_and_future_stamps_are_dropped(al, make):
    name = {frame: "camera", imu: "imu", scan: "lidar", joints: "joint_state"}[make]
    assert al.add(make(T0), T0)
    assert not al.add(make(T0), T0)                       # same stamp
    assert not al.add(make(T0 - 0.01), T0)                # older than the newest
    assert not al.add(make(T0 + 0.6), T0)                 # more than max_future_s (0.5) ahead of now
    assert not al.add(make(math.nan), T0)
    assert al.add(make(T0 + 0.4), T0)                     # ahead, but within max_future_s
    assert {k: v for k, v in al.counters.items() if k.startswith(name)} == {
        f"{name}.accepted": 2, f"{name}.duplicate": 1, f"{name}.out_of_order": 1,
        f"{name}.future_stamp": 1, f"{name}.bad_stamp": 1}


def test_unusable_samples_are_counted_not_raised(al):
    assert not al.add(LidarSample(T0, np.ones(10, np.float32)), T0)
    assert not al.add(AudioSample(T0, RATE, np.zeros(RATE + 1, np.float32)), T0)
    assert not al.add(AudioSample(T0, RATE, np.zeros(0, np.float32)), T0)
    assert not al.add(imu(T0, accel=(0.0, np.nan, 0.0)), T0)
    assert not al.add(AudioSample(T0, 44101, np.zeros(10, np.float32)), T0)   # a ratio of 16000/44101
    assert not al.add(CameraSample(T0, "rgba8", 1, 1, 4, np.zeros(4, np.uint8)), T0)
    assert not al.add(joints(T0, position=np.zeros(3)), T0)
    assert not al.add(joints(T0, velocity=np.full(DOF, np.nan)), T0)
    for key in ("lidar.bad_beams", "audio.oversize", "audio.empty", "imu.non_finite", "camera.bad_encoding",
                "audio.bad_rate", "joint_state.bad_shape", "joint_state.non_finite"):
        assert al.counters[key] == 1, key
    with pytest.raises(TypeError):
        al.add("not a sample", T0)


# ---------------------------------------------------------------- clock

def fill(al: Aligner, t: float) -> None:
    al.add(frame(t - 0.01), t)
    al.add(scan(t - 0.05), t)
    al.add(imu(t - 0.002), t)
    al.add(joints(t - 0.005), t)
    add_audio(al, round(t * RATE) - 1600, chunks=10)


def test_clock_jump_backwards_resets_buffers(al):
    fill(al, T0)
    assert al.tick(T0, 0.01).mask.tolist() == [1.0] * 5
    obs = al.tick(T0 - 30.0, 0.01)                      # the bag looped
    assert obs.reset and al.counters["resets"] == 1
    assert obs.mask.tolist() == [0.0] * 5               # nothing from before the jump survives
    fill(al, T0 - 29.9)                                 # older stamps than before: accepted after the reset
    after = al.tick(T0 - 29.9, 0.01)
    assert not after.reset and after.mask.tolist() == [1.0] * 5


def test_bad_dt_is_replaced_by_the_nominal_period(al, cfg):
    assert al.tick(T0, 0.0).dt == pytest.approx(1.0 / cfg.control_rate_hz)
    assert al.tick(T0 + 0.01, math.nan).dt == pytest.approx(1.0 / cfg.control_rate_hz)
    assert al.counters["tick.bad_dt"] == 2


# ---------------------------------------------------------------- determinism and threads

def scripted_run(cfg: RobotConfig, seed: int) -> list:
    """A jittery, lossy stream with a clock jump, as (add..., tick) calls; returns the observations."""
    rng = np.random.default_rng(seed)
    al = Aligner(cfg)
    out = []
    audio_next = round(T0 * RATE)
    for k in range(120):
        t = T0 + 0.01 * k if k < 80 else T0 - 5.0 + 0.01 * k      # jumps back at tick 80
        if k == 80:
            audio_next = round((T0 - 5.0 + 0.8) * RATE) - 800
        now = t + rng.uniform(0.0, 0.004)
        if k % 3 == 0:
            al.add(frame(t - rng.uniform(0.0, 0.02), tuple(int(v) for v in rng.integers(0, 256, 3))), now)
        for _ in range(2):
            al.add(imu(t - rng.uniform(0.0, 0.01), rng.normal(size=3), rng.normal(size=3)), now)
        if rng.random() > 0.1:    # 10% of audio chunks lost
            al.add(AudioSample(audio_next / RATE, RATE, rng.normal(size=160).astype(np.float32)), now)
        audio_next += 160
        if k % 10 == 0:
            al.add(LidarSample(t - 0.05, rng.uniform(0.1, 10.0, 360).astype(np.float32)), now)
        if rng.random() > 0.2:    # 20% of joint states lost
            al.add(joints(t - rng.uniform(0.0, 0.01), rng.normal(size=DOF), rng.normal(size=DOF)), now)
        out.append(al.tick(t, 0.01))
    return out


def test_same_calls_give_identical_observations(cfg):
    a, b = scripted_run(cfg, 7), scripted_run(cfg, 7)
    assert sum(o.reset for o in a) == 1
    assert sum(o.mask.sum() for o in a) > 400          # the script exercises present data, not just masks
    assert sum(o.mask[JS] for o in a) > 60
    for x, y in zip(a, b):
        for name in ("camera", "audio", "imu", "lidar", "joint_state", "mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))
        assert (x.t, x.dt, x.audio_gap_samples, x.reset) == (y.t, y.dt, y.audio_gap_samples, y.reset)
        assert x.ages == y.ages
        assert all(x.stamps[m] == y.stamps[m] or (math.isnan(x.stamps[m]) and math.isnan(y.stamps[m]))
                   for m in MODALITIES)


def test_adding_from_another_thread_while_ticking(al, cfg):
    n_imu, n_audio, n_frames = 1000, 250, 167
    errors: list[BaseException] = []

    def writer():
        try:
            for k in range(n_imu):
                s = T0 + k * 0.005
                al.add(imu(s, (s - T0, 0.0, 9.81)), s + 0.001)
                if k % 4 == 0:
                    start = round(T0 * RATE) + (k // 4) * 320
                    al.add(AudioSample(start / RATE, RATE, ramp(np.arange(start, start + 320))), s + 0.02)
                if k % 6 == 0:
                    al.add(frame(s), s + 0.01)
        except BaseException as exc:   # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    k = 0
    while thread.is_alive() or k < 50:
        obs = al.tick(min(T0 + 0.01 * k, T0 + 4.9), 0.01)   # never past the final tick below
        assert obs.audio.shape == (RATE,) and obs.imu.shape == (40, 6)
        k += 1
    thread.join()
    assert not errors and al.counters["resets"] == 0
    assert al.counters["imu.accepted"] == n_imu
    assert al.counters["audio.accepted"] == n_audio and al.counters["camera.accepted"] == n_frames
    end = T0 + (n_imu - 1) * 0.005
    last = al.tick(end + 1e-6, 0.01)
    grid = end + 1e-6 - np.arange(39, -1, -1) / 200.0
    np.testing.assert_allclose(last.imu[:, 0], np.minimum(grid, end) - T0, atol=1e-5)
    newest = on_hop_grid(math.floor((end + 1e-6) * RATE))  # audio runs on to T0 + 5 s; the tick stops at its t
    np.testing.assert_array_equal(last.audio, ramp(np.arange(newest - RATE + 1, newest + 1)))


def test_memory_is_bounded_by_the_history_length(al, cfg):
    for k in range(150):            # 5 s of camera at 30 Hz without a single tick
        al.add(frame(T0 + k / 30), T0 + k / 30)
    assert len(al._camera.items) <= cfg.inputs.buffer_s * 30 + 1
    add_audio(al, round(T0 * RATE), chunks=500)      # 5 s of audio
    # buffer_s, plus max_future_s for audio stamped ahead of the tick
    assert al._audio.data.size == math.ceil((cfg.inputs.buffer_s + cfg.inputs.max_future_s) * RATE)
    assert len(al._audio.runs) == 1


# ---------------------------------------------------------------- issue #12: audio stamped ahead of the tick

def signed_by_time(first: int, n: int, t: float) -> np.ndarray:
    """The ramp for samples stamped at or before ``t``; minus one for every sample stamped after it."""
    index = np.arange(first, first + n)
    return np.where(index / RATE > t, np.float32(-1.0), ramp(index))


def test_audio_stamped_ahead_never_puts_future_samples_into_the_window(cfg):
    """The issue's case: buffer_s 1.1 and audio stamped 0.35 s ahead of the clock (max_future_s is 0.5)
    put 4800 of the window's 16000 samples from after the tick into it."""
    import dataclasses

    cfg = dataclasses.replace(cfg, inputs=dataclasses.replace(cfg.inputs, buffer_s=1.1))
    cfg.validate()
    al = Aligner(cfg)
    n, k = 800, round((T0 - 2.0) * RATE)        # 50 ms chunks, stamped at their first sample
    while k / RATE <= T0 + 0.35:
        assert al.add(AudioSample(k / RATE, RATE, signed_by_time(k, n, T0)), now=k / RATE - 0.35)
        k += n
    obs = al.tick(T0, 0.01)
    assert obs.mask[AUD] == 1.0
    assert not (obs.audio < 0).any()            # no sample stamped after the tick
    newest = on_hop_grid(math.floor(T0 * RATE))
    np.testing.assert_array_equal(obs.audio, ramp(np.arange(newest - RATE + 1, newest + 1)))
    assert obs.audio_gap_samples == 0           # and the whole second before it is still there


def test_audio_the_ring_cannot_hold_reads_as_zeros_never_as_later_audio(cfg):
    """Stamps 0.5 s ahead (the most max_future_s allows) in 1 s chunks (the longest allowed) end 1.5 s after
    the tick: with buffer_s 1.1, more than the ring holds behind its head. What was written over is
    missing, not future."""
    import dataclasses

    cfg = dataclasses.replace(cfg, inputs=dataclasses.replace(cfg.inputs, buffer_s=1.1))
    cfg.validate()
    al = Aligner(cfg)
    n, k = RATE, round((T0 - 3.0) * RATE)
    while k / RATE <= T0 + 0.5:
        assert al.add(AudioSample(k / RATE, RATE, signed_by_time(k, n, T0)), now=k / RATE - 0.5)
        k += n
    obs = al.tick(T0, 0.01)
    assert not (obs.audio < 0).any()
    newest = on_hop_grid(math.floor(T0 * RATE))
    oldest_kept = k - al._audio.capacity         # the ring's head minus its capacity
    lo = newest - RATE + 1
    assert lo < oldest_kept <= newest
    lost = oldest_kept - lo
    expected = ramp(np.arange(lo, newest + 1))
    expected[:lost] = 0.0
    np.testing.assert_array_equal(obs.audio, expected)
    assert obs.audio_gap_samples == lost


def test_no_window_ever_holds_a_sample_stamped_after_its_tick(cfg):
    """Audio 0.1-0.45 s ahead of the clock in chunks of varying length, ticks every 10 ms: every audio
    window ends at or before its tick and holds only samples from at or before it."""
    import dataclasses

    cfg = dataclasses.replace(cfg, inputs=dataclasses.replace(cfg.inputs, buffer_s=1.05))
    cfg.validate()
    al = Aligner(cfg)
    rng = np.random.default_rng(12)
    k, t, checked = round((T0 - 1.2) * RATE), T0 - 1.0, 0
    while t < T0 + 1.0:
        t += 0.01
        ahead = float(rng.uniform(0.1, 0.45))
        while k / RATE <= t + ahead:
            n = int(rng.integers(160, 2400))
            al.add(AudioSample(k / RATE, RATE, ramp(np.arange(k, k + n))), now=t)
            k += n
        obs = al.tick(t, 0.01)
        if obs.mask[AUD]:
            end = obs.audio_end
            assert end / RATE <= t
            real = np.arange(end - RATE + 1, end + 1)
            zero = obs.audio == 0.0
            # every sample is its own ramp value (from at or before the tick) or a counted zero
            assert (zero | (obs.audio == ramp(real))).all()
            checked += 1
    assert checked > 150
