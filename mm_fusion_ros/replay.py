"""Offline replay of a bag through the live loop's core, and comparison against a golden run.

``mm-fusion replay BAG --out OUT`` feeds the bag's sensor messages, in the
order the recorder received them, through the same conversions, aligner,
engine and safety filter as ``fusion_node`` (``Runtime``), ticking at the
control rate on the bag's clock (multiples of the control period, as a sim-time
timer does): before a message received at ``r`` is added,
every tick at or before ``r`` has run. Alignment uses the messages' capture
stamps, exactly as live. No DDS, no sleeping (unless ``--rate-limit``), so it
runs as fast as the machine goes.

Each tick writes ``/mm_fusion/action``, ``/mm_fusion/joint_command``,
``/mm_fusion/fused_state`` and ``/diagnostics`` to OUT (an MCAP bag by
default), stamped with the tick's bag time, and ``OUT.summary.json`` holds the
run's summary. Nothing in the output depends on the wall clock, so two runs on
the same bag and config give the same message bytes.

``--compare GOLDEN`` then measures, per topic, the largest absolute difference
to a golden output bag and the first tick past ``--tolerance``; the exit code
is 1 past tolerance (a CI regression gate after changing a model or a parameter).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .bag import messages as M
from .bag.reader import BagError, BagMessage, BagReader, DecodeError
from .bag.typestore import DEFAULT_DISTRO, DISTROS, distro_of, make_typestore
from .bag.writer import BagWriter
from .config import MODALITIES, NODE_NAME, RobotConfig, resolve_name
from .files import write_json_atomic
from .memory import keep_freed_memory
from .samples import BadSample

OUTPUT_TYPES = {
    "action": "std_msgs/msg/Float64MultiArray",
    "joint_command": "sensor_msgs/msg/JointState",
    "fused_state": "std_msgs/msg/Float32MultiArray",
    "preview": "std_msgs/msg/Float64MultiArray",
    "diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
}
TICK_TOPIC = resolve_name("~/tick")   # where fusion_node publishes each tick's status: /fusion_node/tick


class ReplayError(ValueError):
    """A bag that cannot be replayed against this config (named in the message)."""


def _err(msg: str) -> None:
    print(f"mm-fusion: {msg}", file=sys.stderr)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def summary_path_for(out: Path) -> Path:
    return out.parent / f"{out.name}.summary.json"


# ---------------------------------------------------------------- messages -> samples

class InputDecoder:
    """Turns one decoded bag message into samples for the runtime, by the type the bag holds.

    The bag's own type wins over ``inputs.<sensor>.type``: a bag recorded with compressed images
    replays without editing the config (the difference is logged).
    """

    def __init__(self, cfg: RobotConfig, topics: dict[str, str], log: Callable[[str], None]):
        from .ros import convert

        self.cfg, self.log, self.c = cfg, log, convert
        inputs = cfg.inputs
        self.audio_info = None
        self.handlers: dict[str, Callable[[object], list]] = {}
        for name in MODALITIES:
            section = getattr(inputs, name)
            msgtype = topics.get(section.topic)
            if msgtype is None:
                continue
            handler = convert.sample_converter(name, msgtype, cfg, lambda: self.audio_info)
            if handler is None:
                raise ReplayError(f"topic {section.topic} ({name}) holds {msgtype}, which is not a {name} "
                                  "message type")
            configured = M.INPUT_MSGTYPES.get((name, getattr(section, "type", "")))
            if configured != msgtype:
                log(f"replay: {section.topic} holds {msgtype} where inputs.{name}.type says {configured}; "
                    "decoding what the bag holds")
            self.handlers[section.topic] = handler
        # AudioInfo (ros-drivers) describes the AudioDataStamped stream; mgonzs13's chunks carry their own.
        if topics.get(inputs.audio.topic) == "audio_common_msgs/msg/AudioDataStamped" \
                and topics.get(inputs.audio.info_topic) == "audio_common_msgs/msg/AudioInfo":
            self.handlers[inputs.audio.info_topic] = self._info

    def _info(self, msg: object) -> list:
        self.audio_info = self.c.audio_format_from_info(msg)
        return []

    def samples(self, msg: object, topic: str) -> list:
        out = self.handlers[topic](msg)
        if out is None:
            return []
        return list(out) if isinstance(out, (list, tuple)) else [out]


# ---------------------------------------------------------------- ticks -> output messages

@dataclass
class _Outputs:
    """Writes one tick's outputs as fusion_node publishes them (``fusion_node._publish``): the command
    on the action and joint topics when commanded, else on the preview topic; the fused state when
    finite; the tick's status on ``~/tick`` (``/fusion_node/tick``). The node's periodic report (cadence in wall-clock milliseconds)
    is left out: it would make two replays of one bag differ; it is in the summary instead."""

    cfg: RobotConfig
    bag: BagWriter

    def __post_init__(self) -> None:
        o = self.cfg.outputs
        self.topics = {"action": o.action_topic, "joint_command": o.joint_command_topic,
                       "fused_state": o.fused_state_topic, "preview": o.preview_topic,
                       "diagnostics": TICK_TOPIC}
        for key, topic in self.topics.items():
            self.bag.add_topic(topic, OUTPUT_TYPES[key])

    def write(self, t_ns: int, result: object, status: object) -> None:
        ts, bag = self.bag.typestore, self.bag
        command = np.asarray(result.safety.command, np.float64)
        if result.safety.commanded:
            bag.write(self.topics["action"], t_ns, M.float64_array(ts, command))
            bag.write(self.topics["joint_command"], t_ns,
                      M.joint_state(ts, t_ns, self.cfg.model.action.names, velocity=command))
        else:
            bag.write(self.topics["preview"], t_ns, M.float64_array(ts, command))
        fused = np.asarray(result.fused_state, np.float32).reshape(-1)
        if np.isfinite(fused).all():
            bag.write(self.topics["fused_state"], t_ns, M.float32_array(ts, fused))
        diag = M.diagnostic_status(ts, f"{NODE_NAME}: {status.name}", status.level, status.message,
                                   status.values, hardware_id=f"/{NODE_NAME}")
        bag.write(self.topics["diagnostics"], t_ns, M.diagnostic_array(ts, t_ns, [diag]))


# ---------------------------------------------------------------- replay

@dataclass(frozen=True)
class ReplayOptions:
    out: Path
    storage: str = "mcap"
    rate_limit: float | None = None    # None: as fast as possible; x: at most x times real time
    progress: bool | None = None       # None: when stderr is a terminal
    distro: str | None = None          # None: the config's
    plot: Path | None = None           # a PNG of commands, modality contributions and masks, compute time


@dataclass
class ReplayResult:
    out: Path
    summary_path: Path
    ticks: int
    bag_s: float
    wall_s: float
    summary: dict = field(default_factory=dict)

    @property
    def speed(self) -> float:
        return self.bag_s / self.wall_s if self.wall_s > 0 else math.inf


def _check_topics(cfg: RobotConfig, reader: BagReader, log: Callable[[str], None]) -> dict[str, str]:
    """Which configured inputs the bag has; a missing optional one is masked, a required one held."""
    topics = {name: info.msgtype for name, info in reader.topics.items() if name not in reader.unknown_types}
    present = []
    for name in MODALITIES:
        topic = getattr(cfg.inputs, name).topic
        if topic in topics:
            present.append(name)
            continue
        why = ("it is required, so the watchdog holds the output throughout" if name in cfg.inputs.required
               else "it will be masked, as live")
        known = f" (its type {reader.unknown_types[topic]} is unknown)" if topic in reader.unknown_types else ""
        log(f"replay: configured {name} topic {topic} is not in the bag{known}; {why}")
    if not present:
        listing = ", ".join(f"{k} [{v.msgtype}]" for k, v in reader.topics.items()) or "nothing"
        raise ReplayError(f"{reader.path} has none of the configured input topics "
                          f"({', '.join(getattr(cfg.inputs, n).topic for n in MODALITIES)}); it holds: {listing}")
    return topics


def replay(bag: str | Path, cfg: RobotConfig, opts: ReplayOptions, runtime: object | None = None,
           log: Callable[[str], None] = _log) -> ReplayResult:
    """Replay ``bag`` through a Runtime for ``cfg`` and write the output bag and its summary."""
    from tqdm import tqdm

    cfg = cfg.absolute()   # a bag holds absolute topic names; the config may give relative ones

    keep_freed_memory()   # every camera message read is a ~900 KiB buffer: see mm_fusion_ros.memory
    distro = opts.distro or distro_of(cfg)
    if Path(opts.out).resolve() == Path(bag).resolve():
        raise ReplayError(f"--out {opts.out} is the bag being replayed; choose another path")
    with BagReader(bag, distro=distro, log=log) as reader:
        topics = _check_topics(cfg, reader, log)
        decoder = InputDecoder(cfg, topics, log)
        if runtime is None:
            from .runtime import Runtime
            runtime = Runtime(cfg, log=log)
        runtime.set_enabled(True)   # commands, not a dry-run preview: what the arm would have received
        period_ns = int(round(1e9 / cfg.control_rate_hz))
        start_ns = reader.start_ns
        read = {topic: 0 for topic in decoder.handlers}
        out = Path(opts.out)
        show = sys.stderr.isatty() if opts.progress is None else opts.progress
        total = sum(reader.topics[t].count for t in decoder.handlers)
        ticks = 0
        history: list[tuple] | None = [] if opts.plot else None
        wall0 = time.perf_counter()

        def pace(t_ns: int) -> None:
            if opts.rate_limit:
                ahead = (t_ns - start_ns) / 1e9 / opts.rate_limit - (time.perf_counter() - wall0)
                if ahead > 0:
                    time.sleep(ahead)

        def tick(t_ns: int) -> None:
            nonlocal ticks
            pace(t_ns)
            tick_start = time.perf_counter()
            result = runtime.tick(t_ns / 1e9)
            publish_start = time.perf_counter()
            outputs.write(t_ns, result, runtime.tick_status(result))
            runtime.record(result, time.perf_counter() - publish_start, tick_start)
            if history is not None:
                history.append((t_ns, result.safety.command, result.contribution, result.mask, result.compute_s))
            ticks += 1

        ts_out = make_typestore(distro)
        with BagWriter(out, ts_out, storage=opts.storage, overwrite=True,
                       custom_data={"mm_fusion_ros.replay_of": str(Path(bag).resolve())}) as out_bag, \
                tqdm(total=total, desc="replay", unit="msg", disable=not show, file=sys.stderr) as bar:
            outputs = _Outputs(cfg, out_bag)
            def fed(msg: BagMessage) -> None:
                read[msg.topic] += 1
                bar.update(1)

            drive(reader, decoder, runtime, period_ns, tick, fed)
        wall = time.perf_counter() - wall0
        bag_s = ticks * period_ns / 1e9
        summary = dict(runtime.summary())
        summary["replay"] = {
            "bag": str(bag), "out": str(out), "ros_distro": distro, "audio_common_msgs": reader.audio_flavour,
            "bag_duration_s": round(reader.duration_s, 6), "replayed_s": round(bag_s, 6),
            "wall_s": round(wall, 3), "speed_x_realtime": round(bag_s / wall, 2) if wall > 0 else None,
            "messages_read": read, "missing_topics": sorted(
                getattr(cfg.inputs, n).topic for n in MODALITIES if getattr(cfg.inputs, n).topic not in topics),
            "unknown_types": dict(reader.unknown_types), "bag_problems": list(reader.problems),
        }
    summary_path = summary_path_for(out)
    write_json_atomic(summary_path, summary, sort_keys=True)
    if history:
        _plot(history, cfg, opts.plot, f"replay of {Path(bag).name}: {ticks} ticks", log)
    return ReplayResult(out, summary_path, ticks, bag_s, wall, summary)


def _plot(history: list[tuple], cfg: RobotConfig, path: Path, title: str, log: Callable[[str], None]) -> None:
    from .plots import plot_replay

    t_ns, command, contribution, mask, compute_s = zip(*history)
    t = (np.asarray(t_ns, np.int64) - t_ns[0]) / 1e9
    plot_replay(t, np.asarray(command, np.float64), np.asarray(contribution, np.float64),
                np.asarray(mask, np.float64), np.asarray(compute_s) * 1e3, list(cfg.model.action.names),
                list(MODALITIES), path, title, log)


def drive(reader: BagReader, decoder: InputDecoder, runtime: object, period_ns: int,
          tick: Callable[[int], None], fed: Callable[[BagMessage], None] = lambda msg: None) -> None:
    """The bag's input messages into ``runtime`` in receive order, calling ``tick(t_ns)`` on the
    control-period grid of the bag's clock (what a sim-time timer does, see bag_player): before a
    message received at ``r`` is added, every tick at or before ``r`` has run. Replay and the
    training dataset both run through here, so they see the same ticks and the same inputs.

    One thread on purpose: a reader or writer thread fights the control loop for the GIL and
    for the cores, and measured slower (5.7x against 8x real time on two cores).
    """
    next_tick = (reader.start_ns // period_ns + 1) * period_ns
    for msg in reader.messages(topics=list(decoder.handlers)):
        while next_tick <= msg.t_ns:
            tick(next_tick)
            next_tick += period_ns
        _feed(reader, decoder, runtime, msg)
        fed(msg)
    while next_tick <= reader.end_ns:
        tick(next_tick)
        next_tick += period_ns


def _feed(reader: BagReader, decoder: InputDecoder, runtime: object, msg: BagMessage) -> None:
    """One bag message into the runtime; a bad one is counted by cause and dropped, as live."""
    try:
        samples = decoder.samples(reader.decode(msg), msg.topic)
    except DecodeError:
        runtime.count_bad("undecodable")
        return
    except BadSample as exc:
        runtime.count_bad(exc.cause)
        return
    now = msg.t_ns / 1e9
    for sample in samples:
        runtime.add(sample, now)


# ---------------------------------------------------------------- compare

@dataclass(frozen=True)
class TopicDeviation:
    topic: str
    ticks: int                     # ticks present in both bags
    max_abs: float                 # largest absolute difference of any value at any tick
    first_over_tick: int | None    # index of the first tick past tolerance
    first_over_t: float | None     # its bag time (s)
    only_out: int = 0              # ticks in the output but not the golden bag, and the reverse
    only_golden: int = 0

    def passed(self, tolerance: float) -> bool:
        return self.first_over_tick is None and not self.only_out and not self.only_golden


@dataclass(frozen=True)
class Comparison:
    tolerance: float
    topics: tuple[TopicDeviation, ...]

    @property
    def passed(self) -> bool:
        return all(t.passed(self.tolerance) for t in self.topics)

    def lines(self) -> list[str]:
        out = [f"compare (tolerance {self.tolerance:g}):"]
        for d in self.topics:
            where = "" if d.first_over_tick is None else \
                f", first past tolerance at tick {d.first_over_tick} (t={d.first_over_t:.3f} s)"
            extra = "" if not (d.only_out or d.only_golden) else \
                f", {d.only_out} tick(s) only in the output, {d.only_golden} only in the golden bag"
            state = "ok" if d.passed(self.tolerance) else "FAIL"
            out.append(f"  {state:4s} {d.topic:28s} {d.ticks:6d} ticks  max |diff| {d.max_abs:.3g}{where}{extra}")
        out.append("compare: " + ("passed" if self.passed else "FAILED"))
        return out


def message_values(msg: object) -> np.ndarray:
    """The numbers a regression cares about in one output message, flattened."""
    kind = msg.__msgtype__
    if kind in ("std_msgs/msg/Float64MultiArray", "std_msgs/msg/Float32MultiArray"):
        return np.asarray(msg.data, np.float64)
    if kind == "sensor_msgs/msg/JointState":
        return np.concatenate([np.asarray(msg.position, np.float64), np.asarray(msg.velocity, np.float64),
                               np.asarray(msg.effort, np.float64)])
    if kind == "diagnostic_msgs/msg/DiagnosticArray":
        values = []
        for status in msg.status:
            values.append(float(status.level))
            for kv in status.values:
                try:
                    values.append(float(kv.value))
                except ValueError:
                    pass  # words (reasons, names) are not measured
        return np.asarray(values, np.float64)
    raise ValueError(f"cannot compare messages of type {kind}")


def _deviation(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    same = (a == b) | (np.isnan(a) & np.isnan(b))   # equal infinities and NaN against NaN count as equal
    with np.errstate(invalid="ignore"):
        diff = np.abs(a - b)
    diff[same] = 0.0
    diff[np.isnan(diff)] = math.inf
    return float(diff.max()) if diff.size else 0.0


def _series(reader: BagReader, topic: str) -> dict[int, np.ndarray]:
    return {m.t_ns: message_values(reader.decode(m)) for m in reader.messages(topics=[topic])}


def compare_bags(out: str | Path, golden: str | Path, tolerance: float, distro: str = DEFAULT_DISTRO,
                 log: Callable[[str], None] = _log) -> Comparison:
    """Per-topic largest deviation of ``out`` from ``golden``, ticks matched by bag time."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ReplayError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    with BagReader(out, distro=distro, log=log) as a, BagReader(golden, distro=distro, log=log) as b:
        topics = sorted(t for t in set(a.topics) | set(b.topics)
                        if t not in b.unknown_types and t not in a.unknown_types
                        and (t in a.topics and a.topics[t].count or t in b.topics and b.topics[t].count))
        missing = [t for t in topics if t not in a.topics]
        if missing:
            log(f"compare: the output lacks golden topic(s) {', '.join(missing)}")
        result = []
        for topic in topics:
            golden_series = _series(b, topic) if topic in b.topics else {}
            out_series = _series(a, topic) if topic in a.topics else {}
            common = sorted(set(golden_series) & set(out_series))
            max_abs, first, first_t = 0.0, None, None
            for i, t_ns in enumerate(common):
                dev = _deviation(out_series[t_ns], golden_series[t_ns])
                max_abs = max(max_abs, dev)
                if first is None and dev > tolerance:
                    first, first_t = i, t_ns / 1e9
            result.append(TopicDeviation(topic, len(common), max_abs, first, first_t,
                                         len(set(out_series) - set(golden_series)),
                                         len(set(golden_series) - set(out_series))))
    return Comparison(tolerance, tuple(result))


# ---------------------------------------------------------------- command line

def _rate_limit(text: str) -> float | None:
    if text.lower() in ("none", "0", ""):
        return None
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"--rate-limit must be 'none' or a positive factor of real time, got {text}")
    return value


def cmd_replay(args, cfg: RobotConfig) -> int:
    out = Path(args.out)
    try:
        result = replay(args.bag, cfg, ReplayOptions(out=out, storage=args.storage, rate_limit=args.rate_limit,
                                                     progress=None, distro=args.ros_distro,
                                                     plot=Path(args.plot) if args.plot else None))
    except (BagError, ReplayError) as exc:
        _err(str(exc))
        return 2
    rep = result.summary.get("replay", {})
    print(f"replay: {result.ticks} ticks over {result.bag_s:.2f} s of bag in {result.wall_s:.2f} s "
          f"({result.speed:.1f}x real time); wrote {result.out} and {result.summary_path}")
    if rep.get("bag_problems"):
        print(f"replay: the bag had {len(rep['bag_problems'])} problem(s); see bag_problems in the summary")
    if args.compare:
        try:
            comparison = compare_bags(out, args.compare, args.tolerance, distro=args.ros_distro or distro_of(cfg))
        except (BagError, ReplayError) as exc:
            _err(f"compare: {exc}")
            return 2
        print("\n".join(comparison.lines()))
        return 0 if comparison.passed else 1
    return 0


def cmd_make_bag(args, cfg: RobotConfig) -> int:
    from .bag.make_bag import Faults, MakeBagError, MakeBagOptions, make_bag
    from .bag.writer import BagWriteError

    try:
        width, height = (int(v) for v in args.camera_size.lower().split("x"))
    except ValueError:
        _err(f"--camera-size must look like 640x480, got {args.camera_size!r}")
        return 2
    try:
        opts = MakeBagOptions(duration_s=args.duration, storage=args.storage, faults=Faults.parse(args.faults),
                              seed=args.seed, camera_width=width, camera_height=height,
                              distro=args.ros_distro)
        make_bag(args.out, cfg, opts, log=print)
    except (MakeBagError, BagWriteError) as exc:
        _err(str(exc))
        return 2
    return 0


def add_replay_commands(add: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register ``make-bag`` and ``replay`` with the mm-fusion parser (``add`` gives --config)."""
    p = add("make-bag", "write a synthetic bag: all four sensors at their real rates, optional faults")
    p.add_argument("out", help="bag folder to create (must not exist)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds (default: %(default)s)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--faults", default="", help="comma-separated: dropout[:sensor], out_of_order, duplicate, "
                                                "nan, corrupt_image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--camera-size", default="640x480", help="WIDTHxHEIGHT (default: %(default)s)")
    p.add_argument("--ros-distro", choices=sorted(DISTROS), help="message definitions (default: the config's)")
    p.set_defaults(func=cmd_make_bag)

    p = add("replay", "replay a bag offline through the live loop's core; write outputs and a summary")
    p.add_argument("bag", help="rosbag2 folder, or a .mcap / .db3 file")
    p.add_argument("--out", required=True, help="output bag folder (replaced if it exists)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="output storage")
    p.add_argument("--rate-limit", type=_rate_limit, default=None, metavar="none|X",
                   help="'none' (default): as fast as possible; X: at most X times real time")
    p.add_argument("--compare", metavar="GOLDEN_BAG", help="compare the output with a golden output bag")
    p.add_argument("--tolerance", type=float, default=1e-6, help="largest allowed |difference| (default: %(default)s)")
    p.add_argument("--backend", help="override engine.backend")
    p.add_argument("--ros-distro", choices=sorted(DISTROS), help="message definitions (default: the config's)")
    p.add_argument("--plot", metavar="PNG", help="plot commands, modality contributions and masks, and compute "
                                                "time per tick over bag time to this file")
    p.set_defaults(func=cmd_replay)
