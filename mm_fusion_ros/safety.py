"""What stands between the network and the arm: limits, rate limit, watchdog, e-stop, enable.

Pure logic, no clocks and no ROS, so the same filter runs live, in bag replay and
in tests. One call of :meth:`SafetyFilter.step` per control tick turns the
network's raw action into the command.

Per tick, the first rule that applies decides the command::

    e-stop latched                          -> rest                  (counted "estop")
    a required input stale or masked        -> hold per on_stale:    (counted "watchdog")
                                               rest ("zero") or the last output ("hold_last")
    a non-finite raw action                 -> rest                  (counted "nonfinite_action")
    otherwise: clamp into [lower, upper] per DOF                     (counted "clamped")
               then rate limit: |command - last output| <= max_delta (counted "rate_limited")
    commanded = enabled  (disabled: the same command is only a preview)

Every hold that applies is counted and named in ``reasons``, even when a
higher one decides the command.

"Rest" is zero velocity, clamped into the limits when zero lies outside them:
the filter never outputs a value outside [lower, upper], not even on e-stop.

Holds (rest or hold_last) are applied at once, not ramped: when the inputs or
the network cannot be trusted, moving on for several more ticks to ramp down is
worse than a stop, and the controller's own acceleration limits shape the stop.
The rate limiter works relative to the last value actually output, so after a
hold the network's action ramps up again from the held value.

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

``step``, ``estop``, ``set_enabled`` and ``reset`` may be called from different
threads; one lock serialises them, so an ``estop(True)`` that has returned is
seen by the next ``step``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .config import MODALITIES, RobotConfig

ESTOP_ASSERTED = "e-stop is still asserted"
NONFINITE_REASON = "non-finite action: holding at rest"


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
        action = cfg.model.action
        self.names = action.names
        self.dof = action.dof
        self.lower = np.asarray(action.lower, dtype=np.float64)
        self.upper = np.asarray(action.upper, dtype=np.float64)
        self.max_delta = np.asarray(cfg.safety.max_delta_per_dof(self.dof), dtype=np.float64)
        self.rest = np.clip(np.zeros(self.dof), self.lower, self.upper)
        self.on_stale = cfg.safety.on_stale
        self.required = tuple(cfg.inputs.required)
        self._required_index = tuple((name, MODALITIES.index(name)) for name in self.required)
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._enabled = cfg.safety.start_enabled
        self._estop_input = False
        self._latched = False
        self._stop_pending = False
        self._last = self.rest.copy()

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
            self._last = self.rest.copy()  # the arm is at rest: ramp up from there
            return True, "enabled; e-stop latch released" if was_latched else "enabled"

    def reset(self) -> None:
        """Restart the rate limiter from rest (the clock jumped back: the past command means nothing)."""
        with self._lock:
            self._last = self.rest.copy()
            self.counters["resets"] += 1

    # ------------------------------------------------------------ the control tick

    def step(self, raw_action: np.ndarray, mask: np.ndarray) -> SafetyOutput:
        """One tick: ``raw_action`` (dof,) from the network, ``mask`` (4,) in MODALITIES order (1 = fresh)."""
        raw = np.asarray(raw_action, dtype=np.float64)
        if raw.shape != (self.dof,):
            raise ValueError(f"raw action must have shape ({self.dof},) for {list(self.names)}, "
                             f"got {list(raw.shape)}")
        if len(mask) != len(MODALITIES):
            raise ValueError(f"mask must have {len(MODALITIES)} entries {list(MODALITIES)}, got {len(mask)}")
        stale = tuple(name for name, index in self._required_index if not mask[index] > 0.5)
        reasons: list[str] = []
        held = False
        with self._lock:
            # Holds first: when one applies, clamping and rate limiting the network's action is moot.
            finite = bool(np.isfinite(raw).all())
            if not finite:
                self.counters["nonfinite_action"] += 1
                reasons.append(NONFINITE_REASON)
            if stale:
                self.counters["watchdog"] += 1
                reasons.append(f"watchdog: stale {', '.join(stale)} ({self.on_stale})")
            if self._latched:
                self.counters["estop"] += 1
                reasons.append("e-stop latched")
            if self._latched:
                command, held = self.rest.copy(), True
            elif stale:
                command, held = (self.rest if self.on_stale == "zero" else self._last).copy(), True
            elif not finite:
                command, held = self.rest.copy(), True
            else:
                target = np.clip(raw, self.lower, self.upper)
                if (target != raw).any():
                    self.counters["clamped"] += 1
                    reasons.append("clamped to limits")
                command = np.clip(target, self._last - self.max_delta, self._last + self.max_delta)
                if (command != target).any():
                    self.counters["rate_limited"] += 1
                    reasons.append("rate-limited")
            commanded = self._enabled
            if self._stop_pending:
                # Just disabled: a forward command controller keeps the last command, so stop it once.
                self._stop_pending = False
                self.counters["disable_stops"] += 1
                reasons.append("disabled: stopping the arm")
                command, held, commanded = self.rest.copy(), True, True
            elif not commanded:
                reasons.append("disabled: preview only")
            self._last = command
            estopped = self._latched
        command.flags.writeable = False
        return SafetyOutput(command, commanded, held, estopped, stale, tuple(reasons))
