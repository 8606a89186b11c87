"""SafetyFilter: every rule with exact numbers (float64 arithmetic, so tolerances are at rounding level)."""

import dataclasses
import math

import numpy as np
import pytest

from mm_fusion_ros.config import MODALITIES, RobotConfig
from mm_fusion_ros.safety import DT_MAX_PERIODS, ESTOP_ASSERTED, FAILED_REASON, SafetyFilter

DOF = 7
ALL_FRESH = np.ones(len(MODALITIES), np.float32)
T0 = 100.0


class Ticking(SafetyFilter):
    """A SafetyFilter ticked once per control period from T0, as at a steady control rate."""

    def __init__(self, cfg: RobotConfig):
        super().__init__(cfg)
        self.t = T0

    def tick(self, raw, mask=ALL_FRESH):
        self.t += self.period
        return self.step(raw, mask, self.t)

    def fail(self):
        """A tick whose Runtime.tick raised: the caller asks for rest instead."""
        self.t += self.period
        return self.rest(self.t)


def make_filter(max_acceleration=(5.0,), on_stale="zero", start_enabled=True, lower=None, upper=None,
                required=("camera", "imu", "lidar", "joint_state"), rate_hz=100.0, hold_timeout_s=0.5) -> Ticking:
    """At 100 Hz a max_acceleration of 5.0 per second is 0.05 per tick."""
    cfg = RobotConfig()
    safety = dataclasses.replace(cfg.safety, max_acceleration=max_acceleration, on_stale=on_stale,
                                 start_enabled=start_enabled, hold_timeout_s=hold_timeout_s)
    if lower is not None:
        safety = dataclasses.replace(safety, lower=lower)
    if upper is not None:
        safety = dataclasses.replace(safety, upper=upper)
    cfg = dataclasses.replace(cfg, control_rate_hz=rate_hz, safety=safety,
                              inputs=dataclasses.replace(cfg.inputs, required=required))
    cfg.validate()
    return Ticking(cfg)


def masked(*names: str) -> np.ndarray:
    mask = ALL_FRESH.copy()
    for name in names:
        mask[MODALITIES.index(name)] = 0.0
    return mask


def full(value: float) -> np.ndarray:
    return np.full(DOF, value, np.float32)


def each(value: float) -> list[float]:
    """The expected command: the same float64 value on every DOF."""
    return [value] * DOF


def close(a, b) -> None:
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_clamp_into_per_dof_limits():
    sf = make_filter(max_acceleration=(1000.0,), lower=(-1.0, -0.5, -2.0, -1.0, -1.0, -1.0, -1.0),
                     upper=(1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 0.25))
    out = sf.tick(np.array([2.0, -3.0, 1.5, 0.5, -0.5, 0.0, 0.3], np.float32), ALL_FRESH)
    close(out.command, [1.0, -0.5, 1.5, 0.5, -0.5, 0.0, 0.25])
    assert out.command.dtype == np.float64 and out.commanded and not out.held
    assert "clamped to limits" in out.reasons
    assert sf.counters["clamped"] == 1
    inside = sf.tick(np.array([0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0], np.float32), ALL_FRESH)
    close(inside.command, [0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert inside.reasons == () and sf.counters["clamped"] == 1


def test_rate_limit_ramps_from_rest_by_max_acceleration_times_the_period():
    sf = make_filter(max_acceleration=(5.0,))
    commands = [sf.tick(full(1.0), ALL_FRESH).command[0] for _ in range(22)]
    close(commands[:4], [0.05, 0.10, 0.15, 0.20])
    close(commands[19:], [1.0, 1.0, 1.0])
    assert sf.counters["rate_limited"] == 19  # ticks 1..19; tick 20 reaches the target exactly
    # and down again, through zero, at the same rate
    down = [sf.tick(full(-1.0), ALL_FRESH).command[0] for _ in range(3)]
    close(down, [0.95, 0.90, 0.85])


def test_rate_limit_per_dof_values():
    deltas = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)     # per tick at 100 Hz
    sf = make_filter(max_acceleration=tuple(100 * d for d in deltas))
    first = sf.tick(full(-1.0), ALL_FRESH)
    close(first.command, -np.array(deltas))
    assert "rate-limited" in first.reasons
    second = sf.tick(np.array([0.0, 0.0, -0.05, -1.0, -1.0, 0.0, 0.0]), ALL_FRESH)
    # towards the target, at most one delta from the last output
    close(second.command, [0.0, 0.0, -0.05, -0.08, -0.10, 0.0, 0.0])


def test_nonfinite_action_is_never_passed_on():
    sf = make_filter(max_acceleration=(25.0,))
    sf.tick(full(1.0), ALL_FRESH)
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.5))
    for bad in (np.nan, np.inf, -np.inf):
        raw = full(0.5)
        raw[3] = bad
        out = sf.tick(raw, ALL_FRESH)
        close(out.command, np.zeros(DOF))  # hold: zero velocity, at once
        assert out.held and out.commanded and np.isfinite(out.command).all()
        assert "non-finite action: holding at rest" in out.reasons
    assert sf.counters["nonfinite_action"] == 3
    # the limiter starts again from the held value
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.25))


def test_watchdog_zero_names_the_stale_inputs():
    sf = make_filter(max_acceleration=(50.0,), on_stale="zero")
    sf.tick(full(1.0), ALL_FRESH)
    out = sf.tick(full(1.0), masked("lidar", "camera"))
    close(out.command, np.zeros(DOF))
    assert out.held and out.commanded and out.stale == ("camera", "lidar")
    assert any("watchdog" in r and "camera" in r and "lidar" in r for r in out.reasons)
    assert sf.counters["watchdog"] == 1
    # audio is not required: masking it does not hold the action
    free = sf.tick(full(1.0), masked("audio"))
    assert not free.held and free.stale == ()
    close(free.command, each(0.5))
    # the arm's own joint state is required (the default): a command without it is not trusted
    blind = sf.tick(full(1.0), masked("joint_state"))
    close(blind.command, np.zeros(DOF))
    assert blind.held and blind.stale == ("joint_state",)


def test_watchdog_zero_is_clamped_into_limits_when_zero_is_outside():
    sf = make_filter(max_acceleration=(100.0,), lower=(0.2,) * 7, upper=(1.0,) * 7)
    close(sf.tick(full(0.9), masked("imu")).command, each(0.2))


def test_watchdog_hold_last_keeps_the_last_output():
    sf = make_filter(max_acceleration=(5.0,), on_stale="hold_last")
    for _ in range(3):
        sf.tick(full(1.0), ALL_FRESH)
    for _ in range(2):
        out = sf.tick(full(-1.0), masked("imu"))
        close(out.command, each(0.15))
        assert out.held and out.stale == ("imu",)
        assert any("imu" in r and "hold_last" in r for r in out.reasons)
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.20))


def test_the_first_hold_decides_and_every_hold_is_counted():
    sf = make_filter(max_acceleration=(10.0,), on_stale="hold_last")
    sf.tick(full(1.0), ALL_FRESH)
    nan = full(np.nan)
    out = sf.tick(nan, masked("camera"))  # hold_last outranks the non-finite hold at rest
    close(out.command, each(0.1))
    assert out.reasons == ("non-finite action: holding at rest", "watchdog: stale camera (hold_last)")
    sf.estop(True)
    out = sf.tick(nan, masked("camera"))  # the e-stop outranks both
    close(out.command, np.zeros(DOF))
    assert out.reasons == ("non-finite action: holding at rest", "watchdog: stale camera (hold_last)",
                           "e-stop latched")
    assert (sf.counters["nonfinite_action"], sf.counters["watchdog"], sf.counters["estop"]) == (2, 2, 1)
    assert sf.counters["clamped"] == 0 and sf.counters["rate_limited"] == 1  # only the first, live tick


def test_estop_latches_within_one_tick_and_survives_release():
    sf = make_filter(max_acceleration=(30.0,))
    sf.tick(full(1.0), ALL_FRESH)
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.6))
    sf.estop(True)
    out = sf.tick(full(1.0), ALL_FRESH)
    close(out.command, np.zeros(DOF))  # immediate, not ramped down by 0.3 per tick
    assert out.estopped and out.held and out.commanded and "e-stop latched" in out.reasons
    sf.estop(False)
    for _ in range(3):
        later = sf.tick(full(1.0), ALL_FRESH)
        close(later.command, np.zeros(DOF))
        assert later.estopped and later.commanded
    assert sf.counters["estop"] == 4 and sf.latched and not sf.estop_input


def test_enable_refused_while_estop_asserted_then_ramps_from_zero():
    sf = make_filter(max_acceleration=(5.0,))
    sf.estop(True)
    assert sf.set_enabled(True) == (False, ESTOP_ASSERTED)
    assert sf.latched
    close(sf.tick(full(1.0), ALL_FRESH).command, np.zeros(DOF))
    sf.estop(False)
    accepted, message = sf.set_enabled(True)
    assert accepted and "released" in message and not sf.latched
    ramp = [sf.tick(full(1.0), ALL_FRESH) for _ in range(2)]
    close([r.command[0] for r in ramp], [0.05, 0.10])
    assert not ramp[0].estopped and ramp[0].commanded


def test_disabled_is_a_preview_and_enable_restarts_the_ramp_from_rest():
    sf = make_filter(max_acceleration=(5.0,), start_enabled=False)
    assert not sf.enabled
    previews = [sf.tick(full(1.0), ALL_FRESH) for _ in range(3)]
    assert not any(p.commanded for p in previews)
    close([p.command[0] for p in previews], [0.05, 0.10, 0.15])  # computed as if live
    assert "disabled: preview only" in previews[0].reasons
    # a latched e-stop is previewed too, and never commanded while disabled
    assert sf.set_enabled(True) == (True, "enabled")
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.05))  # from rest, not from the preview's 0.15


def test_disable_commands_one_stop_then_previews():
    sf = make_filter(max_acceleration=(50.0,))
    sf.tick(full(1.0), ALL_FRESH)
    assert sf.set_enabled(False) == (True, "disabled: preview only")
    stop = sf.tick(full(1.0), ALL_FRESH)
    assert stop.commanded and stop.held
    close(stop.command, np.zeros(DOF))
    preview = sf.tick(full(1.0), ALL_FRESH)
    assert not preview.commanded
    close(preview.command, each(0.5))
    assert sf.counters["disable_stops"] == 1


def test_enable_twice_does_not_restart_the_ramp():
    sf = make_filter(max_acceleration=(5.0,))
    sf.tick(full(1.0), ALL_FRESH)
    sf.tick(full(1.0), ALL_FRESH)
    assert sf.set_enabled(True) == (True, "already enabled")
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.15))


def test_reset_restarts_the_rate_limiter_from_rest():
    sf = make_filter(max_acceleration=(5.0,))
    for _ in range(4):
        sf.tick(full(1.0), ALL_FRESH)
    sf.reset()
    close(sf.tick(full(1.0), ALL_FRESH).command, each(0.05))
    assert sf.counters["resets"] == 1


def test_command_is_read_only_and_bad_shapes_are_refused():
    sf = make_filter()
    out = sf.tick(full(0.01), ALL_FRESH)
    with pytest.raises(ValueError):
        out.command[0] = 5.0
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        sf.tick(np.zeros(6, np.float32), ALL_FRESH)
    with pytest.raises(ValueError, match=f"mask must have {len(MODALITIES)}"):
        sf.tick(full(0.0), np.ones(3, np.float32))
    with pytest.raises(ValueError, match="finite"):
        sf.step(full(0.0), ALL_FRESH, math.nan)


# ---------------------------------------------------------------- issue #12: safety in physical units


def test_limits_are_the_safety_sections_not_the_models_output_range():
    # model.action.lower/upper stay at the default +-1: only safety.lower/upper decide what the arm gets.
    sf = make_filter(max_acceleration=(1000.0,), lower=(-0.3,), upper=(0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.5))
    assert sf.lower.tolist() == [-0.3] * 7 and sf.upper.tolist() == [0.2] * 6 + [0.5]
    close(sf.tick(full(0.9)).command, [0.2] * 6 + [0.5])
    close(sf.tick(full(-0.9)).command, each(-0.3))


@pytest.mark.parametrize("rate_hz", [50.0, 200.0])
def test_the_same_acceleration_at_any_control_rate(rate_hz):
    """5 action units per second: 0.1 per tick at 50 Hz, 0.025 at 200 Hz; the command at a given time
    after the ramp began is the same (per tick, 50 Hz would ramp at half and 200 Hz at twice the rate)."""
    sf = make_filter(max_acceleration=(5.0,), rate_hz=rate_hz)
    ticks = int(rate_hz * 0.3)   # 0.3 s
    commands = np.array([sf.tick(full(1.0)).command[0] for _ in range(ticks)])
    elapsed = (np.arange(ticks) + 1) / rate_hz     # the first tick is given one period from rest
    np.testing.assert_allclose(commands, np.minimum(5.0 * elapsed, 1.0), rtol=0, atol=1e-9)
    # 0.1 s in, the command is 0.5 at either rate; and it reaches 1.0 after 0.2 s
    assert commands[round(0.1 * rate_hz) - 1] == pytest.approx(0.5, abs=1e-9)
    assert commands[round(0.2 * rate_hz) - 1] == pytest.approx(1.0, abs=1e-9)


def test_rate_limit_uses_the_real_time_of_each_tick_bounded():
    sf = make_filter(max_acceleration=(5.0,))          # 100 Hz
    times = T0 + np.array([0.0, 0.01, 0.015, 0.035, 0.035, 1.035])
    commands = [sf.step(full(1.0), ALL_FRESH, float(t)).command[0] for t in times]
    steps = np.diff([0.0] + commands)
    np.testing.assert_allclose(steps, [0.05,           # first tick: one period from rest
                                       0.05,           # 10 ms
                                       0.025,          # 5 ms: a tick early is given less
                                       0.1,            # 20 ms: a late tick catches up
                                       0.0,            # two ticks at one time: no time, no change
                                       5.0 * DT_MAX_PERIODS * 0.01],  # a 1 s stall: bounded, no jump
                               rtol=0, atol=1e-9)


def test_hold_last_goes_to_rest_after_hold_timeout():
    # 64 Hz: tick times are exact in binary, so the timeout falls on a tick without rounding doubt.
    sf = make_filter(max_acceleration=(3.2,), on_stale="hold_last", rate_hz=64.0, hold_timeout_s=0.25)
    for _ in range(4):
        sf.tick(full(1.0))                              # 0.05 per tick -> 0.2
    first_stale = sf.t + sf.period
    held = [sf.tick(full(1.0), masked("lidar")) for _ in range(16)]   # 16 ticks = 0.25 s - one period
    assert all(h.held and h.commanded for h in held)
    close([h.command[0] for h in held], [0.2] * 16)
    assert sf.counters["hold_timeout"] == 0
    timed_out = sf.tick(full(1.0), masked("lidar"))
    assert sf.t - first_stale == 0.25
    close(timed_out.command, np.zeros(DOF))
    assert timed_out.held and timed_out.stale == ("lidar",)
    assert "watchdog: held for 0.25 s: at rest" in timed_out.reasons
    close(sf.tick(full(1.0), masked("lidar")).command, np.zeros(DOF))   # and stays at rest
    assert sf.counters["hold_timeout"] == 2
    # fresh again: the ramp starts from rest, not from the 0.2 held before
    close(sf.tick(full(1.0)).command, each(0.05))
    # a new stale spell gets a whole timeout of its own
    again = [sf.tick(full(1.0), masked("imu")) for _ in range(16)]
    close([a.command[0] for a in again], [0.05] * 16)


def test_rest_after_a_failed_tick_is_recorded_so_the_next_tick_ramps_from_rest():
    sf = make_filter(max_acceleration=(5.0,))
    for _ in range(10):
        before = sf.tick(full(1.0))
    close(before.command, each(0.5))
    out = sf.fail()
    close(out.command, np.zeros(DOF))
    assert out.held and out.commanded and out.reasons == (FAILED_REASON,)
    assert not out.command.flags.writeable and sf.counters["failed_ticks"] == 1
    after = sf.tick(full(1.0))
    # from rest by one tick's change, never back to the 0.5 from before the failure
    assert np.abs(after.command - out.command).max() <= 5.0 * sf.period + 1e-12
    close(after.command, each(0.05))


def test_rest_follows_enable_estop_and_survives_an_unusable_tick_time():
    sf = make_filter(max_acceleration=(5.0,), lower=(0.1,), upper=(1.0,))
    out = sf.rest(math.nan)                 # the tick may have failed because of its time
    close(out.command, each(0.1))           # rest is clamped into the limits, as everywhere
    close(sf.tick(full(1.0)).command, each(0.15))   # no usable time was recorded: one period, from rest
    sf.estop(True)
    latched = sf.fail()
    assert latched.estopped and latched.commanded and "e-stop latched" in latched.reasons
    sf.estop(False)
    assert sf.set_enabled(True)[0]
    assert sf.set_enabled(False)[0]
    stop = sf.fail()                        # just disabled: the arm is still told to stop, once
    assert stop.commanded and "disabled: stopping the arm" in stop.reasons
    preview = sf.fail()
    assert not preview.commanded and "disabled: preview only" in preview.reasons
    close(preview.command, each(0.1))
