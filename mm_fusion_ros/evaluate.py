"""``mm-fusion eval``: the policy in closed loop in the simulated cell, in-process, on sim time.

Every episode runs the live node's code path without DDS: the cell's readings
become the ROS messages its drivers would send (``sim.bridge``, the same
bytes ``mm-fusion record`` writes), are read back through replay's decoder
into the ``Runtime`` (aligner, engine, safety filter, as ``fusion_node``)
with their receive times, and the Runtime ticks at the control rate on the sim
clock; each tick's command (rest while the safety filter holds) is what the
cell's velocity controller gets. Ticks fall on the same grid as replay's, and a
reading received exactly at a tick time is handed over after that tick, as
replay and a sim-time timer order them.

Episodes use seeds S, S+1, ...; each starts from a fresh Runtime (nothing
carries over but the engine, which is stateless), so results do not depend
on ``--workers``. ``--lockstep K`` steps K episodes per worker together, each
with its own cell, Runtime, aligner and safety filter, through one call of the
same graph exported for a batch of K: the graph's cost is per operator more
than per number, so K episodes cost little more than one. Rows do not mix, so
results do not depend on the workers then either; against K = 1 they differ
in a float's last bits (another GEMM kernel for another batch).
``--drop camera:2.0@3.0`` silences a sensor (its readings are never
delivered) for 2.0 s from 3.0 s after the start of every episode.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import MODALITIES, ConfigError, RobotConfig, load_config
from .files import write_json_atomic
from .stats import wilson_interval

EVAL_SEED = 1000    # first evaluation seed: `make train` records seeds below it, never these
# "Near and low": within 4 cm of the cued button and below 13 cm, where the overhead camera shows nothing of its cap
# (README item 23): the descent and the press, which act on the memory's estimate.
NEAR_LATERAL_M, NEAR_HEIGHT_M = 0.04, 0.13
_READING = {"camera": "CameraFrame", "audio": "AudioChunk", "imu": "ImuReading", "lidar": "LidarScan",
            "joint_state": "JointReading"}


def reading_modality(reading) -> str:
    """The model input a cell reading (``sim.readings``) feeds."""
    return next(m for m, cls in _READING.items() if type(reading).__name__ == cls)


class EvalError(ValueError):
    """Options, a config or a checkpoint that eval cannot work with (refused before any episode runs)."""


@dataclass(frozen=True)
class Drop:
    """A sensor silent for ``duration_s`` from ``at_s`` after the episode's start."""

    modality: str
    duration_s: float
    at_s: float

    @classmethod
    def parse(cls, text: str) -> "Drop":
        try:
            modality, rest = text.split(":", 1)
            duration, at = rest.split("@", 1)
            drop = cls(modality.strip(), float(duration), float(at))
        except ValueError:
            raise EvalError(f"--drop {text!r}: expected MODALITY:DURATION@START, e.g. camera:2.0@3.0") from None
        if drop.modality not in MODALITIES:
            raise EvalError(f"--drop {text!r}: unknown modality {drop.modality!r}; choose from {', '.join(MODALITIES)}")
        if not (math.isfinite(drop.duration_s) and drop.duration_s > 0 and math.isfinite(drop.at_s) and drop.at_s >= 0):
            raise EvalError(f"--drop {text!r}: duration must be > 0 and start >= 0 seconds")
        return drop

    def silences(self, modality: str, elapsed: float) -> bool:
        return modality == self.modality and self.at_s <= elapsed < self.at_s + self.duration_s

    def __str__(self) -> str:
        return f"{self.modality}:{self.duration_s:g}@{self.at_s:g}"


@dataclass(frozen=True)
class EvalOptions:
    episodes: int = 200
    seed: int = EVAL_SEED
    workers: int = 1
    lockstep: int = 1                        # episodes per worker stepped through one batched engine call
    backend: str = "onnxruntime"
    drops: tuple[Drop, ...] = ()
    video: str = ""                          # MP4 of the episodes in video_episodes
    video_episodes: tuple[int, ...] = ()     # seeds to film (default: the first)

    def validate(self) -> None:
        if not 1 <= self.episodes <= 100_000:
            raise EvalError(f"--episodes must be in [1, 100000], got {self.episodes}")
        if self.seed < 0:
            raise EvalError(f"--seed must be >= 0, got {self.seed}")
        if not 1 <= self.workers <= 64:
            raise EvalError(f"--workers must be in [1, 64], got {self.workers}")
        if not 1 <= self.lockstep <= 64:
            raise EvalError(f"--lockstep must be in [1, 64], got {self.lockstep}")
        if self.lockstep > 1 and self.backend != "onnxruntime":
            raise EvalError(f"--lockstep {self.lockstep} batches the onnxruntime engine; --backend {self.backend} "
                            "steps one episode at a time (use --lockstep 1)")
        if self.video and not self.video.endswith(".mp4"):
            raise EvalError(f"--video writes an MP4; name it *.mp4, got {self.video!r}")
        for s in self.video_episodes:
            if not self.seed <= s < self.seed + self.episodes:
                raise EvalError(f"--video-episodes: seed {s} is not among the evaluated seeds "
                                f"{self.seed}..{self.seed + self.episodes - 1}")


def eval_config(config_path: str | Path, checkpoint: str | Path, backend: str) -> RobotConfig:
    """The config eval runs: ``config_path``'s fusion_node block with the checkpoint and what its training
    command overrode (strategy, modalities); refused, listing the differences, where the checkpoint's model
    config still disagrees."""
    from .config import model_config_from_dict
    from .model import config_mismatch, read_checkpoint
    from .train import apply_overrides

    cfg = load_config(config_path)
    try:
        blob = read_checkpoint(checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(str(exc)) from None
    overrides = (blob.get("training") or {}).get("overrides") or {}
    cfg = dataclasses.replace(apply_overrides(cfg, overrides), checkpoint=str(checkpoint))
    diff = config_mismatch(model_config_from_dict(blob["model_config"]), cfg.model)
    if diff:
        raise EvalError(f"checkpoint {checkpoint} does not match {config_path}: " + "; ".join(diff))
    if backend:
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend=backend))
    return cfg


# ---------------------------------------------------------------- one worker


class PolicyLoop:
    """The policy in the cell's loop as fusion_node runs it on the robot: the cell's readings become the
    messages its drivers send (``sim/bridge.py``), serialised and read back as a subscriber gets them,
    handed to a Runtime (aligner, engine, safety filter) at their receive times on the tick grid; the
    Runtime's safe command is what the arm gets. ``mm-fusion eval`` drives the cell with it, and so does
    ``mm-fusion record --policy`` (DAgger: the policy drives, the expert labels)."""

    def __init__(self, config_path: str, checkpoint: str, backend: str, log: Callable[[str], None] = lambda _: None,
                 engine=None, batch: int = 1):
        """``engine``: one already built, shared by several loops (``Evaluator``'s lockstep slots); else one is
        built here, for ``batch`` streams (1: the live node's)."""
        from .engine import create_engine
        from .model import read_checkpoint
        from .replay import InputDecoder
        from .runtime import load_model
        from .sim.bridge import CellMessages
        from .sim.config import load_cell_config

        self.cfg = eval_config(config_path, checkpoint, backend).absolute()
        self.cell_cfg = load_cell_config(config_path)
        self.bridge = CellMessages(self.cfg, self.cell_cfg)
        t = self.bridge.topics
        topics = {t.camera[0]: t.camera[1], t.audio[0]: t.audio[1], t.lidar[0]: t.lidar[1], t.imu[0]: t.imu[1],
                  t.joint_states: "sensor_msgs/msg/JointState"}
        self.decoder = InputDecoder(self.cfg, topics, log)
        self.engine = engine if engine is not None else create_engine(self.cfg, load_model(self.cfg), log=log,
                                                                      batch=batch)
        self.period_ns = int(round(1e9 / self.cfg.control_rate_hz))
        self.log = log
        trained = (read_checkpoint(checkpoint).get("training") or {}).get("train_config") or {}
        # Whether fused_state[:5] was trained to be the task state (sim.task_state): then eval reports how
        # well the policy knew where the cued button was, in closed loop.
        self.task_state = float(trained.get("task_state_weight") or 0.0) > 0
        self.runtime = None

    def start(self, t: float, drops: Sequence[Drop] = ()) -> int:
        """A fresh Runtime for an episode starting at sim time ``t``; returns the first tick (ns), on the grid."""
        from .bag.messages import stamp_ns
        from .runtime import Runtime

        self.runtime = Runtime(self.cfg, engine=self.engine, log=self.log)
        self.runtime.set_enabled(True)
        self.drops, self.t0 = tuple(drops), t
        self.waiting: list = []   # received at exactly the tick time: handed over after the tick, as replay does
        return (stamp_ns(t) // self.period_ns) * self.period_ns

    def tick(self, t_ns: int):
        return self._handed_waiting(self.runtime.tick(t_ns / 1e9))

    def complete_tick(self, pending, out):
        """``Runtime.complete_tick`` (the engine's outputs of a lockstep batch), then as ``tick``."""
        return self._handed_waiting(self.runtime.complete_tick(pending, out))

    def _handed_waiting(self, result):
        for r in self.waiting:
            self._add(r)
        self.waiting = []
        return result

    def receive(self, readings, next_tick_ns: int) -> None:
        """Readings received before the next tick: handed to the Runtime now (at that tick: just after it)."""
        from .bag.messages import stamp_ns
        for r in readings:
            if stamp_ns(r.receive) >= next_tick_ns:
                self.waiting.append(r)
            else:
                self._add(r)

    def _samples(self, reading) -> list:
        from .samples import BadSample
        topic, msg = self.bridge.message(reading)
        ts = self.bridge.ts
        # Serialised and read back, as a bag reader (and a subscriber) gets it.
        decoded = ts.deserialize_cdr(ts.serialize_cdr(msg, msg.__msgtype__), msg.__msgtype__)
        try:
            return self.decoder.samples(decoded, topic)
        except BadSample as exc:   # counted and dropped, as fusion_node and replay do
            self.runtime.count_bad(exc.cause)
            return []

    def _add(self, reading) -> None:
        if any(d.silences(reading_modality(reading), reading.stamp - self.t0) for d in self.drops):
            return
        for sample in self._samples(reading):
            self.runtime.add(sample, reading.receive)

    def close(self) -> None:
        self.engine.close()


class Evaluator:
    """K cells and the policy's loops, kept for a worker's lifetime. ``run`` steps K episodes in lockstep: each
    tick, every slot's Runtime aligns its inputs (``begin_tick``), one engine call exported for a batch of K
    steps them all (``BatchedSteps``), each Runtime applies its safety filter to its own outputs
    (``complete_tick``) and each cell advances; a slot whose episode ended takes the next seed. K = 1 (the
    default) is the live node's engine, batch 1. A row's outputs depend on that row's inputs alone, so results
    do not depend on which slot or worker an episode runs in; they may differ from K = 1 in the last bits of
    a float (another batch, another GEMM kernel), which README item 31 measures on the eval seeds."""

    def __init__(self, config_path: str, checkpoint: str, backend: str, log: Callable[[str], None] = lambda _: None,
                 lockstep: int = 1):
        from .engine.stream import BatchedSteps
        from .sim.cell import Cell

        if lockstep < 1:
            raise EvalError(f"--lockstep must be >= 1, got {lockstep}")
        first = PolicyLoop(config_path, checkpoint, backend, log, batch=lockstep)
        self.loops = [first] + [PolicyLoop(config_path, checkpoint, backend, log, engine=first.engine)
                                for _ in range(lockstep - 1)]
        self.loop = first
        self.cfg, self.cell_cfg = first.cfg, first.cell_cfg
        self.cells = [Cell(self.cell_cfg) for _ in range(lockstep)]
        self.cell = self.cells[0]
        self.batched = BatchedSteps(first.engine) if lockstep > 1 else None
        self.log = log

    def close(self) -> None:
        for cell in self.cells:
            cell.close()
        self.loop.close()

    def episode(self, seed: int, drops: Sequence[Drop] = (), video: str | Path | None = None) -> dict:
        """One episode, alone (with K > 1 it takes the batch's first row)."""
        return next(self.run([(seed, drops, video)]))

    def run(self, jobs: Sequence[tuple[int, Sequence[Drop], str | Path | None]]):
        """Yield each job's (seed, drops, video) result as its episode ends, K at a time; ``jobs`` is read
        lazily (a worker's share of a queue)."""
        pending = iter(jobs)
        slots: list[_Episode | None] = [None] * len(self.cells)

        def fill(i: int) -> None:
            job = next(pending, None)
            slots[i] = _Episode(self.cells[i], self.loops[i], self.cfg, *job) if job is not None else None

        for i in range(len(slots)):
            fill(i)
        try:
            while any(slots):
                live = [e for e in slots if e is not None]
                ticks = [e.loop.runtime.begin_tick(e.t_ns / 1e9) for e in live]
                if self.batched is None:
                    outs = [live[0].loop.runtime.infer(ticks[0])]
                else:
                    outs = _batched_step(self.batched, ticks)
                for e, tick, out in zip(live, ticks, outs):
                    e.after_tick(e.loop.complete_tick(tick, out))
                for i, e in enumerate(slots):
                    if e is not None and e.done:
                        result = e.report()
                        fill(i)
                        yield result
        finally:
            for e in slots:
                if e is not None:
                    e.abort()


def _batched_step(batched, ticks) -> list:
    """``Runtime.infer`` for several Runtimes' prepared ticks in one engine call."""
    ready = [i for i, t in enumerate(ticks) if t.step is None]
    outs: list = [None] * len(ticks)
    if ready:
        try:
            for i, out in zip(ready, batched.run([ticks[i].prepared for i in ready])):
                outs[i] = out
        except Exception as exc:  # noqa: BLE001 - as Runtime.infer: each Runtime rests on it, counted
            for i in ready:
                outs[i] = exc
    return outs


class _Episode:
    """One episode in a cell, driven tick by tick by ``Evaluator.run``: what it measures along the way."""

    def __init__(self, cell, loop: PolicyLoop, cfg: RobotConfig, seed: int, drops: Sequence[Drop] = (),
                 video: str | Path | None = None):
        from .sim.readings import ArrivalQueue

        self.cell, self.loop, self.cfg, self.seed = cell, loop, cfg, seed
        self.wall0 = time.perf_counter()
        self.spec = spec = cell.reset(seed)
        self.queue = ArrivalQueue()
        self.t_ns = loop.start(cell.t, drops)
        self.held = self.ticks = 0
        self.contribution = np.zeros(len(MODALITIES))
        self.buttons = np.asarray(spec.buttons, np.float64)
        self.button = self.buttons[spec.target]
        self.closest_each = np.full(len(self.buttons), math.inf)   # the tool's closest approach to every button (xy)
        self.target_errors: list[float] = []
        # The tip's height above the cued cap while over it (xy within the cap's radius): a policy that finds
        # the button but never presses shows here at what height it stops.
        self.lowest_over_cap = math.inf
        self.cap_radius = cell.cfg.scene.cap_radius
        # Where the cue memory (model.fusion.cue_memory, a row of the explicit state) held the cued button while
        # the tool was near it and low, where the overhead camera cannot see the cap: what the descent acts on.
        self.memory_row = len(MODALITIES) if cfg.model.fusion.cue_memory else None
        self.memory_errors: list[float] = []
        self.recorder = _Recorder(cell, video, cfg.control_rate_hz) if video else None

    @property
    def done(self) -> bool:
        return self.cell.outcome.done

    def after_tick(self, result) -> None:
        """The tick's command to the arm, the measures, then the cell on to the next tick."""
        from .sim.task_state import UNITS_PER_M

        cell, loop, spec, button = self.cell, self.loop, self.spec, self.button
        self.ticks += 1
        self.held += result.safety.held
        self.contribution += result.contribution
        cell.command(result.safety.command)
        tip = cell.tcp()[0]
        self.closest_each = np.minimum(self.closest_each, np.hypot(*(tip[:2] - self.buttons).T))
        lateral = math.hypot(*(tip[:2] - button))
        if lateral <= self.cap_radius:
            self.lowest_over_cap = min(self.lowest_over_cap, float(tip[2] - cell.button_top(spec.target)[2]))
        if self.memory_row is not None and tip[2] < NEAR_HEIGHT_M and lateral < NEAR_LATERAL_M:
            row = self.memory_row
            remembered = loop.runtime.stream.state[0, row, 2 * spec.target:2 * spec.target + 2]
            self.memory_errors.append(float(np.hypot(*(np.asarray(remembered, np.float64) / UNITS_PER_M - button))))
        if loop.task_state and result.safety.command.any():   # the policy has started: it heard the cue
            guess = np.asarray(result.fused_state[:2], np.float64) / UNITS_PER_M
            self.target_errors.append(float(np.hypot(*(guess - button))))
        if self.recorder:
            self.recorder.tick(result)
        self.t_ns += loop.period_ns
        self.queue.push(cell.advance(self.t_ns / 1e9))
        loop.receive(self.queue.pop_due(self.t_ns / 1e9), self.t_ns)

    def abort(self) -> None:
        if self.recorder:
            self.recorder.abort()
            self.recorder = None

    def report(self) -> dict:
        from .sim.scene import COLOUR_NAMES

        if self.recorder:
            self.recorder.close()
            self.recorder = None
        cell, spec, ticks = self.cell, self.spec, self.ticks
        o, st = cell.outcome, cell.stats
        summary = self.loop.runtime.summary()
        target_errors, memory_errors, lowest_over_cap = self.target_errors, self.memory_errors, self.lowest_over_cap
        return {
            "seed": self.seed, "outcome": o.status, "reason": o.reason, "detail": o.detail,
            "duration_s": round(o.t, 4), "time_to_success_s": round(o.t, 4) if o.status == "success" else None,
            "intruder_contacts": st.intruder_contacts, "max_joint_speed": round(st.max_joint_speed, 4),
            "max_tool_force": round(st.max_tool_force, 3), "target": spec.target_colour, "ticks": ticks,
            "held_ticks": self.held, "drops": summary["drops"],
            # How near the tool tip came to the cued button's centre (xy; the cap's radius is the margin), and,
            # for a policy trained with the task state, how far its own estimate of the button was from it.
            # And which button it came nearest: whether the policy picked the one the cue named.
            "closest_cm": round(100 * float(self.closest_each[spec.target]), 2),
            "nearest_button": COLOUR_NAMES[int(np.argmin(self.closest_each))],
            "lowest_over_cap_cm": round(100 * lowest_over_cap, 2) if math.isfinite(lowest_over_cap) else None,
            "final_above_cap_cm": round(100 * float(cell.tcp()[0][2] - cell.button_top(spec.target)[2]), 2),
            "target_error_cm": round(100 * float(np.median(target_errors)), 2) if target_errors else None,
            "memory_error_cm": round(100 * float(np.median(memory_errors)), 2) if memory_errors else None,
            "contribution": {m: round(float(c / max(ticks, 1)), 4) for m, c in zip(MODALITIES, self.contribution)},
            "wall_s": round(time.perf_counter() - self.wall0, 3),
        }


class _Recorder:
    """The episode video: the cell and the policy's camera, with the commanded joints, each modality's
    contribution and the attention between modalities drawn beside them, over time."""

    def __init__(self, cell, path: str | Path, control_rate_hz: float):
        from .sim.video import EpisodeVideo
        from .viz import PolicyPanel
        self.panel = PolicyPanel(MODALITIES, control_rate_hz)
        self.video = EpisodeVideo(cell, path, panel=self.panel)

    def tick(self, result) -> None:
        self.panel.add(result)
        self.video.maybe_frame("policy")

    def close(self) -> None:
        self.video.close("policy")

    def abort(self) -> None:
        self.video.abort()


_worker: Evaluator | None = None


def _init(config_path: str, checkpoint: str, backend: str, lockstep: int = 1) -> None:
    global _worker
    _one_torch_thread()
    _worker = Evaluator(config_path, checkpoint, backend, lockstep=lockstep)


def _one_torch_thread() -> int:
    """A worker takes one core (ONNX Runtime steps on one thread too); torch's own (the log-mel of a whole
    window, when the stream resyncs) on a second thread waited up to ~90 ms for a core the other worker held.
    Returns the count before."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def _drain(tasks, results) -> int:
    """A worker's share: episodes taken from ``tasks`` as its slots free up, results put on ``results``."""
    import queue

    def jobs():
        while True:
            try:
                yield tasks.get_nowait()
            except queue.Empty:
                return

    n = 0
    for r in _worker.run(jobs()):
        results.put(r)
        n += 1
    return n


# ---------------------------------------------------------------- many episodes


def _median(values) -> float | None:
    v = [x for x in values if x is not None]
    return round(float(np.median(v)), 2) if v else None


def summarize(episodes: list[dict]) -> dict:
    n = len(episodes)
    wins = [e for e in episodes if e["outcome"] == "success"]
    lo, hi = wilson_interval(len(wins), n)
    sim_s = sum(e["duration_s"] for e in episodes)
    return {
        "episodes": n, "successes": len(wins), "success_rate": len(wins) / n if n else float("nan"),
        "success_ci95": [lo, hi],
        "failure_reasons": dict(Counter(e["reason"] for e in episodes if e["outcome"] != "success").most_common()),
        "mean_time_to_success_s": float(np.mean([e["time_to_success_s"] for e in wins])) if wins else None,
        "intruder_contacts": int(sum(e["intruder_contacts"] for e in episodes)),
        "max_joint_speed": max((e["max_joint_speed"] for e in episodes), default=None),
        "sim_s": round(sim_s, 2),
        "median_closest_cm": _median(e.get("closest_cm") for e in episodes),
        "nearest_is_cued": sum("nearest_button" in e and e["nearest_button"] == e.get("target") for e in episodes),
        "over_cap": sum(e.get("lowest_over_cap_cm") is not None for e in episodes),
        "median_lowest_over_cap_cm": _median(e.get("lowest_over_cap_cm") for e in episodes),
        "median_final_above_cap_cm": _median(e.get("final_above_cap_cm") for e in episodes),
        "median_target_error_cm": _median(e.get("target_error_cm") for e in episodes),
        "median_memory_error_cm": _median(e.get("memory_error_cm") for e in episodes),
        "contribution": {m: round(float(np.mean([e["contribution"][m] for e in episodes])), 4) for m in MODALITIES},
    }


def evaluate(config_path: str | Path, checkpoint: str | Path, opts: EvalOptions, out: str | Path | None = None,
             progress: bool | None = None, log: Callable[[str], None] = print) -> dict:
    """Run ``opts.episodes`` episodes; writes ``out`` (JSON) when given; returns the report."""
    from tqdm import tqdm

    opts.validate()
    config_path, checkpoint = str(config_path), str(checkpoint)
    cfg = eval_config(config_path, checkpoint, opts.backend)   # refuse a mismatched checkpoint before any work
    seeds = list(range(opts.seed, opts.seed + opts.episodes))
    filmed = set(opts.video_episodes or ((opts.seed,) if opts.video else ()))
    videos = {s: _video_name(opts.video, s, len(filmed)) for s in filmed}
    jobs = [(s, opts.drops, videos.get(s)) for s in seeds]
    show = sys.stderr.isatty() if progress is None else progress
    results: list[dict] = []
    wall0 = time.perf_counter()
    with tqdm(total=len(jobs), desc="eval", unit="episode", disable=not show, file=sys.stderr) as bar:
        def done(r: dict) -> None:
            results.append(r)
            wins = sum(e["outcome"] == "success" for e in results)
            bar.set_postfix(success=f"{wins}/{len(results)}")
            bar.update()
        if opts.workers == 1 or len(jobs) == 1:
            import torch
            threads = _one_torch_thread()
            worker = None
            try:
                worker = Evaluator(config_path, checkpoint, opts.backend, lockstep=opts.lockstep)
                for r in worker.run(jobs):
                    done(r)
            finally:
                if worker is not None:
                    worker.close()
                torch.set_num_threads(threads)
        else:
            _pool(config_path, checkpoint, opts, jobs, done)
    wall = time.perf_counter() - wall0
    results.sort(key=lambda e: e["seed"])
    summary = summarize(results)
    report = {
        "tool": "mm-fusion eval", "config": config_path, "checkpoint": checkpoint,
        "strategy": cfg.model.fusion.strategy, "modalities": list(cfg.model.modalities),
        "backend": opts.backend, "seeds": [seeds[0], seeds[-1]], "drops": [str(d) for d in opts.drops],
        "workers": opts.workers, "lockstep": opts.lockstep, "summary": summary, "videos": sorted(videos.values()),
        "throughput": {"wall_s": round(wall, 2), "episodes_per_min": round(60 * len(results) / wall, 2),
                       "x_realtime_per_worker": round(summary["sim_s"] / wall / opts.workers, 2)},
        "episodes": results,
    }
    if out:
        write_json_atomic(Path(out), report)
    return report


def _pool(config_path: str, checkpoint: str, opts: EvalOptions, jobs: list, done: Callable[[dict], None]) -> None:
    """``opts.workers`` processes taking episodes from one queue as their slots free up (no worker idles while
    another has a backlog, and none waits for a chunk's longest episode)."""
    import multiprocessing as mp
    import queue
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_init,
                                                       initargs=(config_path, checkpoint, opts.backend,
                                                                 opts.lockstep)) as pool:
        tasks, results = manager.Queue(), manager.Queue()
        for j in jobs:
            tasks.put(j)
        futures = [pool.submit(_drain, tasks, results) for _ in range(opts.workers)]
        received = 0
        while received < len(jobs):
            try:
                r = results.get(timeout=0.5)
            except queue.Empty:
                for f in futures:
                    if f.done() and f.exception() is not None:
                        raise f.exception()
                if all(f.done() for f in futures) and results.empty():
                    raise RuntimeError(f"eval: the workers stopped after {received} of {len(jobs)} episodes")
                continue
            received += 1
            done(r)


def _video_name(path: str, seed: int, count: int) -> str:
    if count <= 1:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}_{seed:06d}{p.suffix}"))


def table(report: dict) -> str:
    s = report["summary"]
    lo, hi = s["success_ci95"]
    lines = [f"{'seed':>7} {'outcome':<8} {'reason':<26} {'t (s)':>6} {'contacts':>8} {'max |qd|':>8} "
             f"{'closest':>8} {'nearest':>8} {'over cap':>8} {'est. err':>8}"]
    for e in report["episodes"]:
        est = e.get("target_error_cm", e.get("memory_error_cm"))
        low = e.get("lowest_over_cap_cm")
        lines.append(f"{e['seed']:>7} {e['outcome']:<8} {e['reason']:<26} {e['duration_s']:>6.2f} "
                     f"{e['intruder_contacts']:>8} {e['max_joint_speed']:>8.3f} {e['closest_cm']:>6.1f}cm "
                     f"{e.get('nearest_button', '-'):>8} "
                     + (f"{low:>6.1f}cm " if low is not None else f"{'-':>8} ")
                     + (f"{est:>6.1f}cm" if est is not None else f"{'-':>8}"))
    t = report["throughput"]
    mtts = s["mean_time_to_success_s"]
    lines += ["", f"success {s['successes']}/{s['episodes']} = {100 * s['success_rate']:.1f}% "
              f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%), mean time to success "
              f"{mtts:.2f} s" if mtts is not None else
              f"success {s['successes']}/{s['episodes']} = {100 * s['success_rate']:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)",
              "failures: " + (", ".join(f"{k} {v}" for k, v in s["failure_reasons"].items()) or "none"),
              "contribution: " + ", ".join(f"{k} {v:.2f}" for k, v in s["contribution"].items()),
              f"closest approach to the cued button (median): {s.get('median_closest_cm')} cm; "
              f"the button the tool came nearest was the cued one in {s.get('nearest_is_cued')}/{s['episodes']}"
              + (f"; the policy's estimate of it off by {s['median_target_error_cm']} cm (median)"
                 if s.get("median_target_error_cm") is not None else "")
              + (f"; the cue memory held it {s['median_memory_error_cm']} cm off while the tool was near and low "
                 "(median)" if s.get("median_memory_error_cm") is not None else ""),
              f"over the cued cap in {s.get('over_cap')}/{s['episodes']}, lowest there "
              f"{s.get('median_lowest_over_cap_cm')} cm above it (median); at the end "
              f"{s.get('median_final_above_cap_cm')} cm above it (median)",
              f"{t['episodes_per_min']:.1f} episodes/min, {t['x_realtime_per_worker']:.1f}x real time per worker "
              f"({report['workers']} worker(s), {report.get('lockstep', 1)} episode(s) each in lockstep)"]
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_eval_command(add: Callable, default_config: str) -> None:
    p = add("eval", "evaluate a checkpoint in closed loop in the simulated cell (in-process, sim time)")
    p.set_defaults(config=default_config, func=cmd_eval)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--episodes", type=int, default=EvalOptions.episodes)
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="first seed (episodes use seed, seed + 1, ...)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (results do not depend on it)")
    p.add_argument("--lockstep", type=int, default=EvalOptions.lockstep, metavar="K",
                   help="episodes each worker steps at once through one engine call exported for a batch of K "
                        "(default 1: the live node's batch-1 engine; README item 31)")
    p.add_argument("--backend", default="onnxruntime", help="engine backend (default onnxruntime)")
    p.add_argument("--drop", action="append", default=[], metavar="MODALITY:DURATION@START",
                   help="silence a sensor mid-episode, e.g. camera:2.0@3.0 (repeatable)")
    p.add_argument("--video", default="", help="MP4 of the first episode (or of --video-episodes)")
    p.add_argument("--video-episodes", default="", help="comma-separated seeds to film")
    p.add_argument("--out", default="", help="JSON report (default: CHECKPOINT with .eval.json)")


def cmd_eval(args, _cfg: RobotConfig) -> int:
    try:
        drops = tuple(Drop.parse(d) for d in args.drop)
        filmed = tuple(int(s) for s in args.video_episodes.split(",") if s.strip())
        opts = EvalOptions(episodes=args.episodes, seed=args.seed, workers=args.workers, lockstep=args.lockstep,
                           backend=args.backend,
                           drops=drops, video=args.video, video_episodes=filmed)
        out = args.out or str(Path(args.checkpoint).with_suffix(".eval.json"))
        report = evaluate(args.config, args.checkpoint, opts, out)
    except (EvalError, ConfigError, ValueError) as exc:
        print(f"mm-fusion eval: {exc}", file=sys.stderr)
        return 2
    print(table(report))
    print(f"eval: wrote {out}")
    return 0

