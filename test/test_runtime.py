"""Runtime: the ROS-free tick loop with the torch engine and synthetic sensors on a fake clock."""

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from mm_fusion_ros.config import MODALITIES, ConfigError, RobotConfig
from mm_fusion_ros.engine import Engine, create_engine
from mm_fusion_ros.model import build_model, save_checkpoint
from mm_fusion_ros.runtime import ERROR, OK, WARN, Runtime, load_model
from mm_fusion_ros.safety import FAILED_REASON
from mm_fusion_ros.samples import AudioSample, CameraSample, ImuSample, JointStateSample, LidarSample
from mm_fusion_ros.synthetic import SyntheticSensors

PERIOD = 0.01
T0 = 100.0
RATES = {"camera": 30.0, "audio": 50.0, "imu": 200.0, "lidar": 10.0, "joint_state": 100.0}  # audio: 20 ms chunks


def make_config(**safety) -> RobotConfig:
    cfg = RobotConfig()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend="torch"),
                              safety=dataclasses.replace(cfg.safety, **safety))
    cfg.validate()
    return cfg


class RecordingEngine(Engine):
    """The shared torch engine, remembering the dt and state each step was given; can be made to fail."""

    name = "recording"

    def __init__(self, inner: Engine):
        super().__init__(inner.input_specs, inner.output_specs)
        self.inner = inner
        self.dts: list[float] = []
        self.states: list[np.ndarray] = []
        self.fail: str | None = None   # "raise" or "nan"
        self.action: float | None = None   # every DOF of the action set to this value

    def run(self, inputs):
        self.dts.append(float(inputs["dt"][0, 0]))
        self.states.append(inputs["state"].copy())
        if self.fail == "raise":
            raise RuntimeError("device lost")
        out = self.inner.run(inputs)
        if self.fail == "nan":
            out["action"][:] = np.nan
        elif self.action is not None:
            out["action"][:] = self.action
        return out


@pytest.fixture(scope="module")
def torch_engine():
    torch.set_num_threads(1)  # the test machine's cores are shared
    cfg = make_config()
    return create_engine(cfg, load_model(cfg), "torch", log=lambda _: None)


def make_runtime(torch_engine, **safety) -> tuple[Runtime, RecordingEngine, list[str]]:
    logs: list[str] = []
    engine = RecordingEngine(torch_engine)
    return Runtime(make_config(**safety), engine=engine, log=logs.append), engine, logs


class Sensors:
    """Synthetic sensors at their own rates, stamped at capture and delivered when complete."""

    def __init__(self, runtime: Runtime, start: float):
        self.runtime = runtime
        self.synthetic = SyntheticSensors(runtime.cfg.model, seed=1)
        self.next = dict.fromkeys(MODALITIES, start)
        self.stopped: set[str] = set()
        self.last_stamp: dict[str, float] = {}

    def sample(self, name: str, stamp: float):
        s, cam = self.synthetic, self.runtime.cfg.model.camera
        if name == "camera":
            frame = s.camera(stamp)
            return CameraSample(stamp, "rgb8", cam.width, cam.height, cam.width * 3, frame.reshape(-1))
        if name == "audio":
            rate = self.runtime.cfg.model.audio.sample_rate
            n = int(round(rate / RATES["audio"]))
            # s.audio(t_end) gives the n samples ending at t_end: the last one is captured at stamp + (n-1)/rate
            return AudioSample(stamp, rate, s.audio(stamp + (n - 1) / rate, n=n))
        if name == "imu":
            row = s.imu(stamp, n=1)[0]
            return ImuSample(stamp, row[:3].copy(), row[3:].copy())
        if name == "joint_state":
            return JointStateSample(stamp, *s.joint_state(stamp))
        return LidarSample(stamp, s.lidar(stamp))

    def until(self, now: float) -> None:
        """Deliver every sample whose capture (for audio: the whole chunk) is complete by ``now``."""
        for name in MODALITIES:
            span = 1.0 / RATES[name] if name == "audio" else 0.0
            while self.next[name] + span <= now + 1e-9:
                stamp = self.next[name]
                self.next[name] = T0 + (round((stamp - T0) * RATES[name]) + 1) / RATES[name]
                if name not in self.stopped:
                    assert self.runtime.add(self.sample(name, stamp), now)
                    self.last_stamp[name] = stamp


def run(runtime: Runtime, sensors: Sensors, ticks: int, start: float) -> list:
    results = []
    for i in range(ticks):
        t = start + i * PERIOD
        sensors.until(t)
        results.append(runtime.tick(t))
    return results


def warm(torch_engine, **safety):
    """A runtime whose buffers hold 1.1 s of every sensor before the first tick at T0."""
    runtime, engine, logs = make_runtime(torch_engine, **safety)
    sensors = Sensors(runtime, T0 - 1.1)
    return runtime, engine, logs, sensors


def test_one_second_at_100hz_gives_finite_actions_within_limits(torch_engine):
    runtime, _, _, sensors = warm(torch_engine, start_enabled=True)
    results = run(runtime, sensors, 100, T0)
    safety = runtime.cfg.safety
    lower, upper = np.array(safety.per_dof("lower", 7)), np.array(safety.per_dof("upper", 7))
    for r in results:
        assert r.raw_action.shape == (7,) and r.raw_action.dtype == np.float32
        assert np.isfinite(r.raw_action).all()
        assert np.all(r.safety.command >= lower) and np.all(r.safety.command <= upper)
        assert r.safety.commanded and not r.safety.held
        np.testing.assert_array_equal(r.mask, np.ones(5, np.float32))
        assert set(r.stage_s) == {"align", "preprocess", "infer", "safety"}
        assert r.attention.shape == (5, 5) and r.contribution.shape == (5,)
    # the rate limiter ramped up from rest: no tick changed any DOF by more than max_acceleration * 10 ms
    commands = np.array([np.zeros(7)] + [r.safety.command for r in results])
    assert np.abs(np.diff(commands, axis=0)).max() <= 0.05 + 1e-12
    assert runtime.counters["ticks"] == 100


@pytest.mark.parametrize("name", ["lidar", "joint_state"])
def test_a_stopped_required_sensor_is_masked_and_held_within_max_age_plus_one_tick(torch_engine, name):
    runtime, _, _, sensors = warm(torch_engine, start_enabled=True)
    run(runtime, sensors, 20, T0)
    sensors.stopped.add(name)
    results = run(runtime, sensors, 50, T0 + 20 * PERIOD)
    last_sample = sensors.last_stamp[name]
    max_age = getattr(runtime.cfg.inputs, name).max_age
    first_held = next(r for r in results if r.safety.held)
    assert first_held.safety.stale == (name,)
    assert first_held.mask[MODALITIES.index(name)] == 0.0
    np.testing.assert_array_equal(first_held.safety.command, np.zeros(7))
    assert first_held.safety.commanded  # the controller is told to stop
    assert max_age < first_held.t - last_sample <= max_age + PERIOD + 1e-9
    # every tick before it still used the last sample; every tick after it is held
    before = [r for r in results if r.t < first_held.t]
    assert before and all(not r.safety.held and r.mask[MODALITIES.index(name)] == 1.0 for r in before)
    assert all(r.safety.held for r in results if r.t >= first_held.t)
    statuses = {s.name: s for s in runtime.report()}
    assert statuses["mm_fusion: safety"].level == ERROR
    assert name in statuses["mm_fusion: safety"].message
    assert statuses["mm_fusion: inputs"].level == WARN and name in statuses["mm_fusion: inputs"].message


def test_a_stopped_optional_sensor_is_masked_but_not_held(torch_engine):
    runtime, _, _, sensors = warm(torch_engine, start_enabled=True)
    sensors.stopped.add("audio")
    results = run(runtime, sensors, 10, T0)
    assert all(r.mask[MODALITIES.index("audio")] == 0.0 and not r.safety.held for r in results)


def test_a_backwards_clock_jump_resets_state_buffers_and_rate_limiter(torch_engine):
    runtime, engine, logs, sensors = warm(torch_engine, start_enabled=True)
    run(runtime, sensors, 30, T0)
    assert np.abs(runtime.stream.state).max() > 0
    jump = T0 + 5 * PERIOD
    result = runtime.tick(jump)
    assert result.observation.reset
    assert np.all(engine.states[-1] == 0.0)  # the step after the jump started from a zero state
    assert result.dt == pytest.approx(PERIOD)
    assert runtime.counters["resets"] == 1 and runtime.aligner.counters["resets"] == 1
    assert runtime.stream.counters["state_resets"] == 1 and runtime.safety.counters["resets"] == 1
    assert any("clock jumped back" in line for line in logs)
    assert result.mask.sum() == 0  # the buffers were emptied with the past
    # a fresh stream after the jump feeds the model again
    sensors2 = Sensors(runtime, jump - 1.1)
    sensors2.until(jump + PERIOD)
    after = runtime.tick(jump + PERIOD)
    np.testing.assert_array_equal(after.mask, np.ones(5, np.float32))
    assert runtime.counters["resets"] == 1


def test_a_requested_reset_forgets_state_buffers_and_rate_limiter_at_the_next_tick(torch_engine):
    runtime, engine, logs, sensors = warm(torch_engine, start_enabled=True)
    results = run(runtime, sensors, 30, T0)
    assert np.abs(runtime.stream.state).max() > 0
    t = T0 + 30 * PERIOD
    runtime.request_reset()   # as fusion_node's mm_fusion/reset service does, from another thread
    assert np.abs(runtime.stream.state).max() > 0   # nothing happens before the tick
    result = runtime.tick(t)
    assert np.all(engine.states[-1] == 0.0)   # that tick's step started from a zero state
    assert result.mask.sum() == 0 and result.dt == pytest.approx(PERIOD)   # the buffers went with the past
    assert runtime.counters["resets_requested"] == 1 and runtime.safety.counters["resets"] == 1
    assert runtime.summary()["resets_requested"] == 1 and any("reset requested" in line for line in logs)
    assert results[-1].t < t   # the clock did not jump: only the request reset anything
    after = runtime.tick(t + PERIOD)
    assert runtime.counters["resets_requested"] == 1 and after.dt == pytest.approx(PERIOD)


def test_dt_follows_the_real_spacing_of_ticks_and_is_clamped(torch_engine):
    runtime, engine, _ = make_runtime(torch_engine)
    times = T0 + np.cumsum([0.0, 0.008, 0.012, 0.01, 0.0002, 0.5, 0.01])
    dts = [runtime.tick(float(t)).dt for t in times]
    expected = [0.01, 0.008, 0.012, 0.01, 0.001, 0.1, 0.01]  # first tick: one period; clamps at 0.1 / 10 periods
    np.testing.assert_allclose(dts, expected, rtol=1e-9)
    np.testing.assert_allclose(engine.dts, expected, rtol=1e-6)  # float32 on the way in
    assert runtime.counters["dt_clamped_low"] == 1 and runtime.counters["dt_clamped_high"] == 1


def test_estop_and_enable_through_the_runtime(torch_engine):
    runtime, _, logs, sensors = warm(torch_engine, start_enabled=True)
    run(runtime, sensors, 10, T0)
    runtime.estop(True)
    runtime.estop(True)  # the topic repeats; logged once
    r = run(runtime, sensors, 1, T0 + 10 * PERIOD)[0]
    assert r.safety.estopped and r.safety.commanded
    np.testing.assert_array_equal(r.safety.command, np.zeros(7))
    assert runtime.set_enabled(True) == (False, "e-stop is still asserted")
    runtime.estop(False)
    assert run(runtime, sensors, 1, T0 + 11 * PERIOD)[0].safety.estopped
    statuses = {s.name: s for s in runtime.report()}
    assert statuses["mm_fusion: safety"].level == ERROR and "e-stop" in statuses["mm_fusion: safety"].message
    assert runtime.set_enabled(True)[0]
    r = run(runtime, sensors, 1, T0 + 12 * PERIOD)[0]
    assert not r.safety.estopped and np.abs(r.safety.command).max() <= 0.05 + 1e-12
    assert sum("e-stop asserted" in line for line in logs) == 1


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_a_failed_inference_commands_rest_and_keeps_ticking(torch_engine, failure):
    runtime, engine, logs, sensors = warm(torch_engine, start_enabled=True)
    run(runtime, sensors, 5, T0)
    engine.fail = failure
    failed = run(runtime, sensors, 3, T0 + 5 * PERIOD)
    for r in failed:
        assert r.safety.held and r.safety.commanded
        np.testing.assert_array_equal(r.safety.command, np.zeros(7))
    safety = {s.name: s for s in runtime.report()}["mm_fusion: safety"]
    assert safety.level == ERROR and "non-finite action" in safety.message
    assert runtime.safety.counters["nonfinite_action"] == 3
    if failure == "raise":
        assert runtime.counters["infer_errors"] == 3
        assert sum("inference failed" in line and "device lost" in line for line in logs) == 1
    engine.fail = None
    recovered = run(runtime, sensors, 1, T0 + 8 * PERIOD)[0]
    assert not recovered.safety.held and np.abs(recovered.safety.command).max() <= 0.05 + 1e-12


def test_report_levels(torch_engine):
    runtime, _, _, sensors = warm(torch_engine, start_enabled=True)
    statuses = runtime.report()
    assert [s.level for s in statuses][0] == WARN  # nothing ticked yet
    wall = 5000.0
    for r in run(runtime, sensors, 100, T0):
        # compute time fixed so the levels do not depend on this machine's load
        runtime.record(dataclasses.replace(r, compute_s=0.002), publish_s=0.0001, wall_start=wall)
        wall += PERIOD
    runtime.count_bad("camera.bad_encoding")
    cadence, inputs, safety = runtime.report()
    assert (cadence.level, inputs.level, safety.level) == (OK, WARN, OK)
    assert cadence.values["achieved_hz"] == "100.0" and cadence.values["stage.publish_ms"] == "0.100"
    assert "camera.bad_encoding 1" in inputs.message and inputs.values["drops.camera.bad_encoding"] == "1"
    assert inputs.values["imu.mask_rate"] == "0.000"
    # the next window: no new drops, all fresh
    for r in run(runtime, sensors, 10, T0 + 1.0):
        runtime.record(dataclasses.replace(r, compute_s=0.002), publish_s=0.0001, wall_start=wall)
        wall += PERIOD
    cadence, inputs, safety = runtime.report()
    assert (cadence.level, inputs.level, safety.level) == (OK, OK, OK)
    # too slow: 80 Hz achieved, and ticks over the 10 ms budget
    for i, r in enumerate(run(runtime, sensors, 100, T0 + 1.1)):
        runtime.record(dataclasses.replace(r, compute_s=0.02 if i % 10 == 0 else 0.002), 0.0001, wall)
        wall += 1 / 80
    cadence = runtime.report()[0]
    assert cadence.level == WARN
    assert "achieved" in cadence.message and "over the 10.0 ms budget" in cadence.message


def test_tick_status_names_the_stamps_used_and_is_deterministic(torch_engine):
    statuses = []
    for _ in range(2):
        runtime, _, _, sensors = warm(torch_engine)
        results = run(runtime, sensors, 5, T0)
        statuses.append([runtime.tick_status(r) for r in results])
    assert statuses[0] == statuses[1]
    last = statuses[0][-1]
    assert last.level == OK and last.values["t"] == f"{T0 + 4 * PERIOD:.9f}"
    # the newest camera frame at or before the tick: 30 Hz frames on a grid from T0 - 1.1
    assert float(last.values["camera.stamp"]) == pytest.approx(T0 + 1 / 30, abs=1e-9)
    assert float(last.values["lidar.stamp"]) == pytest.approx(T0, abs=1e-9)
    assert float(last.values["joint_state.stamp"]) == pytest.approx(T0 + 4 * PERIOD, abs=1e-9)   # 100 Hz, on time
    assert last.values["commanded"] == "False"  # starts disabled


def test_summary_is_json_and_counts_the_run(torch_engine):
    runtime, _, _, sensors = warm(torch_engine, start_enabled=True)
    sensors.stopped.add("audio")
    results = run(runtime, sensors, 40, T0)
    runtime.count_bad("imu.non_finite")
    runtime.count_bad("imu.non_finite")
    summary = json.loads(json.dumps(runtime.summary(), allow_nan=False))
    assert summary["ticks"] == 40
    audio_masked = sum(r.mask[MODALITIES.index("audio")] == 0 for r in results)
    assert summary["mask_rate"]["audio"] == pytest.approx(audio_masked / 40)
    assert summary["mask_rate"]["imu"] == 0.0 and summary["mask_rate"]["joint_state"] == 0.0
    assert summary["drops"]["imu.non_finite"] == 2
    assert summary["accepted"]["imu"] == runtime.aligner.counters["imu.accepted"]
    commands = np.array([r.safety.command for r in results])
    np.testing.assert_allclose(summary["action"]["command"]["max"], commands.max(axis=0))
    np.testing.assert_allclose(summary["action"]["raw"]["mean"],
                               np.mean([r.raw_action for r in results], axis=0), rtol=1e-6)
    assert summary["age_s"]["imu"]["max"] <= runtime.cfg.inputs.imu.max_age


def test_samples_and_bad_counts_from_other_threads(torch_engine):
    runtime, _, _, sensors = warm(torch_engine)
    sensors.stopped.add("imu")
    run(runtime, sensors, 1, T0 - 0.5)
    synthetic = SyntheticSensors(runtime.cfg.model, seed=2)

    def imu_thread():
        for i in range(400):
            stamp = T0 - 0.5 + i / 200
            row = synthetic.imu(stamp, n=1)[0]
            runtime.add(ImuSample(stamp, row[:3].copy(), row[3:].copy()), stamp)
            runtime.count_bad("imu.bad_frame")

    writer = threading.Thread(target=imu_thread)
    writer.start()
    for i in range(40):
        runtime.tick(T0 - 0.5 + (i + 1) * 0.05)
    writer.join()
    assert runtime.aligner.counters["imu.accepted"] == 400
    assert runtime.summary()["drops"]["imu.bad_frame"] == 400


def test_runtime_builds_its_engine_and_logs_the_backend():
    logs: list[str] = []
    runtime = Runtime(make_config(), log=logs.append)
    assert any("inference backend: torch" in line for line in logs)
    assert np.isfinite(runtime.tick(T0).raw_action).all()


# ---------------------------------------------------------------- issue #12


def test_a_checkpoint_loads_under_tightened_safety_limits_and_commands_stay_inside(tmp_path):
    checkpoint = tmp_path / "policy.pt"
    save_checkpoint(build_model(make_config().model, seed=5), checkpoint)
    lower, upper = (-0.02, -0.02, -0.02, -0.5, -0.02, -0.02, -0.02), (0.01,)
    cfg = dataclasses.replace(make_config(start_enabled=True, lower=lower, upper=upper), checkpoint=str(checkpoint))
    runtime = Runtime(cfg, log=lambda _: None)   # loads the checkpoint: the model config is unchanged
    sensors = Sensors(runtime, T0 - 1.1)
    results = run(runtime, sensors, 30, T0)
    raw = np.array([r.raw_action for r in results], np.float64)
    commands = np.array([r.safety.command for r in results])
    lo, hi = np.array(lower), np.full(7, 0.01)
    assert ((raw < lo) | (raw > hi)).any()            # the network did ask for more than the arm may get
    assert (commands >= lo).all() and (commands <= hi).all()
    assert runtime.safety.counters["clamped"] > 0
    # Limiting the arm through the model's output range instead would refuse the checkpoint.
    action = dataclasses.replace(cfg.model.action, upper=(0.01,) * 7)
    with pytest.raises(ConfigError, match="model.action.upper"):
        load_model(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, action=action)))


def test_rest_after_a_tick_that_raised_is_recorded_and_the_next_tick_ramps_from_it(torch_engine):
    runtime, engine, _, sensors = warm(torch_engine, start_enabled=True)
    engine.action = 0.8
    before = run(runtime, sensors, 20, T0)[-1]
    np.testing.assert_allclose(before.safety.command, np.full(7, 0.8), atol=1e-9)
    t = T0 + 20 * PERIOD
    sensors.until(t)
    aligner_tick = runtime.aligner.tick

    def broken(t, dt):
        raise RuntimeError("aligner broke")

    runtime.aligner.tick = broken
    with pytest.raises(RuntimeError, match="aligner broke"):
        runtime.tick(t)
    runtime.aligner.tick = aligner_tick
    rest = runtime.rest(t)          # what fusion_node publishes for the failed tick
    np.testing.assert_array_equal(rest.command, np.zeros(7))
    assert rest.commanded and rest.held and FAILED_REASON in rest.reasons
    after = run(runtime, sensors, 1, t + PERIOD)[0]
    assert not after.safety.held
    # one tick's change from rest (5 per second for 10 ms), not a jump back to the 0.8 before the failure
    assert np.abs(after.safety.command - rest.command).max() <= 5.0 * PERIOD + 1e-9
    assert runtime.summary()["safety"]["failed_ticks"] == 1


def test_a_tick_in_two_halves_is_the_same_tick_and_an_engine_failure_between_them_rests(torch_engine):
    """``begin_tick`` + the engine + ``complete_tick`` (what eval's lockstep batch does for each Runtime) gives
    what ``tick`` gives; an exception handed to ``complete_tick`` rests and is counted, as one raised inside."""
    whole, _, _, sensors_a = warm(torch_engine, start_enabled=True)
    halves, engine, logs, sensors_b = warm(torch_engine, start_enabled=True)
    for i in range(6):
        t = T0 + i * PERIOD
        sensors_a.until(t)
        sensors_b.until(t)
        a = whole.tick(t)
        pending = halves.begin_tick(t)
        b = halves.complete_tick(pending, engine.step(pending.prepared.inputs))   # the engine, run elsewhere
        np.testing.assert_array_equal(a.raw_action, b.raw_action)
        np.testing.assert_array_equal(a.safety.command, b.safety.command)
        np.testing.assert_array_equal(whole.stream.state, halves.stream.state)
    t = T0 + 6 * PERIOD
    sensors_b.until(t)
    failed = halves.complete_tick(halves.begin_tick(t), RuntimeError("batch lost"))
    assert failed.safety.held and not failed.safety.command.any()
    assert halves.counters["infer_errors"] == 1 and any("batch lost" in line for line in logs)
