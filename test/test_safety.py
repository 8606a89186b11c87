"""SafetyFilter: every rule with exact numbers (float64 arithmetic, so tolerances are at rounding level)."""

import dataclasses

import numpy as np
import pytest

from mm_fusion_ros.config import MODALITIES, RobotConfig
from mm_fusion_ros.safety import ESTOP_ASSERTED, SafetyFilter

DOF = 7
ALL_FRESH = np.ones(len(MODALITIES), np.float32)


def make_filter(max_delta=(0.05,), on_stale="zero", start_enabled=True, lower=None, upper=None,
                required=("camera", "imu", "lidar")) -> SafetyFilter:
    cfg = RobotConfig()
    action = cfg.model.action
    if lower is not None or upper is not None:
        action = dataclasses.replace(action, lower=lower or action.lower, upper=upper or action.upper)
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, action=action),
        safety=dataclasses.replace(cfg.safety, max_delta=max_delta, on_stale=on_stale, start_enabled=start_enabled),
        inputs=dataclasses.replace(cfg.inputs, required=required))
    cfg.validate()
    return SafetyFilter(cfg)


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
    sf = make_filter(max_delta=(10.0,), lower=(-1.0, -0.5, -2.0, -1.0, -1.0, -1.0, -1.0),
                     upper=(1.0, 0.5, 2.0, 1.0, 1.0, 1.0, 0.25))
    out = sf.step(np.array([2.0, -3.0, 1.5, 0.5, -0.5, 0.0, 0.3], np.float32), ALL_FRESH)
    close(out.command, [1.0, -0.5, 1.5, 0.5, -0.5, 0.0, 0.25])
    assert out.command.dtype == np.float64 and out.commanded and not out.held
    assert "clamped to limits" in out.reasons
    assert sf.counters["clamped"] == 1
    inside = sf.step(np.array([0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0], np.float32), ALL_FRESH)
    close(inside.command, [0.5, 0.25, 1.0, 0.0, 0.0, 0.0, 0.0])
    assert inside.reasons == () and sf.counters["clamped"] == 1


def test_rate_limit_ramps_from_rest_by_max_delta_per_tick():
    sf = make_filter(max_delta=(0.05,))
    commands = [sf.step(full(1.0), ALL_FRESH).command[0] for _ in range(22)]
    close(commands[:4], [0.05, 0.10, 0.15, 0.20])
    close(commands[19:], [1.0, 1.0, 1.0])
    assert sf.counters["rate_limited"] == 19  # ticks 1..19; tick 20 reaches the target exactly
    # and down again, through zero, at the same rate
    down = [sf.step(full(-1.0), ALL_FRESH).command[0] for _ in range(3)]
    close(down, [0.95, 0.90, 0.85])


def test_rate_limit_per_dof_values():
    deltas = (0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07)
    sf = make_filter(max_delta=deltas)
    first = sf.step(full(-1.0), ALL_FRESH)
    close(first.command, -np.array(deltas))
    assert "rate-limited" in first.reasons
    second = sf.step(np.array([0.0, 0.0, -0.05, -1.0, -1.0, 0.0, 0.0]), ALL_FRESH)
    # towards the target, at most one delta from the last output
    close(second.command, [0.0, 0.0, -0.05, -0.08, -0.10, 0.0, 0.0])


def test_nonfinite_action_is_never_passed_on():
    sf = make_filter(max_delta=(0.25,))
    sf.step(full(1.0), ALL_FRESH)
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.5))
    for bad in (np.nan, np.inf, -np.inf):
        raw = full(0.5)
        raw[3] = bad
        out = sf.step(raw, ALL_FRESH)
        close(out.command, np.zeros(DOF))  # hold: zero velocity, at once
        assert out.held and out.commanded and np.isfinite(out.command).all()
        assert "non-finite action: holding at rest" in out.reasons
    assert sf.counters["nonfinite_action"] == 3
    # the limiter starts again from the held value
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.25))


def test_watchdog_zero_names_the_stale_inputs():
    sf = make_filter(max_delta=(0.5,), on_stale="zero")
    sf.step(full(1.0), ALL_FRESH)
    out = sf.step(full(1.0), masked("lidar", "camera"))
    close(out.command, np.zeros(DOF))
    assert out.held and out.commanded and out.stale == ("camera", "lidar")
    assert any("watchdog" in r and "camera" in r and "lidar" in r for r in out.reasons)
    assert sf.counters["watchdog"] == 1
    # audio is not required: masking it does not hold the action
    free = sf.step(full(1.0), masked("audio"))
    assert not free.held and free.stale == ()
    close(free.command, each(0.5))


def test_watchdog_zero_is_clamped_into_limits_when_zero_is_outside():
    sf = make_filter(max_delta=(1.0,), lower=(0.2,) * 7, upper=(1.0,) * 7)
    close(sf.step(full(0.9), masked("imu")).command, each(0.2))


def test_watchdog_hold_last_keeps_the_last_output():
    sf = make_filter(max_delta=(0.05,), on_stale="hold_last")
    for _ in range(3):
        sf.step(full(1.0), ALL_FRESH)
    for _ in range(2):
        out = sf.step(full(-1.0), masked("imu"))
        close(out.command, each(0.15))
        assert out.held and out.stale == ("imu",)
        assert any("imu" in r and "hold_last" in r for r in out.reasons)
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.20))


def test_the_first_hold_decides_and_every_hold_is_counted():
    sf = make_filter(max_delta=(0.1,), on_stale="hold_last")
    sf.step(full(1.0), ALL_FRESH)
    nan = full(np.nan)
    out = sf.step(nan, masked("camera"))  # hold_last outranks the non-finite hold at rest
    close(out.command, each(0.1))
    assert out.reasons == ("non-finite action: holding at rest", "watchdog: stale camera (hold_last)")
    sf.estop(True)
    out = sf.step(nan, masked("camera"))  # the e-stop outranks both
    close(out.command, np.zeros(DOF))
    assert out.reasons == ("non-finite action: holding at rest", "watchdog: stale camera (hold_last)",
                           "e-stop latched")
    assert (sf.counters["nonfinite_action"], sf.counters["watchdog"], sf.counters["estop"]) == (2, 2, 1)
    assert sf.counters["clamped"] == 0 and sf.counters["rate_limited"] == 1  # only the first, live tick


def test_estop_latches_within_one_tick_and_survives_release():
    sf = make_filter(max_delta=(0.3,))
    sf.step(full(1.0), ALL_FRESH)
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.6))
    sf.estop(True)
    out = sf.step(full(1.0), ALL_FRESH)
    close(out.command, np.zeros(DOF))  # immediate, not ramped down by 0.3 per tick
    assert out.estopped and out.held and out.commanded and "e-stop latched" in out.reasons
    sf.estop(False)
    for _ in range(3):
        later = sf.step(full(1.0), ALL_FRESH)
        close(later.command, np.zeros(DOF))
        assert later.estopped and later.commanded
    assert sf.counters["estop"] == 4 and sf.latched and not sf.estop_input


def test_enable_refused_while_estop_asserted_then_ramps_from_zero():
    sf = make_filter(max_delta=(0.05,))
    sf.estop(True)
    assert sf.set_enabled(True) == (False, ESTOP_ASSERTED)
    assert sf.latched
    close(sf.step(full(1.0), ALL_FRESH).command, np.zeros(DOF))
    sf.estop(False)
    accepted, message = sf.set_enabled(True)
    assert accepted and "released" in message and not sf.latched
    ramp = [sf.step(full(1.0), ALL_FRESH) for _ in range(2)]
    close([r.command[0] for r in ramp], [0.05, 0.10])
    assert not ramp[0].estopped and ramp[0].commanded


def test_disabled_is_a_preview_and_enable_restarts_the_ramp_from_rest():
    sf = make_filter(max_delta=(0.05,), start_enabled=False)
    assert not sf.enabled
    previews = [sf.step(full(1.0), ALL_FRESH) for _ in range(3)]
    assert not any(p.commanded for p in previews)
    close([p.command[0] for p in previews], [0.05, 0.10, 0.15])  # computed as if live
    assert "disabled: preview only" in previews[0].reasons
    # a latched e-stop is previewed too, and never commanded while disabled
    assert sf.set_enabled(True) == (True, "enabled")
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.05))  # from rest, not from the preview's 0.15


def test_disable_commands_one_stop_then_previews():
    sf = make_filter(max_delta=(0.5,))
    sf.step(full(1.0), ALL_FRESH)
    assert sf.set_enabled(False) == (True, "disabled: preview only")
    stop = sf.step(full(1.0), ALL_FRESH)
    assert stop.commanded and stop.held
    close(stop.command, np.zeros(DOF))
    preview = sf.step(full(1.0), ALL_FRESH)
    assert not preview.commanded
    close(preview.command, each(0.5))
    assert sf.counters["disable_stops"] == 1


def test_enable_twice_does_not_restart_the_ramp():
    sf = make_filter(max_delta=(0.05,))
    sf.step(full(1.0), ALL_FRESH)
    sf.step(full(1.0), ALL_FRESH)
    assert sf.set_enabled(True) == (True, "already enabled")
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.15))


def test_reset_restarts_the_rate_limiter_from_rest():
    sf = make_filter(max_delta=(0.05,))
    for _ in range(4):
        sf.step(full(1.0), ALL_FRESH)
    sf.reset()
    close(sf.step(full(1.0), ALL_FRESH).command, each(0.05))
    assert sf.counters["resets"] == 1


def test_command_is_read_only_and_bad_shapes_are_refused():
    sf = make_filter()
    out = sf.step(full(0.01), ALL_FRESH)
    with pytest.raises(ValueError):
        out.command[0] = 5.0
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        sf.step(np.zeros(6, np.float32), ALL_FRESH)
    with pytest.raises(ValueError, match="mask must have 4"):
        sf.step(full(0.0), np.ones(3, np.float32))
