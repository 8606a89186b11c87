"""Cadence of a fixed-rate loop: achieved rate, tick-time percentiles, budget overruns.

Keeps a bounded window of recent ticks so a report describes the last few
seconds, not the whole run, plus totals since start (what a bag replay's
summary reports).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CadenceReport:
    target_hz: float
    achieved_hz: float
    ticks: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    over_budget_share: float  # fraction of ticks whose compute time exceeded 1 / target_hz
    stage_mean_ms: dict[str, float]
    total_ticks: int
    total_over_budget: int
    # Since start, not just the window.
    total_achieved_hz: float = 0.0
    total_mean_ms: float = 0.0
    total_max_ms: float = 0.0
    total_stage_mean_ms: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        stages = " ".join(f"{k}={v:.3f}" for k, v in self.stage_mean_ms.items())
        return (f"{self.achieved_hz:6.1f}/{self.target_hz:.0f} Hz  tick p50 {self.p50_ms:.3f} ms  "
                f"p99 {self.p99_ms:.3f} ms  max {self.max_ms:.3f} ms  over budget "
                f"{100 * self.over_budget_share:.2f}%  [{stages}]")


class CadenceMonitor:
    def __init__(self, target_hz: float, window: int = 1000):
        self.target_hz = target_hz
        self.budget_s = 1.0 / target_hz
        self._starts: deque[float] = deque(maxlen=window)
        self._durations: deque[float] = deque(maxlen=window)
        self._stages: dict[str, deque[float]] = {}
        self._window = window
        self.total_ticks = 0
        self.total_over_budget = 0
        self._first_start: float | None = None
        self._last_start = 0.0
        self._total_s = 0.0
        self._total_max_s = 0.0
        self._stage_total_s: dict[str, list[float]] = {}  # name -> [seconds, ticks]

    def record(self, start_s: float, duration_s: float, stages: dict[str, float] | None = None) -> None:
        """One tick that started at ``start_s`` (loop clock) and took ``duration_s`` to compute."""
        self._starts.append(start_s)
        self._durations.append(duration_s)
        for name, seconds in (stages or {}).items():
            self._stages.setdefault(name, deque(maxlen=self._window)).append(seconds)
            total = self._stage_total_s.setdefault(name, [0.0, 0])
            total[0] += seconds
            total[1] += 1
        self.total_ticks += 1
        self.total_over_budget += duration_s > self.budget_s
        if self._first_start is None:
            self._first_start = start_s
        self._last_start = start_s
        self._total_s += duration_s
        self._total_max_s = max(self._total_max_s, duration_s)

    def report(self) -> CadenceReport:
        n = max(self.total_ticks, 1)
        durations = np.asarray(self._durations, dtype=np.float64) * 1e3
        starts = np.asarray(self._starts, dtype=np.float64)
        span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        achieved = (len(starts) - 1) / span if span > 0 else 0.0
        def pct(q: float) -> float:
            return float(np.percentile(durations, q)) if len(durations) else 0.0
        return CadenceReport(
            target_hz=self.target_hz, achieved_hz=achieved, ticks=len(durations), p50_ms=pct(50), p99_ms=pct(99),
            max_ms=float(durations.max()) if len(durations) else 0.0,
            over_budget_share=float((durations > self.budget_s * 1e3).mean()) if len(durations) else 0.0,
            stage_mean_ms={k: float(np.mean(v)) * 1e3 for k, v in self._stages.items()},
            total_ticks=self.total_ticks, total_over_budget=self.total_over_budget,
            total_achieved_hz=self._total_rate(), total_mean_ms=self._total_s / n * 1e3,
            total_max_ms=self._total_max_s * 1e3,
            total_stage_mean_ms={k: s / c * 1e3 for k, (s, c) in self._stage_total_s.items()})

    def _total_rate(self) -> float:
        span = self._last_start - (self._first_start or 0.0)
        return (self.total_ticks - 1) / span if self.total_ticks > 1 and span > 0 else 0.0
