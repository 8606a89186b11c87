"""The control tick without ROS: align -> infer -> safety, and what the diagnostics say about it.

The live node, bag replay and the demo/training loops all drive this one class,
so a model that scored well in replay runs exactly this code on the arm. The
caller owns the clock: ``tick(t)`` takes the tick time (the ROS clock live, the
bag's clock in replay) and ``record`` takes the caller's monotonic wall-clock
start of the tick, which is what the achieved rate is measured on.

Threads: ``add``, ``count_bad``, ``estop`` and ``set_enabled`` may run in
subscription or service callbacks while ``tick`` and ``record`` run on the
control thread; ``report``, ``summary`` and ``log_line`` may run on either.
``tick`` does no logging except on a clock jump or a failed inference, and
allocates nothing beyond a few small arrays. A failed inference is not raised:
the tick commands rest, because a dead control loop would leave the arm on its
last command. When ``tick`` itself raises, the caller publishes ``rest(t)``
(on the control thread too), which the safety filter records as its last output.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .align import Aligner
from .cadence import CadenceMonitor, CadenceReport
from .config import MODALITIES, ConfigError, RobotConfig, SafetyConfig
from .engine import Engine, create_engine
from .engine.stream import FusionStream, PreparedStep, StepResult
from .model import FusionNet
from .safety import NONFINITE_REASON, SafetyFilter, SafetyOutput
from .samples import Observation, Sample

OK, WARN, ERROR = 0, 1, 2   # diagnostic_msgs/DiagnosticStatus levels

# dt outside this many control periods is clamped (and counted): a zero dt (two ticks at one clock
# time) would stop the CfC cells, and a bag that skips ahead an hour must not feed them dt = 3600 s.
DT_MIN_PERIODS = 0.1
DT_MAX_PERIODS = 10.0
# Cadence WARN thresholds.
MAX_OVER_BUDGET_SHARE = 0.01
MIN_RATE_SHARE = 0.95
# Aligner counters that are not dropped messages.
_NOT_DROPS = ("audio.gap_samples", "resets", "tick.bad_dt")


def load_model(cfg: RobotConfig) -> FusionNet:
    """The network for ``cfg``: the checkpoint if one is configured, else seeded random weights."""
    from .model import build_model, config_mismatch, load_checkpoint

    if not cfg.checkpoint:
        return build_model(cfg.model, seed=cfg.seed)
    model = load_checkpoint(cfg.checkpoint)
    diff = config_mismatch(model.cfg, cfg.model)
    if diff:
        raise ConfigError(f"checkpoint {cfg.checkpoint} was trained with a different model config: "
                          + "; ".join(diff))
    return model


@dataclass
class PendingTick:
    """A tick between ``Runtime.begin_tick`` and ``Runtime.complete_tick``: aligned, its engine step not run."""

    t: float
    dt: float
    obs: Observation
    start: float                         # perf_counter at the tick's start
    prepared: PreparedStep | None = None
    step: StepResult | None = None       # set instead when preparing failed (rest, counted)
    infer_s: float = 0.0


@dataclass(frozen=True)
class TickResult:
    t: float                    # tick time (s, the caller's clock)
    dt: float                   # what the recurrent cells were given
    raw_action: np.ndarray      # (dof,) float32, the network's output before safety
    safety: SafetyOutput        # the command, and whether it goes to the arm
    fused_state: np.ndarray     # (fused_state_dim,)
    attention: np.ndarray       # (M, M) modality attention, MODALITIES order
    contribution: np.ndarray    # (M,) share of each modality
    observation: Observation
    # Seconds per stage: "align", "preprocess", "infer", "safety"; record() adds "publish".
    stage_s: dict[str, float]
    mask: np.ndarray            # (M,) the mask the model used: the observation's, minus non-finite windows
    compute_s: float            # wall time of tick() as a whole


@dataclass(frozen=True)
class Status:
    """One diagnostic_msgs/DiagnosticStatus, without ROS."""

    name: str
    level: int                  # OK, WARN or ERROR
    message: str
    values: dict[str, str]


class _PerDof:
    """Running mean, std, min and max per DOF, without keeping the history."""

    def __init__(self, dof: int):
        self.n = 0
        self.sum = np.zeros(dof)
        self.sum_sq = np.zeros(dof)
        self.min = np.full(dof, np.inf)
        self.max = np.full(dof, -np.inf)

    def add(self, values: np.ndarray) -> None:
        self.n += 1
        self.sum += values
        self.sum_sq += values * values
        np.minimum(self.min, values, out=self.min)
        np.maximum(self.max, values, out=self.max)

    def as_dict(self) -> dict[str, list[float] | None]:
        if not self.n:
            return {"mean": None, "std": None, "min": None, "max": None}
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sum_sq / self.n - mean * mean, 0.0))
        return {"mean": mean.tolist(), "std": std.tolist(), "min": self.min.tolist(), "max": self.max.tolist()}


@dataclass
class _InputStats:
    """Per-modality mask counts and ages over a stretch of ticks (a report window, or the whole run)."""

    ticks: int = 0
    masked: np.ndarray = field(default_factory=lambda: np.zeros(len(MODALITIES), np.int64))
    age_sum: np.ndarray = field(default_factory=lambda: np.zeros(len(MODALITIES)))
    age_n: np.ndarray = field(default_factory=lambda: np.zeros(len(MODALITIES), np.int64))
    age_max: np.ndarray = field(default_factory=lambda: np.full(len(MODALITIES), -np.inf))
    drops_before: dict[str, int] = field(default_factory=dict)  # drop counters when the stretch began

    def add(self, mask: np.ndarray, ages: dict[str, float]) -> None:
        self.ticks += 1
        self.masked += mask < 0.5
        for i, name in enumerate(MODALITIES):
            age = ages.get(name, math.inf)
            if math.isfinite(age):  # inf = never seen, counted as age_n falling short of ticks
                self.age_sum[i] += age
                self.age_n[i] += 1
                if age > self.age_max[i]:
                    self.age_max[i] = age

    def mask_rate(self, i: int) -> float:
        return float(self.masked[i] / self.ticks) if self.ticks else 0.0


class Runtime:
    def __init__(self, cfg: RobotConfig, engine: Engine | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        if engine is None:
            engine = create_engine(cfg, load_model(cfg), log=log)  # logs the chosen backend
        self.engine = engine
        self.aligner = Aligner(cfg)
        self.stream = FusionStream(engine, cfg.model)
        self.safety = SafetyFilter(cfg)
        self.cadence = CadenceMonitor(cfg.control_rate_hz)
        self.counters: Counter[str] = Counter()   # ticks, resets, dt clamps, inference errors
        self._bad: Counter[str] = Counter()        # messages the converters refused, by BadSample.cause
        # Guards counters, statistics and the cadence monitor (report() may run on another thread).
        self._lock = threading.Lock()
        self._period = 1.0 / cfg.control_rate_hz
        self._dt_min, self._dt_max = DT_MIN_PERIODS * self._period, DT_MAX_PERIODS * self._period
        self._last_t: float | None = None
        self._last: TickResult | None = None
        self._window = _InputStats()
        self._total = _InputStats()
        self._raw_stats = _PerDof(cfg.model.action.dof)
        self._command_stats = _PerDof(cfg.model.action.dof)
        self._estop_input = False
        self._reset_requested = threading.Event()

    # ------------------------------------------------------------ from any thread

    def add(self, sample: Sample, now: float) -> bool:
        """Buffer one sensor sample (cheap: the work happens at the tick); False when dropped and counted."""
        return self.aligner.add(sample, now)

    def count_bad(self, cause: str) -> None:
        """A message the converter refused (``BadSample.cause``), counted with the drops."""
        with self._lock:
            self._bad[cause] += 1

    def estop(self, active: bool) -> None:
        """The e-stop input: True latches rest output from the next tick; False does not release it."""
        active = bool(active)
        self.safety.estop(active)
        if active != self._estop_input:  # the topic may repeat its value every tick: log changes only
            self._estop_input = active
            self.log("e-stop asserted: output latched to rest" if active
                     else "e-stop input released; output stays latched until enabled")

    def request_reset(self) -> None:
        """From any thread: the next tick starts afresh (input buffers, recurrent state, rate limiter), as
        after a clock jump. For a new episode or task, where the past must not steer the policy."""
        self._reset_requested.set()

    def set_enabled(self, enabled: bool) -> tuple[bool, str]:
        """Enable (command the arm) or disable (dry run); refused while the e-stop is asserted."""
        accepted, message = self.safety.set_enabled(enabled)
        self.log(f"{'enable' if enabled else 'disable'} request: {message}" if accepted
                 else f"{'enable' if enabled else 'disable'} request refused: {message}")
        return accepted, message

    # ------------------------------------------------------------ the control thread

    def tick(self, t: float) -> TickResult:
        """One control tick at time ``t``: align the buffered inputs, step the network, apply safety."""
        pending = self.begin_tick(t)
        return self.complete_tick(pending, self.infer(pending))

    def infer(self, pending: "PendingTick") -> "dict[str, np.ndarray] | Exception | None":
        """The engine's outputs for a prepared tick, or the exception it raised (None where preparing failed)."""
        if pending.step is not None:
            return None
        t0 = time.perf_counter()
        try:
            out = self.engine.step(pending.prepared.inputs)
        except Exception as exc:  # noqa: BLE001 - a dead control loop would leave the arm on its last command
            out = exc
        pending.infer_s += time.perf_counter() - t0
        return out

    def begin_tick(self, t: float) -> "PendingTick":
        """``tick`` up to the engine: the aligned inputs, prepared for the stream's next step. ``tick`` runs them
        itself; ``mm-fusion eval --lockstep`` runs several Runtimes' in one batched call (``BatchedSteps``)
        and hands each its outputs with ``complete_tick``."""
        start = time.perf_counter()
        if not math.isfinite(t):
            raise ValueError(f"tick time must be a finite number of seconds, got {t}")
        if self._reset_requested.is_set():
            self._reset_requested.clear()
            self.aligner.reset()
            self.stream.reset()
            self.safety.reset()
            self._last_t = None
            with self._lock:
                self.counters["resets_requested"] += 1
            self.log(f"reset requested: input buffers, recurrent state and rate limiter reset at t={t:.6f} s")
        dt = self._dt(t)
        obs = self.aligner.tick(t, dt)
        if obs.reset:
            # The aligner has already cleared its buffers; the rest of the past goes too.
            self.stream.reset()
            self.safety.reset()
            with self._lock:
                self.counters["resets"] += 1
            self.log(f"clock jumped back to t={t:.6f} s: input buffers, recurrent state and rate limiter reset")
        pending = PendingTick(t=t, dt=dt, obs=obs, start=start)
        t0 = time.perf_counter()
        try:
            pending.prepared = self.stream.prepare(obs.camera, obs.audio, obs.imu, obs.lidar, obs.joint_state,
                                                   obs.mask, dt, obs.audio_end, obs.audio_rewritten_from)
        except Exception as exc:  # noqa: BLE001 - as an engine failure: rest, counted
            pending.step = self._failed_step(obs, exc)
        pending.infer_s = time.perf_counter() - t0
        return pending

    def complete_tick(self, pending: "PendingTick", out: "dict[str, np.ndarray] | Exception | None") -> TickResult:
        """The engine's outputs (or the exception it raised) for ``pending``: the tick's safe command."""
        t, dt, obs = pending.t, pending.dt, pending.obs
        t0 = time.perf_counter()
        step = pending.step
        if step is None:
            try:
                if isinstance(out, Exception):
                    raise out
                step = self.stream.finish(pending.prepared, out)
            except Exception as exc:  # noqa: BLE001 - a dead control loop would leave the arm on its last command
                step = self._failed_step(obs, exc)
        t1 = time.perf_counter()
        out_safe = self.safety.step(step.action, step.mask, t)
        t2 = time.perf_counter()
        stage_s = {"align": obs.timings.get("align", 0.0), "preprocess": obs.timings.get("preprocess", 0.0),
                   "infer": pending.infer_s + (t1 - t0), "safety": t2 - t1}
        raw = np.asarray(step.action, dtype=np.float32)
        with self._lock:
            self.counters["ticks"] += 1
            self._window.add(step.mask, obs.ages)
            self._total.add(step.mask, obs.ages)
            if np.isfinite(raw).all():
                self._raw_stats.add(raw.astype(np.float64))
            self._command_stats.add(out_safe.command)
        result = TickResult(t=t, dt=dt, raw_action=raw, safety=out_safe, fused_state=step.fused_state,
                            attention=step.attention, contribution=step.contribution, observation=obs,
                            stage_s=stage_s, mask=step.mask,
                            compute_s=time.perf_counter() - pending.start)
        self._last = result
        return result

    def set_safety(self, safety: "SafetyConfig") -> None:
        """Safety settings changed at run time (fusion_node's parameters), from the next tick on."""
        self.safety.configure(safety)

    def rest(self, t: float) -> SafetyOutput:
        """What to publish for a tick at ``t`` whose ``tick`` raised: rest, recorded by the safety filter.

        Publishing rest without telling the filter would leave its rate limiter on the command from
        before the failure, and the next good tick could jump straight back to it.
        """
        out = self.safety.rest(t)
        with self._lock:
            self._command_stats.add(out.command)
        return out

    def _failed_step(self, obs: Observation, exc: Exception) -> StepResult:
        """Inference raised: a non-finite action, which the safety filter turns into rest."""
        with self._lock:
            self.counters["infer_errors"] += 1
            failures = self.counters["infer_errors"]
        if failures == 1 or failures % 1000 == 0:
            self.log(f"inference failed ({failures} ticks so far), holding at rest: {type(exc).__name__}: {exc}")
        cfg = self.cfg.model
        m = len(MODALITIES)
        return StepResult(np.full(cfg.action.dof, np.nan, np.float32), np.zeros(cfg.fused_state_dim, np.float32),
                          np.zeros((m, m), np.float32), np.zeros(m, np.float32), obs.mask)

    def _dt(self, t: float) -> float:
        last, self._last_t = self._last_t, t
        if last is None or t < last:
            return self._period  # first tick, or the clock jumped back (the aligner resets)
        dt = t - last
        if dt < self._dt_min:
            with self._lock:
                self.counters["dt_clamped_low"] += 1
            return self._dt_min
        if dt > self._dt_max:
            with self._lock:
                self.counters["dt_clamped_high"] += 1
            return self._dt_max
        return dt

    def record(self, result: TickResult, publish_s: float, wall_start: float) -> None:
        """Account a finished tick: ``publish_s`` spent publishing, ``wall_start`` its monotonic start time."""
        result.stage_s["publish"] = publish_s
        with self._lock:
            self.cadence.record(wall_start, result.compute_s + publish_s, result.stage_s)

    # ------------------------------------------------------------ diagnostics

    def report(self) -> list[Status]:
        """The periodic diagnostics: cadence, inputs, safety (and the engine's own, where it has any).
        Starts a new report window."""
        drops = self._drops()
        with self._lock:
            cadence = self.cadence.report()
            window, self._window = self._window, _InputStats(drops_before=drops)
        statuses = [self._cadence_status(cadence), self._inputs_status(window, drops), self._safety_status()]
        engine = self.engine.status() if hasattr(self.engine, "status") else None   # the remote engine's RTT, misses
        if engine is not None:
            statuses.append(Status("mm_fusion: engine", *engine))
        return statuses

    def _drops(self) -> dict[str, int]:
        # dict() of a Counter copies it in one step under the GIL, so add() threads cannot break it.
        counts = Counter({k: v for k, v in dict(self.aligner.counters).items()
                          if not k.endswith(".accepted") and k not in _NOT_DROPS})
        with self._lock:
            counts.update(self._bad)
        return dict(sorted(counts.items()))

    def _cadence_status(self, c: CadenceReport) -> Status:
        values = {"target_hz": f"{c.target_hz:.1f}", "achieved_hz": f"{c.achieved_hz:.1f}",
                  "p50_ms": f"{c.p50_ms:.3f}", "p99_ms": f"{c.p99_ms:.3f}", "max_ms": f"{c.max_ms:.3f}",
                  "over_budget_share": f"{c.over_budget_share:.4f}", "window_ticks": str(c.ticks),
                  "total_ticks": str(c.total_ticks), "total_over_budget": str(c.total_over_budget)}
        values.update({f"stage.{k}_ms": f"{v:.3f}" for k, v in c.stage_mean_ms.items()})
        problems = []
        if c.ticks < 2:
            problems.append("not ticking yet")
        else:
            if c.achieved_hz < MIN_RATE_SHARE * c.target_hz:
                problems.append(f"achieved {c.achieved_hz:.1f} Hz < {100 * MIN_RATE_SHARE:.0f}% "
                                f"of {c.target_hz:.0f} Hz")
            if c.over_budget_share > MAX_OVER_BUDGET_SHARE:
                problems.append(f"{100 * c.over_budget_share:.1f}% of ticks over the "
                                f"{1e3 / c.target_hz:.1f} ms budget")
        if problems:
            return Status("mm_fusion: cadence", WARN, "; ".join(problems), values)
        return Status("mm_fusion: cadence", OK, f"{c.achieved_hz:.1f}/{c.target_hz:.0f} Hz, p99 {c.p99_ms:.3f} ms",
                      values)

    def _inputs_status(self, window: _InputStats, drops: dict[str, int]) -> Status:
        last = self._last
        values: dict[str, str] = {"window_ticks": str(window.ticks)}
        masked = []
        for i, name in enumerate(MODALITIES):
            age = last.observation.ages.get(name, math.inf) if last else math.inf
            values[f"{name}.age_s"] = _fmt(age, 4)
            values[f"{name}.max_age_s"] = _fmt(float(window.age_max[i]), 4) if window.age_n[i] else "inf"
            values[f"{name}.mask_rate"] = f"{window.mask_rate(i):.3f}"
            if window.masked[i]:
                masked.append(f"{name} {100 * window.mask_rate(i):.0f}%")
        values.update({f"drops.{cause}": str(n) for cause, n in drops.items()})
        # Windows with NaN/Inf (masked for their tick) and poisoned recurrent states.
        values.update({f"stream.{k}": str(v) for k, v in sorted(dict(self.stream.counters).items()) if k != "ticks"})
        new_drops = {k: n - window.drops_before.get(k, 0) for k, n in drops.items()
                     if n > window.drops_before.get(k, 0)}
        problems = []
        if masked:
            problems.append("masked: " + ", ".join(masked))
        if new_drops:
            problems.append("dropped: " + ", ".join(f"{k} {n}" for k, n in new_drops.items()))
        if not window.ticks:
            problems.append("no ticks in this window")
        if problems:
            return Status("mm_fusion: inputs", WARN, "; ".join(problems), values)
        return Status("mm_fusion: inputs", OK, "all inputs fresh", values)

    def _safety_status(self) -> Status:
        sf = self.safety
        last = self._last.safety if self._last else None
        values = {"enabled": str(sf.enabled), "estop_input": str(sf.estop_input), "estop_latched": str(sf.latched),
                  "on_stale": sf.on_stale, "hold_timeout_s": f"{sf.hold_timeout_s:g}",
                  "required": ",".join(sf.required),
                  "stale": ",".join(last.stale) if last else "", "reasons": "; ".join(last.reasons) if last else ""}
        values.update({f"count.{k}": str(v) for k, v in sorted(sf.counters.items())})
        problems = []
        if sf.latched:
            problems.append("e-stop latched (input still asserted)" if sf.estop_input
                            else "e-stop latched: enable to release")
        if last is not None and last.stale:
            problems.append(f"watchdog holding output ({sf.on_stale}): stale {', '.join(last.stale)}")
        if last is not None and NONFINITE_REASON in last.reasons:
            problems.append(NONFINITE_REASON)
        if problems:
            return Status("mm_fusion: safety", ERROR, "; ".join(problems), values)
        return Status("mm_fusion: safety", OK, "enabled" if sf.enabled else "disabled (dry run: preview only)",
                      values)

    def tick_status(self, result: TickResult) -> Status:
        """The per-tick diagnostics: the input stamps this tick used, their ages, the mask.

        Holds no wall-clock values, so a replayed bag gives identical diagnostics every time.
        """
        obs = result.observation
        values = {"t": f"{result.t:.9f}", "dt": f"{result.dt:.9f}"}
        masked = []
        for i, name in enumerate(MODALITIES):
            used = result.mask[i] > 0.5
            values[f"{name}.stamp"] = _fmt(obs.stamps.get(name, math.nan), 9)
            values[f"{name}.age_s"] = _fmt(obs.ages.get(name, math.inf), 6)
            values[f"{name}.used"] = "1" if used else "0"
            if not used:
                masked.append(name)
        out = result.safety
        values.update({"commanded": str(out.commanded), "held": str(out.held), "reasons": "; ".join(out.reasons)})
        if out.held:
            return Status("mm_fusion: tick", ERROR, "held: " + "; ".join(out.reasons), values)
        if masked:
            return Status("mm_fusion: tick", WARN, "masked: " + ", ".join(masked), values)
        return Status("mm_fusion: tick", OK, "all inputs used", values)

    def log_line(self) -> str:
        """One line for the log every few seconds."""
        with self._lock:
            cadence = self.cadence.report()
        last = self._last
        masked = [n for i, n in enumerate(MODALITIES) if last is not None and last.mask[i] < 0.5]
        sf = self.safety
        state = "e-stop latched" if sf.latched else "enabled" if sf.enabled else "disabled"
        if last is not None and last.safety.stale:
            state += f", watchdog holding ({', '.join(last.safety.stale)})"
        drops = sum(self._drops().values())
        return (f"{cadence.line()} | masked: {', '.join(masked) or '-'} | drops {drops} | safety: {state}")

    def summary(self) -> dict:
        """The whole run as JSON-able values (bag replay writes this next to its output)."""
        with self._lock:
            c = self.cadence.report()
            total = self._total
            ages = {name: {"mean": float(total.age_sum[i] / total.age_n[i]) if total.age_n[i] else None,
                           "max": float(total.age_max[i]) if total.age_n[i] else None,
                           "unseen_ticks": int(total.ticks - total.age_n[i])}
                    for i, name in enumerate(MODALITIES)}
            counters = dict(self.counters)
            raw, command = self._raw_stats.as_dict(), self._command_stats.as_dict()
        aligner = dict(self.aligner.counters)
        return {
            "ticks": counters.get("ticks", 0),
            "target_hz": self.cfg.control_rate_hz,
            "achieved_hz": c.total_achieved_hz,
            "tick_ms": {"mean": c.total_mean_ms, "max": c.total_max_ms, "p50_window": c.p50_ms,
                        "p99_window": c.p99_ms},
            "over_budget_ticks": c.total_over_budget,
            "stage_ms": c.total_stage_mean_ms,
            "mask_rate": {name: total.mask_rate(i) for i, name in enumerate(MODALITIES)},
            "age_s": ages,
            "drops": self._drops(),
            "accepted": {k.split(".")[0]: v for k, v in sorted(aligner.items()) if k.endswith(".accepted")},
            "audio_gap_samples": aligner.get("audio.gap_samples", 0),
            "resets": counters.get("resets", 0),
            "resets_requested": counters.get("resets_requested", 0),
            "infer_errors": counters.get("infer_errors", 0),
            "dt_clamped": {"low": counters.get("dt_clamped_low", 0), "high": counters.get("dt_clamped_high", 0)},
            "stream": dict(self.stream.counters),
            "safety": {"enabled": self.safety.enabled, "estop_latched": self.safety.latched,
                       **{k: v for k, v in sorted(self.safety.counters.items())}},
            "action": {"names": list(self.cfg.model.action.names), "raw": raw, "command": command},
        }


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
