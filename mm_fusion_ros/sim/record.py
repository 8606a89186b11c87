"""``mm-fusion record``: scripted-expert demonstrations in the cell, one rosbag2 bag per episode.

A recorded bag has the shape of one from a real robot: the sensor topics and
types that the config's ``fusion_node`` block subscribes to (the same ones
``sim_node`` publishes, ``/joint_states`` among them), what the arm was commanded
(``outputs.action_topic``, Float64MultiArray as a forward velocity controller
takes it) and the expert's clean command as the label (``/expert/joint_command``,
a stamped JointState: with DART noise the two differ). Header stamps are capture
times on the sim clock; bag timestamps are receive times (commands: the tick).

Layout of OUT_DIR::

    episode_000123/            the bag (MCAP), named by its seed; appears only when complete
    episode_000123.json        seed, task, outcome, reason, stats, message counts, bytes
    index.json                 the set: config hash, options, every finished episode

The episode's JSON is written after its bag is in place, and ``index.json`` is
rewritten (atomically) after each episode, so an interrupted recording leaves
whole episodes only; ``--resume`` skips the seeds whose bag and JSON are both
there and removes what an interrupted run left half written.

Runs in-process (no DDS), faster than real time, optionally over ``--workers``
processes; an episode depends only on its seed, never on the worker count.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..bag import messages as M
from ..bag.writer import BagWriter
from ..config import ConfigError, RobotConfig, load_config
from ..files import write_json_atomic
from .bridge import BridgeError, CellMessages, cell_topics
from .config import load_cell_config
from .gl import RenderBackendError, check_backend
from .panda import JOINT_NAMES
from .readings import ArrivalQueue

LABEL_TOPIC = "/expert/joint_command"
INDEX = "index.json"
TOOL = "mm-fusion record"


class RecordError(ValueError):
    """Options, config or an output folder that record cannot work with."""


@dataclass(frozen=True)
class RecordOptions:
    episodes: int
    seed: int = 0                 # first seed; episodes use seed, seed + 1, ...
    noise: float = 0.0            # rad/s: DART perturbation of the executed command (the label stays clean)
    noise_tau: float = 0.0        # s: its drift's time constant (0: white noise; see expert.DartNoise)
    workers: int = 1
    resume: bool = False
    storage: str = "mcap"
    control_rate_hz: float = 100.0
    # DAgger (Ross et al. 2011): a checkpoint that drives the arm through the same loop as eval (Runtime,
    # ONNX Runtime, safety filter) while the expert, following the cell, labels every tick with what it
    # would command there: the states the policy itself gets into, with the way back out of them.
    policy: str = ""
    expert_share: float = 0.0     # with --policy: the share of ticks on which the expert's command is executed
    # With --policy: the share of episodes in which one of the config's required sensors goes silent for a while
    # (``episode_gap``). The watchdog halts the arm, and the expert labels the way on from there: states that
    # clean episodes never show the policy (README item 29: a policy that never saw a watchdog halt took the
    # halt of a 2 s camera gap for the detent's click and hovered above the button until the timeout).
    gap_share: float = 0.0

    def validate(self) -> None:
        if self.policy:
            if not Path(self.policy).is_file():
                raise RecordError(f"--policy: no checkpoint at {self.policy}")
            if self.noise:
                raise RecordError("--noise perturbs the expert's demonstrations; with --policy the policy "
                                  "drives and needs none: drop one of them")
        if not (math.isfinite(self.expert_share) and 0 <= self.expert_share < 1):
            raise RecordError(f"--expert-share must be in [0, 1), got {self.expert_share}")
        if self.expert_share and not self.policy:
            raise RecordError("--expert-share mixes the expert into a policy's episodes: it needs --policy")
        if not (math.isfinite(self.gap_share) and 0 <= self.gap_share <= 1):
            raise RecordError(f"--gap-share must be in [0, 1], got {self.gap_share}")
        if self.gap_share and not self.policy:
            raise RecordError("--gap-share silences a sensor the policy reads: it needs --policy (the expert reads "
                              "the cell, not the sensors, so its episode would only lose messages; training's "
                              "--modality-dropout does that)")

        if not 1 <= self.episodes <= 100_000:
            raise RecordError(f"--episodes must be in [1, 100000], got {self.episodes}")
        if self.seed < 0:
            raise RecordError(f"--seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.noise) and 0 <= self.noise <= 1.0):
            raise RecordError(f"--noise must be in [0, 1] rad/s, got {self.noise}")
        if not (math.isfinite(self.noise_tau) and 0 <= self.noise_tau <= 60.0):
            raise RecordError(f"--noise-tau must be in [0, 60] s, got {self.noise_tau}")
        if not 1 <= self.workers <= 64:
            raise RecordError(f"--workers must be in [1, 64], got {self.workers}")
        if self.storage not in ("mcap", "sqlite3"):
            raise RecordError(f"--storage must be mcap or sqlite3, got {self.storage!r}")


# A sensor gap's length and start (s after the episode's start), uniform: from a few missed frames to the 2 s
# of the degradation table, while the arm is on its way (the cue plays at 0.5 s; a clean episode takes 5-8 s).
GAP_DURATION_S = (0.5, 2.5)
GAP_START_S = (1.0, 6.0)


def episode_gap(seed: int, share: float, sensors: tuple[str, ...]):
    """The sensor gap of episode ``seed`` (an ``evaluate.Drop``), or None: one of ``sensors`` in ``share`` of the
    episodes. It depends on the seed alone, never on the worker or on the other options."""
    from ..evaluate import Drop
    rng = np.random.default_rng([seed, 13])
    if not sensors or rng.random() >= share:
        return None
    sensor = sensors[int(rng.integers(len(sensors)))]
    return Drop(sensor, round(float(rng.uniform(*GAP_DURATION_S)), 3), round(float(rng.uniform(*GAP_START_S)), 3))


def episode_name(seed: int) -> str:
    return f"episode_{seed:06d}"


def config_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- one episode (runs in a worker)

class _EpisodeRecorder:
    """Holds a Cell (and its renderer) for the worker's lifetime; records one episode per call."""

    def __init__(self, config_path: str, policy: str = ""):
        from .cell import Cell
        self.robot = load_config(config_path)
        self.cell_cfg = load_cell_config(config_path)
        self.bridge = CellMessages(self.robot, self.cell_cfg)
        self.topics, self.ts = self.bridge.topics, self.bridge.ts
        self.cell = Cell(self.cell_cfg)
        self.loop = None
        if policy:
            from ..evaluate import PolicyLoop
            self.loop = PolicyLoop(config_path, policy, "onnxruntime")

    def close(self) -> None:
        self.cell.close()
        if self.loop is not None:
            self.loop.close()

    def record(self, out_dir: str, seed: int, noise: float, noise_tau: float, storage: str,
               control_rate_hz: float, expert_share: float = 0.0, gap_share: float = 0.0) -> dict:
        from ..evaluate import reading_modality
        from .expert import DartNoise, Expert, expert_commands
        cell, ts, topics, loop = self.cell, self.ts, self.topics, self.loop
        wall0 = time.perf_counter()
        spec = cell.reset(seed)
        clock_start = cell.t
        expert = Expert(cell)
        dart = DartNoise(np.random.default_rng([seed, 7]), noise, noise_tau, 1.0 / control_rate_hz)
        share_rng = np.random.default_rng([seed, 11])
        # A silent sensor: the policy gets none of its readings, and neither does the bag (as a robot's would).
        gap = episode_gap(seed, gap_share, tuple(self.robot.inputs.required)) if loop is not None else None
        gaps = (gap,) if gap is not None else ()
        tick_ns = loop.start(cell.t, gaps) if loop is not None else 0
        expert_ticks = ticks = 0
        queue = ArrivalQueue()
        name = episode_name(seed)
        bag_path = Path(out_dir) / name
        custom = {"mm_fusion_ros.episode": json.dumps(spec.as_dict())}
        period = 1.0 / control_rate_hz
        with BagWriter(bag_path, ts, storage=storage, custom_data=custom) as bag:
            def write(r) -> None:   # a reading as its driver's message; none from a silent sensor
                if not any(g.silences(reading_modality(r), r.stamp - clock_start) for g in gaps):
                    topic, msg = self.bridge.message(r)
                    bag.write(topic, M.stamp_ns(r.receive), msg)

            for topic, msgtype in (topics.camera, topics.audio, topics.lidar, topics.imu):
                bag.add_topic(topic, msgtype)
            bag.add_topic(self.topics.joint_states, "sensor_msgs/msg/JointState")
            bag.add_topic(topics.command, "std_msgs/msg/Float64MultiArray")
            bag.add_topic(LABEL_TOPIC, "sensor_msgs/msg/JointState")
            if topics.audio[1] == M.INPUT_MSGTYPES[("audio", "audio_data_stamped")]:
                bag.add_topic(topics.audio_info, "audio_common_msgs/msg/AudioInfo")
            info_next = cell.t
            t = cell.t
            while not cell.outcome.done:
                if loop is None:
                    clean, executed = expert_commands(expert, dart)
                else:
                    result = loop.tick(tick_ns)
                    clean = expert.act()
                    executed = np.asarray(result.safety.command, np.float64)
                    if share_rng.random() < expert_share:
                        executed, expert_ticks = clean, expert_ticks + 1
                ticks += 1
                cell.command(executed)
                t_ns = M.stamp_ns(t)
                bag.write(topics.command, t_ns, M.float64_array(ts, executed))
                bag.write(LABEL_TOPIC, t_ns, M.joint_state(ts, t_ns, JOINT_NAMES, velocity=clean))
                if topics.audio_info in bag.counts and t >= info_next:
                    # Once a second, so a reader starting mid-bag still learns the stream's format.
                    bag.write(topics.audio_info, t_ns, M.audio_info(ts, self.cell_cfg.audio.sample_rate))
                    info_next += 1.0
                if loop is None:
                    t += period
                else:   # on the Runtime's integer tick grid, as eval runs it
                    tick_ns += loop.period_ns
                    t = tick_ns / 1e9
                queue.push(cell.advance(t))
                due = queue.pop_due(t)
                for r in due:
                    write(r)
                if loop is not None:
                    loop.receive(due, tick_ns)
            for r in queue.drain():   # in flight when the episode ended: a recorder would still get them
                write(r)
            counts = dict(bag.counts)
        o, st = cell.outcome, cell.stats
        meta = {
            "seed": seed, "task": spec.task, "bag": name, "outcome": o.status, "reason": o.reason,
            "detail": o.detail, "duration_s": round(o.t, 4),
            "time_to_success_s": round(o.t, 4) if o.status == "success" else None,
            "noise": noise, "noise_tau": noise_tau, "spec": spec.as_dict(),
            # Who drove: the expert (a demonstration, whose failure makes it one not to clone), or a policy
            # (DAgger: its failures are the point; every tick is still labelled by the expert).
            "driver": "expert" if loop is None else "policy",
            "expert_ticks": expert_ticks if loop is not None else ticks,
            "gap": None if gap is None else {"sensor": gap.modality, "at_s": gap.at_s, "duration_s": gap.duration_s},
            # The sim clock at the episode's start: the stats' times (the click) are from it.
            "clock_start_s": clock_start,
            "stats": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(st).items()},
            "messages": counts, "bytes": _size(bag_path), "wall_s": round(time.perf_counter() - wall0, 3),
        }
        write_json_atomic(Path(out_dir) / f"{name}.json", meta)
        return meta


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


_WORKER: _EpisodeRecorder | None = None


def _worker_init(config_path: str, policy: str = "") -> None:
    global _WORKER
    _WORKER = _EpisodeRecorder(config_path, policy)


def _worker_record(args: tuple) -> dict:
    return _WORKER.record(*args)


# ---------------------------------------------------------------- the set

def _clean_partials(out: Path) -> list[str]:
    """Remove what an interrupted run left: staging folders and temporary files, bags without their JSON."""
    removed = []
    for p in out.iterdir():
        if p.name.startswith(".") and ".partial-" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
        elif p.is_dir() and p.name.startswith("episode_") and not (out / f"{p.name}.json").is_file():
            shutil.rmtree(p)
            removed.append(p.name)
    return removed


def _finished(out: Path, seed: int) -> dict | None:
    meta_path = out / f"{episode_name(seed)}.json"
    if meta_path.is_file() and (out / episode_name(seed)).is_dir():
        try:
            return json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return None
    return None


def summarize(episodes: list[dict]) -> dict:
    n = len(episodes)
    ok = [e for e in episodes if e["outcome"] == "success"]
    reasons: dict[str, int] = {}
    for e in episodes:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    from ..stats import wilson_interval
    lo, hi = wilson_interval(len(ok), n)
    return {"episodes": n, "successes": len(ok), "success_rate": len(ok) / n if n else float("nan"),
            "success_ci95": [lo, hi], "reasons": dict(sorted(reasons.items())),
            "mean_time_to_success_s": float(np.mean([e["duration_s"] for e in ok])) if ok else None,
            "mean_bytes": float(np.mean([e["bytes"] for e in episodes])) if n else None,
            "gap_episodes": sum(1 for e in episodes if e.get("gap")),
            "sim_s": float(sum(e["duration_s"] for e in episodes))}


def record(out_dir: str | Path, config_path: str | Path, opts: RecordOptions, progress: bool | None = None,
           log: Callable[[str], None] = print) -> dict:
    """Record ``opts.episodes`` expert episodes into ``out_dir``; returns the index written there."""
    from tqdm import tqdm

    opts.validate()
    config_path = str(config_path)
    robot = load_config(config_path)           # ConfigError names the key, before any work
    cell_cfg = load_cell_config(config_path)
    try:
        cell_topics(robot, cell_cfg)
    except BridgeError as exc:
        raise RecordError(str(exc)) from None
    if opts.policy:
        from ..evaluate import EvalError, eval_config
        try:
            eval_config(config_path, opts.policy, "")   # the checkpoint for this cell's model, or refused naming why
        except EvalError as exc:
            raise RecordError(f"--policy: {exc}") from None
    check_backend()
    out = Path(out_dir)
    digest = config_digest(config_path)
    policy_digest = config_digest(opts.policy) if opts.policy else None
    index_path = out / INDEX
    if out.exists() and any(out.iterdir()):
        if not opts.resume:
            raise RecordError(f"{out} is not empty; pass --resume to continue that recording, or choose a new folder")
        if index_path.is_file():
            old = json.loads(index_path.read_text())
            if old.get("config_sha256") != digest:
                raise RecordError(f"{out} was recorded with another config ({old.get('config')}); "
                                  "resume it with that config, or record into a new folder")
            if old.get("policy_sha256") != policy_digest:
                before = (old.get("options") or {}).get("policy") or "none: the expert drove"
                raise RecordError(f"{out} was recorded with another --policy ({before}); its episodes would mix "
                                  "two drivers' states: record into a new folder")
            before_gaps = float((old.get("options") or {}).get("gap_share") or 0.0)
            if before_gaps != opts.gap_share:
                raise RecordError(f"{out} was recorded with --gap-share {before_gaps:g}, not {opts.gap_share:g}: "
                                  "resume it with that, or record into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    removed = _clean_partials(out)
    if removed:
        log(f"record: removed {len(removed)} unfinished item(s) of an interrupted run: {', '.join(sorted(removed))}")
    seeds = list(range(opts.seed, opts.seed + opts.episodes))
    done = {s: m for s in seeds if (m := _finished(out, s)) is not None}
    todo = [s for s in seeds if s not in done]
    if done:
        log(f"record: {len(done)} of {len(seeds)} episodes already recorded; recording {len(todo)}")
    show = sys.stderr.isatty() if progress is None else progress
    index = {"tool": TOOL, "config": config_path, "config_sha256": digest, "policy_sha256": policy_digest,
             "task": "press_cued_button",
             "options": asdict(opts), "seeds": [seeds[0], seeds[-1]], "episodes": []}

    def write_index() -> None:
        episodes = sorted(done.values(), key=lambda e: e["seed"])
        index["episodes"] = [{k: e[k] for k in ("seed", "bag", "outcome", "reason", "duration_s", "bytes")}
                             for e in episodes]
        index["summary"] = summarize(episodes)
        write_json_atomic(index_path, index)

    wall0 = time.perf_counter()
    args = [(str(out), s, opts.noise, opts.noise_tau, opts.storage, opts.control_rate_hz, opts.expert_share,
             opts.gap_share) for s in todo]
    bar = tqdm(total=len(todo), desc="record", unit="episode", disable=not show, file=sys.stderr)
    try:
        if opts.workers == 1 or len(todo) <= 1:
            recorder = _EpisodeRecorder(config_path, opts.policy)
            try:
                for a in args:
                    meta = recorder.record(*a)
                    done[meta["seed"]] = meta
                    write_index()
                    bar.set_postfix(success=f"{sum(e['outcome'] == 'success' for e in done.values())}/{len(done)}")
                    bar.update()
            finally:
                recorder.close()
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed
            # spawn, not fork: each worker opens its own OpenGL context and MuJoCo model.
            with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                     initargs=(config_path, opts.policy)) as pool:
                futures = [pool.submit(_worker_record, a) for a in args]
                for f in as_completed(futures):
                    meta = f.result()
                    done[meta["seed"]] = meta
                    write_index()
                    bar.update()
    finally:
        bar.close()
    write_index()
    wall = time.perf_counter() - wall0
    s = index["summary"]
    recorded_sim = sum(done[x]["duration_s"] for x in todo)
    log(f"record: {s['episodes']} episodes in {out}: {s['successes']} succeeded "
        f"({100 * s['success_rate']:.1f}%, 95% CI {100 * s['success_ci95'][0]:.1f}-{100 * s['success_ci95'][1]:.1f}%), "
        f"{(s['mean_bytes'] or 0) / 1e6:.2f} MB per episode; this run: {len(todo)} episodes in {wall:.1f} s "
        f"({60 * len(todo) / wall if wall > 0 and todo else 0:.1f} episodes/min, "
        f"{recorded_sim / wall if wall > 0 and todo else 0:.1f}x real time)")
    return index


def add_record_command(add: Callable[[str, str], object], default_config: str) -> None:
    p = add("record", "record scripted-expert demonstrations in the simulated cell as rosbag2 bags")
    p.set_defaults(config=default_config, func=cmd_record)
    p.add_argument("out", help="output folder (one bag and one JSON per episode, and index.json)")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--seed", type=int, default=None, help="first seed (default: the config's sim_node seed)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="DART noise: std (rad/s) added to the executed command; the label stays clean")
    p.add_argument("--noise-tau", type=float, default=0.0,
                   help="time constant (s) of the DART noise's drift (0: white noise, new each tick)")
    p.add_argument("--policy", metavar="CKPT", default="",
                   help="DAgger: this checkpoint drives the arm (through eval's loop) and the expert labels each tick")
    p.add_argument("--expert-share", type=float, default=0.0,
                   help="with --policy: share of ticks on which the expert's own command is executed instead")
    p.add_argument("--gap-share", type=float, default=0.0,
                   help="with --policy: share of episodes in which one required sensor goes silent for 0.5-2.5 s "
                        "(the watchdog halts the arm; the expert labels the way on)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes (results do not depend on it)")
    p.add_argument("--resume", action="store_true", help="skip episodes already recorded in OUT")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap")
    p.add_argument("--video", metavar="MP4", help="also render the first episode (the whole cell beside the "
                                                 "policy's camera) to this MP4")


def cmd_record(args, cfg: RobotConfig) -> int:
    try:
        seed = args.seed if args.seed is not None else load_cell_config(args.config).seed
        opts = RecordOptions(episodes=args.episodes, seed=seed, noise=args.noise, noise_tau=args.noise_tau,
                             workers=args.workers, policy=args.policy, expert_share=args.expert_share,
                             gap_share=args.gap_share,
                             resume=args.resume, storage=args.storage, control_rate_hz=cfg.control_rate_hz)
        if args.video and not args.video.endswith(".mp4"):
            raise RecordError(f"--video writes an MP4; name it *.mp4, got {args.video!r}")
        record(args.out, args.config, opts)
        if args.video:
            from .video import expert_video
            v = expert_video(args.config, seed, args.video, noise=args.noise, noise_tau_s=args.noise_tau,
                             control_rate_hz=cfg.control_rate_hz)
            print(f"record: episode {seed} ({v['reason']}) rendered to {v['video']} ({v['frames']} frames)")
    except (RecordError, ConfigError, RenderBackendError) as exc:
        print(f"mm-fusion record: {exc}", file=sys.stderr)
        return 2
    return 0
