"""Training data from rosbag2 bags: what the engine is fed at every control tick, plus the label.

A bag goes through exactly the code a replay of it runs (``replay.drive``: the
same conversions, aligner, Runtime and FusionStream, ticking on the bag's
clock at the control rate); in place of a network the Runtime holds a
``CaptureEngine`` that keeps the inputs each tick hands it. So the dataset is
what ``mm-fusion replay`` feeds the engine for that bag, by construction
(``test/test_train.py`` checks it tick by tick), and there is no training-only
preprocessing to drift from the live node.

The label is the command topic's value at the tick: the newest message
stamped at or before it (a stamped ``sensor_msgs/JointState``'s velocities,
matched by joint name, as ``mm-fusion record`` writes the expert's command;
or a ``std_msgs/Float64MultiArray`` as a forward controller takes it, at its
receive time). Ticks before the first label carry no loss.

Stored once per bag and config, as ``.npy`` files memory-mapped by training
(``DatasetCache``; the key hashes the bag's bytes, the config's model, inputs
and rate, the label topic and the code that converts and aligns), so later
epochs and later runs never decode a bag again. Camera frames and LiDAR scans
are stored once each with a per-tick index (a 30 Hz frame serves about three
ticks), audio as the log-mel frames of one continuous track with a per-tick
index of the window's last frame: consecutive windows end on the hop grid, so
a tick's window of frames is a slice of the track's (the build checks that every
tick's window is the track's slice and counts any that is not).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import MODALITIES, ModelConfig, RobotConfig, config_to_dict
from .engine.base import Engine

DATASET_FORMAT = "mm_fusion_ros.dataset/2"   # 2: the episode spec in meta (task-state supervision)
DEFAULT_LABEL_TOPIC = "/expert/joint_command"
LABEL_TYPES = ("sensor_msgs/msg/JointState", "std_msgs/msg/Float64MultiArray")
# The code whose behaviour the stored arrays depend on: a change to any of it invalidates the cache.
_SOURCES = ("dataset.py", "align.py", "sensors.py", "samples.py", "replay.py", "runtime.py", "ros/convert.py",
            "engine/stream.py")
_ARRAYS = ("t_ns", "dt", "mask", "imu", "joint_state", "action", "labelled", "camera_index", "camera_frames",
           "lidar_index", "lidar_scans", "audio_index", "audio_mel")


class DatasetError(ValueError):
    """A bag or bag set that cannot become training data; the message names the bag and the topic."""


# ---------------------------------------------------------------- capture


class CaptureEngine(Engine):
    """Stands in for the network in a Runtime: keeps each step's inputs, returns neutral outputs
    (zero action, the state and audio frames passed through, so the stream keeps no errors)."""

    name = "capture"

    def __init__(self, cfg: ModelConfig):
        from .model import input_specs, output_specs
        super().__init__(input_specs(cfg), output_specs(cfg))
        self.last: dict[str, np.ndarray] | None = None
        self._zeros = {s.name: np.zeros(s.shape, np.float32) for s in self.output_specs}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.last = {k: v.copy() for k, v in inputs.items() if k not in ("state", "audio_frames")}
        return {**self._zeros, "new_state": inputs["state"], "new_audio_frames": inputs["audio_frames"]}


# ---------------------------------------------------------------- one bag


@dataclass
class Episode:
    """One bag's ticks, memory-mapped from the cache."""

    name: str
    key: str
    arrays: dict[str, np.ndarray]
    meta: dict
    weight: np.ndarray | None = None    # per-tick loss weight (training's keyframes); None: every tick 1
    task: np.ndarray | None = None      # (T, k) task state training supervises fused_state with (sim.task_state)
    task_weight: np.ndarray | None = None   # (T,) where that is known
    objects: np.ndarray | None = None   # (2 N,) every button's (x, y) in dm, for the camera target (training)
    objects_in_sight: np.ndarray | None = None   # (frames, N) each button clear of the tool in each frame
    cue: int = -1                       # which of them the cue names (training's cue target); -1: unknown
    phases: np.ndarray | None = None    # (T, len(PHASES)) the phase flags (training's phase target)

    @property
    def ticks(self) -> int:
        return int(self.arrays["t_ns"].shape[0])

    def audio_windows(self, ticks: np.ndarray, n_frames: int) -> np.ndarray:
        """(len(ticks), n_mels, n_frames) log-mel frames of those ticks' audio windows (zeros where masked)."""
        mel = self.arrays["audio_mel"]
        index = self.arrays["audio_index"][ticks]
        out = np.zeros((len(ticks), mel.shape[0], n_frames), np.float32)
        for i, k in enumerate(index):
            if k >= n_frames - 1:
                out[i] = mel[:, k - n_frames + 1:k + 1]
        return out

    def camera(self, ticks: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
        index = self.arrays["camera_index"][ticks]
        out = np.zeros((len(ticks), *shape), np.uint8)
        have = index >= 0
        out[have] = self.arrays["camera_frames"][index[have]]
        return out

    def lidar(self, ticks: np.ndarray, beams: int) -> np.ndarray:
        index = self.arrays["lidar_index"][ticks]
        out = np.zeros((len(ticks), beams), np.float32)
        have = index >= 0
        out[have] = self.arrays["lidar_scans"][index[have]]
        return out


def file_digest(path: Path) -> str:
    """SHA-256 of a bag: of its files' names and bytes, in name order (a bag is a folder or one file)."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def config_key(cfg: RobotConfig, label_topic: str) -> str:
    """What in the config and the code the stored arrays depend on."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(DATASET_FORMAT.encode())
    # The model's input shapes and preprocessing, not what the network does with them (strategy, sizes,
    # modalities): ablations and strategies share one cache.
    shapes = {k: v for k, v in config_to_dict(cfg.model).items() if k in ("camera", "audio", "imu", "lidar", "action")}
    shapes["camera"] = {k: shapes["camera"][k] for k in ("height", "width")}   # the frames, not the CNN
    shapes["action"] = {k: shapes["action"][k] for k in ("names",)}   # the labels, not what the head outputs
    h.update(json.dumps({"model": shapes, "inputs": config_to_dict(cfg.inputs),
                         "control_rate_hz": cfg.control_rate_hz, "ros_distro": cfg.ros_distro,
                         "label_topic": label_topic}, sort_keys=True).encode())
    for rel in _SOURCES:
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def _labels(reader, bag: Path, topic: str, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(stamps_ns, values (n, dof)) of the label topic, sorted by stamp."""
    info = reader.topics.get(topic)
    if info is None:
        held = ", ".join(sorted(reader.topics)) or "nothing"
        raise DatasetError(f"{bag}: no label topic {topic} (the command to learn); the bag holds: {held}. "
                           "Pass --label-topic with the topic that carries the arm's command")
    if info.msgtype not in LABEL_TYPES:
        raise DatasetError(f"{bag}: label topic {topic} holds {info.msgtype}; expected one of {list(LABEL_TYPES)}")
    stamps, values = [], []
    for m in reader.messages(topics=[topic]):
        msg = reader.decode(m)
        if info.msgtype == "std_msgs/msg/Float64MultiArray":
            v = np.asarray(msg.data, np.float64)
            if v.shape != (len(names),):
                raise DatasetError(f"{bag}: label topic {topic} carries {v.size} values; the model has "
                                   f"{len(names)} DOF ({list(names)})")
            stamps.append(m.t_ns)
        else:
            listed = list(msg.name)
            missing = [n for n in names if n not in listed]
            if missing:
                raise DatasetError(f"{bag}: label topic {topic} names joints {listed}, which lack {missing} "
                                   f"of model.action.names {list(names)}")
            vel = np.asarray(msg.velocity, np.float64)
            if vel.size != len(listed):
                raise DatasetError(f"{bag}: label topic {topic}: {vel.size} velocities for {len(listed)} names")
            v = vel[[listed.index(n) for n in names]]
            stamps.append(msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec)
        values.append(v)
    if not stamps:
        raise DatasetError(f"{bag}: label topic {topic} has no messages")
    order = np.argsort(np.asarray(stamps, np.int64), kind="stable")
    return np.asarray(stamps, np.int64)[order], np.asarray(values, np.float32)[order]


def _check_joint_names(reader, bag: Path, cfg: RobotConfig) -> None:
    topic = cfg.inputs.joint_state.topic
    if topic not in reader.topics:
        return   # masked throughout, as replay would (logged by replay's topic check)
    for m in reader.messages(topics=[topic]):
        listed = list(reader.decode(m).name)
        missing = [n for n in cfg.model.action.names if n not in listed]
        if missing:
            raise DatasetError(f"{bag}: joint state topic {topic} names joints {listed}, which lack {missing} of "
                               f"model.action.names {list(cfg.model.action.names)} (the configured order)")
        return


def _mel_track(track: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Log-mel frames (n_mels, K) of a track whose last sample ends a hop, frame k ending k hops before
    the last frame; computed in segments so an hour-long bag does not need gigabytes at once."""
    import torch

    from .model.preprocess import LogMelFrames

    a = cfg.audio
    total = 1 + (track.size - a.n_fft) // a.hop
    if total <= 0:
        return np.zeros((a.n_mels, 0), np.float32)
    frames = LogMelFrames(a).eval()
    out = np.empty((a.n_mels, total), np.float32)
    step = 4096
    with torch.inference_mode():
        for k0 in range(0, total, step):
            k1 = min(total, k0 + step)
            # Frame k (0-based from the first whole frame) ends at sample end0 + k * hop.
            end0 = track.size - 1 - (total - 1) * a.hop
            lo, hi = end0 + k0 * a.hop - a.n_fft + 1, end0 + (k1 - 1) * a.hop + 1
            seg = torch.from_numpy(np.ascontiguousarray(track[lo:hi], np.float32))[None]
            out[:, k0:k1] = frames(seg)[0].numpy()
    return out


def build_episode(bag: str | Path, cfg: RobotConfig, label_topic: str = DEFAULT_LABEL_TOPIC,
                  log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, np.ndarray], dict]:
    """Run the bag through replay's loop with a capturing engine; the arrays to store and their metadata."""
    from .bag.reader import BagReader
    from .bag.typestore import distro_of
    from .memory import keep_freed_memory
    from .replay import InputDecoder, _check_topics, drive
    from .runtime import Runtime

    cfg = cfg.absolute()
    bag = Path(bag)
    keep_freed_memory()
    m = cfg.model
    names = m.action.names
    with BagReader(bag, distro=distro_of(cfg), log=log) as reader:
        label_stamps, label_values = _labels(reader, bag, label_topic, names)
        _check_joint_names(reader, bag, cfg)
        topics = _check_topics(cfg, reader, log)
        decoder = InputDecoder(cfg, topics, log)
        engine = CaptureEngine(m)
        runtime = Runtime(cfg, engine=engine, log=log)
        runtime.set_enabled(True)
        period_ns = int(round(1e9 / cfg.control_rate_hz))
        rows: dict[str, list] = {k: [] for k in ("t_ns", "dt", "mask", "imu", "joint_state", "camera_index",
                                                 "lidar_index")}
        frames: list[np.ndarray] = []
        scans: list[np.ndarray] = []
        frame_of: dict[float, int] = {}
        scan_of: dict[float, int] = {}
        audio: list[tuple[int, np.ndarray]] = []   # (window end sample, window) of ticks that used audio
        audio_tick: list[int] = []

        def tick(t_ns: int) -> None:
            result = runtime.tick(t_ns / 1e9)
            x, obs = engine.last, result.observation
            mask = x["mask"][0]
            rows["t_ns"].append(t_ns)
            rows["dt"].append(x["dt"][0, 0])
            rows["mask"].append(mask)
            rows["imu"].append(x["imu"][0])
            rows["joint_state"].append(x["joint_state"][0])
            rows["camera_index"].append(_index(obs.stamps["camera"], x["camera"][0], frame_of, frames, mask[0]))
            rows["lidar_index"].append(_index(obs.stamps["lidar"], x["lidar"][0], scan_of, scans,
                                              mask[MODALITIES.index("lidar")]))
            if mask[MODALITIES.index("audio")] > 0.5 and obs.audio_end is not None:
                audio.append((obs.audio_end, x["audio"][0]))
                audio_tick.append(len(rows["t_ns"]) - 1)

        drive(reader, decoder, runtime, period_ns, tick)
    # mm-fusion record's metadata beside the bag (seed, outcome): what keeps eval seeds apart from these.
    sidecar = bag.with_name(bag.name + ".json")
    episode = {}
    if sidecar.is_file():
        info = json.loads(sidecar.read_text())
        episode = {k: info.get(k) for k in ("seed", "task", "outcome", "reason", "noise", "spec", "driver",
                                                "clock_start_s", "stats")}
    n = len(rows["t_ns"])
    if n == 0:
        raise DatasetError(f"{bag}: no control ticks (the bag is shorter than one control period)")
    arrays: dict[str, np.ndarray] = {
        "t_ns": np.asarray(rows["t_ns"], np.int64), "dt": np.asarray(rows["dt"], np.float32),
        "mask": np.asarray(rows["mask"], np.float32), "imu": np.asarray(rows["imu"], np.float32),
        "joint_state": np.asarray(rows["joint_state"], np.float32),
        "camera_index": np.asarray(rows["camera_index"], np.int32),
        "lidar_index": np.asarray(rows["lidar_index"], np.int32),
        "camera_frames": (np.stack(frames) if frames else np.zeros((0, m.camera.height, m.camera.width, 3), np.uint8)),
        "lidar_scans": np.stack(scans).astype(np.float32) if scans else np.zeros((0, m.lidar.beams), np.float32),
    }
    # The label at each tick: the newest command stamped at or before it.
    pos = np.searchsorted(label_stamps, arrays["t_ns"], side="right") - 1
    arrays["labelled"] = (pos >= 0).astype(np.uint8)
    arrays["action"] = np.where((pos >= 0)[:, None], label_values[np.maximum(pos, 0)], 0.0).astype(np.float32)
    arrays["audio_index"], arrays["audio_mel"], inexact = _audio_track(audio, audio_tick, n, m)
    meta = {"format": DATASET_FORMAT, "bag": str(bag), "ticks": n, "label_topic": label_topic,
            "labelled_ticks": int(arrays["labelled"].sum()), "audio_inexact_ticks": inexact,
            "camera_frames": len(frames), "lidar_scans": len(scans), "episode": episode,
            "summary": {k: v for k, v in runtime.summary().items() if k in ("drops", "accepted", "mask_rate")}}
    if inexact:
        log(f"dataset: {bag}: {inexact} tick(s) whose audio window is not a slice of the track "
            "(samples rewritten in the ring); their frames come from the track")
    return arrays, meta


def _index(stamp: float, value: np.ndarray, seen: dict, store: list, used: float) -> int:
    if used < 0.5 or not math.isfinite(stamp):
        return -1
    k = seen.get(stamp)
    if k is None:
        k = seen[stamp] = len(store)
        store.append(value.copy())
    return k


def _audio_track(audio: list, ticks: list, n: int, m: ModelConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """(per-tick index of the window's last frame in the track's frames or -1, the frames, inexact ticks)."""
    a = m.audio
    index = np.full(n, -1, np.int64)
    if not audio:
        return index, np.zeros((a.n_mels, 0), np.float32), 0
    N = a.window_samples
    base = min(end for end, _ in audio) - N + 1
    last = max(end for end, _ in audio)
    track = np.zeros(last - base + 1, np.float32)
    for end, window in audio:
        track[end - N + 1 - base:end + 1 - base] = window
    inexact = sum(not np.array_equal(track[end - N + 1 - base:end + 1 - base], window) for end, window in audio)
    mel = _mel_track(track, m)
    total = mel.shape[1]
    for tick, (end, _) in zip(ticks, audio):
        index[tick] = total - 1 - (last - end) // a.hop
    return index, mel, int(inexact)


# ---------------------------------------------------------------- the cache


class DatasetCache:
    """Built episodes under ``root/<key>/``: one ``.npy`` per array plus ``meta.json``, written to a
    temporary folder and renamed when complete (an interrupted build leaves nothing half written)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, bag: Path, cfg: RobotConfig, label_topic: str) -> str:
        h = hashlib.sha256(file_digest(bag).encode())
        h.update(config_key(cfg, label_topic).encode())
        return h.hexdigest()[:32]

    def load(self, key: str, name: str) -> Episode | None:
        folder = self.root / key
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text())
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
        return Episode(name, key, arrays, meta)

    def store(self, key: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for k in _ARRAYS:
            np.save(tmp / f"{k}.npy", np.ascontiguousarray(arrays[k]))
        (tmp / "meta.json").write_text(json.dumps({**meta, "key": key}, indent=1, sort_keys=True))
        try:
            os.replace(tmp, self.root / key)
        except OSError:   # another process finished the same bag first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)


def _build_one(args: tuple) -> tuple[str, str, str | None]:
    bag, cfg, label_topic, root = args
    cache = DatasetCache(root)
    key = cache.key(Path(bag), cfg, label_topic)
    if (cache.root / key / "meta.json").is_file():
        return bag, key, None
    try:
        arrays, meta = build_episode(bag, cfg, label_topic)
    except DatasetError as exc:
        return bag, key, str(exc)
    cache.store(key, arrays, meta)
    return bag, key, None


def find_bags(paths: Sequence[str | Path]) -> list[Path]:
    """Bags named on the command line: bag folders, or folders of bag folders (a recording's OUT_DIR)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DatasetError(f"{p}: no such bag or folder")
        if (p / "metadata.yaml").is_file() or p.is_file():
            out.append(p)
            continue
        found = sorted(q for q in p.iterdir() if q.is_dir() and (q / "metadata.yaml").is_file())
        if not found:
            raise DatasetError(f"{p}: neither a bag (no metadata.yaml) nor a folder of bags")
        out.extend(found)
    return out


def load_episodes(bags: Sequence[str | Path], cfg: RobotConfig, cache_root: str | Path,
                  label_topic: str = DEFAULT_LABEL_TOPIC, workers: int = 1, progress: bool | None = None,
                  log: Callable[[str], None] = print) -> list[Episode]:
    """Every bag's episode, built into the cache where it is not there yet (in ``workers`` processes)."""
    from tqdm import tqdm

    paths = find_bags(bags)
    jobs = [(str(p), cfg, label_topic, str(cache_root)) for p in paths]
    show = sys.stderr.isatty() if progress is None else progress
    results = []
    with tqdm(total=len(jobs), desc="dataset", unit="bag", disable=not show, file=sys.stderr) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for r in pool.imap(_build_one, jobs):
                    results.append(r)
                    bar.update(1)
        else:
            for job in jobs:
                results.append(_build_one(job))
                bar.update(1)
    errors = [err for _, _, err in results if err]
    if errors:
        raise DatasetError(errors[0] + (f" (and {len(errors) - 1} more bag(s) refused)" if len(errors) > 1 else ""))
    cache = DatasetCache(cache_root)
    episodes = []
    for bag, key, _ in results:
        ep = cache.load(key, Path(bag).name)
        if ep is None:   # pragma: no cover - stored just above
            raise DatasetError(f"{bag}: cache entry {key} vanished")
        episodes.append(ep)
    return episodes
