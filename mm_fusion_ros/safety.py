"""What stands between the network and the arm: limits, rate limit, watchdog, e-stop, enable.

Pure logic, no clocks and no ROS, so the same filter runs live, in bag replay and
in tests. One call of :meth:`SafetyFilter.step` per control tick turns the
network's raw action into the command; a tick that failed before it got that
far calls :meth:`SafetyFilter.rest` instead. Both take the tick time, which the
rate limit and the hold timeout are measured on.

Per tick, the first rule that applies decides the command::

    e-stop latched                          -> rest                  (counted "estop")
    a required input stale or masked        -> hold per on_stale:    (counted "watchdog")
                                               rest ("zero") or the last output ("hold_last"),
                                               rest once hold_last has held hold_timeout_s
                                                                     (counted "hold_timeout")
    a non-finite raw action                 -> rest                  (counted "nonfinite_action")
    otherwise: clamp into safety [lower, upper] per DOF              (counted "clamped")
               then rate limit: |command - last output| <= max_acceleration * dt
                                                                     (counted "rate_limited")
    commanded = enabled  (disabled: the same command is only a preview)

Every hold that applies is counted and named in ``reasons``, even when a
higher one decides the command.

The limits are ``safety.lower``/``safety.upper``, not the network's output range
(``model.action.lower``/``upper``): what the arm may get is set here, without
touching the model. "Rest" is zero velocity, clamped into the limits when zero
lies outside them: the filter never outputs a value outside [lower, upper], not
even on e-stop.

The rate limit is an acceleration (action units per second): dt is the time
since the previous tick, at most ``DT_MAX_PERIODS`` control periods (a stalled
loop must not license a jump) and one period on the first tick and after a
reset. Two ticks at one time give the rate limit nothing to move the command by.

Holds (rest or hold_last) are applied at once, not ramped: when the inputs or
the network cannot be trusted, moving on for several more ticks to ramp down is
worse than a stop, and the controller's own acceleration limits shape the stop.
hold_last trades that for smoothness only for ``hold_timeout_s`` after the first
stale tick; after that it is rest, as with ``zero``. The rate limiter works
relative to the last value actually output (rest after a failed tick, too), so
after a hold the network's action ramps up again from the held value.

State machine (``enabled``, the e-stop input, the e-stop latch)::

    DISABLED --set_enabled(True)--> ENABLED   refused while the e-stop input is true;
                                              releases the latch; the rate limiter
                                              restarts from rest, so the command ramps up
    ENABLED --set_enabled(False)--> DISABLED  the next tick still commands rest once
                                              (a forward command controller would
                                              otherwise keep the last velocity), then
                                              preview only
    any     --estop(True)---------> latched   rest from the very next tick, commanded
                                              while enabled so the controller stops
    latched --estop(False)--------> latched   releasing the button is not enough;
                                              only set_enabled(True) unlatches

Disabled is a dry run: everything above is computed and reported as a preview
(``commanded`` False) and nothing goes to the arm. The node starts disabled
unless ``safety.start_enabled``.

``step``, ``rest``, ``estop``, ``set_enabled`` and ``reset`` may be called from
different threads; one lock serialises them, so an ``estop(True)`` that has
returned is seen by the next ``step``.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .config import MODALITIES, RobotConfig, SafetyConfig

ESTOP_ASSERTED = "e-stop is still asserted"
NONFINITE_REASON = "non-finite action: holding at rest"
FAILED_REASON = "tick failed: holding at rest"
# The longest dt the rate limit is given, in control periods: a late tick may catch up on one
# period, but a stall (a GC pause, a paused simulation) must not let the command jump.
DT_MAX_PERIODS = 2.0


@dataclass(frozen=True)
class SafetyOutput:
    command: np.ndarray          # float64 (dof,), read-only; within the limits
    commanded: bool              # True: publish on the command topics; False: preview only
    held: bool                   # the network's action was replaced by a hold this tick
    estopped: bool               # the e-stop latch is set
    stale: tuple[str, ...]       # required inputs that were stale or masked this tick
    reasons: tuple[str, ...]     # why the command differs from the raw action (empty: it does not)


class SafetyFilter:
    def __init__(self, cfg: RobotConfig):
        action, safety = cfg.model.action, cfg.safety
        self.names = action.names
        self.dof = action.dof
        self.lower = np.asarray(safety.per_dof("lower", self.dof), dtype=np.float64)
        self.upper = np.asarray(safety.per_dof("upper", self.dof), dtype=np.float64)
        self.max_acceleration = np.asarray(safety.per_dof("max_acceleration", self.dof), dtype=np.float64)
        self.rest_command = np.clip(np.zeros(self.dof), self.lower, self.upper)
        self.rest_command.flags.writeable = False
        self.on_stale = safety.on_stale
        self.hold_timeout_s = safety.hold_timeout_s
        self.period = 1.0 / cfg.control_rate_hz
        self.required = tuple(cfg.inputs.required)
        self._required_index = tuple((name, MODALITIES.index(name)) for name in self.required)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._enabled = safety.start_enabled
        self._estop_input = False
        self._latched = False
        self._stop_pending = False
        self._last = self.rest_command.copy()
        self._last_t: float | None = None      # time of the previous tick (None: first tick, or reset)
        self._stale_since: float | None = None  # first tick of the current watchdog hold

    # ------------------------------------------------------------ state, from any thread

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def estop_input(self) -> bool:
        return self._estop_input

    @property
    def latched(self) -> bool:
        return self._latched

    def estop(self, active: bool) -> None:
        """The e-stop input. True latches rest output from the next tick; False releases only the input."""
        with self._lock:
            self._estop_input = bool(active)
            if active:
                self._latched = True

    def set_enabled(self, enabled: bool) -> tuple[bool, str]:
        """Enable (command the arm) or disable (preview only). Returns (accepted, message)."""
        with self._lock:
            if not enabled:
                if self._enabled:
                    self._stop_pending = True
                self._enabled = False
                return True, "disabled: preview only"
            if self._estop_input:
                return False, ESTOP_ASSERTED
            if self._enabled and not self._latched:
                return True, "already enabled"
            was_latched = self._latched
            self._enabled = True
            self._latched = False
            self._stop_pending = False
            self._last = self.rest_command.copy()  # the arm is at rest: ramp up from there
            return True, "enabled; e-stop latch released" if was_latched else "enabled"

    def configure(self, safety: "SafetyConfig") -> None:
        """New limits, acceleration, on_stale and hold timeout, from the next tick on (fusion_node's run-time
        parameters; validated by the caller). The last output is clamped into the new limits, so a tighter
        limit holds from the very next command."""
        with self._lock:
            self.lower = np.asarray(safety.per_dof("lower", self.dof), dtype=np.float64)
            self.upper = np.asarray(safety.per_dof("upper", self.dof), dtype=np.float64)
            self.max_acceleration = np.asarray(safety.per_dof("max_acceleration", self.dof), dtype=np.float64)
            rest = np.clip(np.zeros(self.dof), self.lower, self.upper)
            rest.flags.writeable = False
            self.rest_command = rest
            self.on_stale = safety.on_stale
            self.hold_timeout_s = safety.hold_timeout_s
            self._last = np.clip(self._last, self.lower, self.upper)

    def reset(self) -> None:
        """Restart the rate limiter from rest (the clock jumped back: the past command and times mean nothing)."""
        with self._lock:
            self._last = self.rest_command.copy()
            self._last_t = None
            self._stale_since = None
            self.counters["resets"] += 1

    # ------------------------------------------------------------ the control tick

    def step(self, raw_action: np.ndarray, mask: np.ndarray, t: float) -> SafetyOutput:
        """One tick at time ``t`` (s): ``raw_action`` (dof,) from the network, ``mask`` (4,) in MODALITIES
        order (1 = fresh)."""
        raw = np.asarray(raw_action, dtype=np.float64)
        if raw.shape != (self.dof,):
            raise ValueError(f"raw action must have shape ({self.dof},) for {list(self.names)}, "
                             f"got {list(raw.shape)}")
        if len(mask) != len(MODALITIES):
            raise ValueError(f"mask must have {len(MODALITIES)} entries {list(MODALITIES)}, got {len(mask)}")
        if not math.isfinite(t):
            raise ValueError(f"tick time must be a finite number of seconds, got {t}")
        stale = tuple(name for name, index in self._required_index if not mask[index] > 0.5)
        reasons: list[str] = []
        held = False
        with self._lock:
            max_step = self.max_acceleration * self._dt(t)
            # Holds first: when one applies, clamping and rate limiting the network's action is moot.
            finite = bool(np.isfinite(raw).all())
            if not finite:
                self.counters["nonfinite_action"] += 1
                reasons.append(NONFINITE_REASON)
            timed_out = False
            if stale:
                self.counters["watchdog"] += 1
                reasons.append(f"watchdog: stale {', '.join(stale)} ({self.on_stale})")
                if self._stale_since is None:
                    self._stale_since = t
                if self.on_stale == "hold_last" and t - self._stale_since >= self.hold_timeout_s:
                    timed_out = True
                    self.counters["hold_timeout"] += 1
                    reasons.append(f"watchdog: held for {self.hold_timeout_s:g} s: at rest")
            else:
                self._stale_since = None
            if self._latched:
                self.counters["estop"] += 1
                reasons.append("e-stop latched")
            if self._latched:
                command, held = self.rest_command.copy(), True
            elif stale:
                keep_last = self.on_stale == "hold_last" and not timed_out
                command, held = (self._last if keep_last else self.rest_command).copy(), True
            elif not finite:
                command, held = self.rest_command.copy(), True
            else:
                target = np.clip(raw, self.lower, self.upper)
                if (target != raw).any():
                    self.counters["clamped"] += 1
                    reasons.append("clamped to limits")
                command = np.clip(target, self._last - max_step, self._last + max_step)
                if (command != target).any():
                    self.counters["rate_limited"] += 1
                    reasons.append("rate-limited")
            return self._output(command, held, stale, reasons)

    def rest(self, t: float) -> SafetyOutput:
        """The output of a tick that failed before it reached :meth:`step` (``t`` its time, possibly unusable).

        Rest, at once, as for a non-finite action, and recorded as the last output: the next good
        tick ramps up from rest instead of jumping back to the command from before the failure.
        Commanded while enabled (the controller must be told to stop), a preview while disabled.
        """
        with self._lock:
            if math.isfinite(t):   # an unusable tick time (maybe why the tick failed) keeps the old one
                self._dt(t)
            self.counters["failed_ticks"] += 1
            reasons = [FAILED_REASON]
            if self._latched:
                reasons.append("e-stop latched")
            return self._output(self.rest_command.copy(), True, (), reasons)

    def _dt(self, t: float) -> float:
        """Seconds the rate limit may use for the tick at ``t``; called with the lock held."""
        last, self._last_t = self._last_t, t
        if last is None or t < last:
            return self.period   # the first tick (from rest), or a clock that went back
        return min(t - last, DT_MAX_PERIODS * self.period)

    def _output(self, command: np.ndarray, held: bool, stale: tuple[str, ...], reasons: list[str]) -> SafetyOutput:
        """Apply enable/disable to the tick's command and record it as the last output (lock held)."""
        commanded = self._enabled
        if self._stop_pending:
            # Just disabled: a forward command controller keeps the last command, so stop it once.
            self._stop_pending = False
            self.counters["disable_stops"] += 1
            reasons.append("disabled: stopping the arm")
            command, held, commanded = self.rest_command.copy(), True, True
        elif not commanded:
            reasons.append("disabled: preview only")
        self._last = command
        command = command.copy()
        command.flags.writeable = False
        return SafetyOutput(command, commanded, held, self._latched, stale, tuple(reasons))
