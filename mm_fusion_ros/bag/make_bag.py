"""``mm-fusion make-bag``: a synthetic rosbag2 bag with all four sensors, optionally with faults.

The bag looks like one recorded on the robot: camera frames at 30 Hz, audio
at 16 kHz in 20 ms chunks (audio_common_msgs/AudioDataStamped plus an
AudioInfo every second, so that a replay started mid-bag still learns the
format), LaserScan at 10 Hz and IMU at 200 Hz, on the topics and types the
config's ``inputs`` section names. Every message has a capture stamp
(``header.stamp``, with the jitter of a real driver) and a later bag timestamp
(receive time: transfer, exposure, a LiDAR's sweep, an audio chunk's length).

Faults (``--faults``), each at fixed, seed-chosen places:

- ``dropout[:sensor]``: the sensor (default camera) sends nothing from 40% to 60% of the bag;
- ``out_of_order``: some IMU messages and camera frames arrive after their successor;
- ``duplicate``: some IMU, audio and LiDAR messages are recorded twice;
- ``nan``: some IMU samples hold NaN, some scans hold NaN ranges;
- ``corrupt_image``: one camera frame's data is cut short (or, compressed, is garbage).

Same config, options and seed -> the same messages, byte for byte.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import MODALITIES, RobotConfig
from ..synthetic import SyntheticSensors
from . import messages as M
from .typestore import distro_of, make_typestore
from .writer import BagWriter

FAULTS = ("dropout", "out_of_order", "duplicate", "nan", "corrupt_image")
RATES_HZ = {"camera": 30.0, "audio": 50.0, "lidar": 10.0, "imu": 200.0, "joint_state": 100.0}
AUDIO_CHUNK_S = 0.02
FRAME_IDS = {"camera": "camera_optical_frame", "audio": "microphone", "imu": "imu_link", "lidar": "laser",
             "joint_state": ""}   # joint_state_broadcaster leaves frame_id empty
# Capture -> receive delay (s), uniform in [lo, hi], on top of what the sensor itself takes.
LATENCY_S = {"camera": (0.012, 0.025), "audio": (0.001, 0.004), "lidar": (0.002, 0.006), "imu": (0.0005, 0.002),
             "joint_state": (0.0005, 0.002)}
STAMP_JITTER_S = {"camera": 0.001, "audio": 0.0, "lidar": 0.0005, "imu": 0.0001,  # audio: a sample clock
                  "joint_state": 0.0001}
# The configured input types make-bag can write: all but PointCloud2 (its LiDAR is a LaserScan).
MSGTYPES = {key: msgtype for key, msgtype in M.INPUT_MSGTYPES.items() if key != ("lidar", "point_cloud2")}
AUDIO_INFO_TYPE = "audio_common_msgs/msg/AudioInfo"


class MakeBagError(ValueError):
    """Options or config that make-bag cannot honour."""


@dataclass(frozen=True)
class Faults:
    kinds: tuple[str, ...] = ()
    dropout_sensor: str = "camera"

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """``"dropout:imu,nan"`` -> Faults(("dropout", "nan"), "imu")."""
        kinds, sensor = [], "camera"
        for item in (x.strip() for x in text.split(",") if x.strip()):
            name, _, arg = item.partition(":")
            if name not in FAULTS:
                raise MakeBagError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")
            if arg and name != "dropout":
                raise MakeBagError(f"fault {name!r} takes no argument, got {item!r}")
            if name == "dropout" and arg:
                if arg not in MODALITIES:
                    raise MakeBagError(f"dropout sensor {arg!r} must be one of {', '.join(MODALITIES)}")
                sensor = arg
            if name not in kinds:
                kinds.append(name)
        return cls(tuple(kinds), sensor)


@dataclass(frozen=True)
class MakeBagOptions:
    duration_s: float = 10.0
    storage: str = "mcap"
    faults: Faults = Faults()
    seed: int = 0
    camera_width: int = 640
    camera_height: int = 480
    start_s: float = 1_700_000_000.0   # the robot clock at the bag's start (a plausible epoch time)
    distro: str | None = None          # message definitions; None: the config's

    def validate(self) -> None:
        if not 0 < self.duration_s <= 3600:
            raise MakeBagError(f"--duration must be in (0, 3600] s, got {self.duration_s}")
        if not (16 <= self.camera_width <= 4096 and 16 <= self.camera_height <= 4096):
            raise MakeBagError(f"camera size must be within 16..4096 px, got {self.camera_width}x{self.camera_height}")


@dataclass
class MakeBagReport:
    path: Path
    counts: dict[str, int]
    faults: dict[str, list[float]] = field(default_factory=dict)   # fault -> capture times (s from start)


@dataclass(frozen=True)
class _Event:
    receive_s: float
    order: int          # tie-break, so equal receive times keep a fixed order
    sensor: str         # a modality, or "audio_info"
    index: int          # per-sensor message number
    stamp_s: float      # capture time (header.stamp)
    fault: str = ""     # "nan", "corrupt_image", "duplicate", "out_of_order"


def _topic_and_type(cfg: RobotConfig, sensor: str) -> tuple[str, str]:
    inp = getattr(cfg.inputs, sensor)
    kind = getattr(inp, "type", "")
    msgtype = MSGTYPES.get((sensor, kind))
    if msgtype is None:
        raise MakeBagError(f"make-bag does not write {sensor} as {kind!r} (inputs.{sensor}.type); "
                           f"it writes: {', '.join(k for s, k in MSGTYPES if s == sensor)}")
    return inp.topic, msgtype


def _schedule(cfg: RobotConfig, opts: MakeBagOptions, rng: np.random.Generator) -> tuple[list[_Event], dict]:
    """Every message's capture and receive time, faults applied; sorted by receive time."""
    t0, duration = opts.start_s, opts.duration_s
    faults = set(opts.faults.kinds)
    applied: dict[str, list[float]] = {}
    events: list[_Event] = []
    order = 0

    def note(kind: str, stamp: float) -> None:
        applied.setdefault(kind, []).append(round(stamp - t0, 6))

    for sensor in MODALITIES:
        rate = RATES_HZ[sensor]
        n = int(np.floor(duration * rate + 1e-9))
        lo, hi = LATENCY_S[sensor]
        sensor_events = []
        for k in range(n):
            nominal = t0 + k / rate
            stamp = nominal + (rng.normal(0, STAMP_JITTER_S[sensor]) if STAMP_JITTER_S[sensor] else 0.0)
            # The sensor itself takes time before the message can exist: an audio chunk's length,
            # a LiDAR's 360-degree sweep.
            done = stamp + (AUDIO_CHUNK_S if sensor == "audio" else 1.0 / rate if sensor == "lidar" else 0.0)
            receive = done + rng.uniform(lo, hi)
            if "dropout" in faults and sensor == opts.faults.dropout_sensor \
                    and 0.4 * duration <= nominal - t0 < 0.6 * duration:
                note("dropout", stamp)
                continue
            sensor_events.append([receive, sensor, k, stamp, ""])
        if "out_of_order" in faults and sensor in ("imu", "camera"):
            every = 20 if sensor == "imu" else 10
            for i in range(every // 2, len(sensor_events) - 1, every):
                # Delivered just after its successor (a USB batch, a driver thread that lost the CPU).
                sensor_events[i][0] = sensor_events[i + 1][0] + rng.uniform(0.0005, 0.002)
                sensor_events[i][4] = "out_of_order"
                note("out_of_order", sensor_events[i][3])
        if "nan" in faults and sensor in ("imu", "lidar"):
            every = 30 if sensor == "imu" else 7
            for i in range(every // 2, len(sensor_events), every):
                sensor_events[i][4] = "nan"
                note("nan", sensor_events[i][3])
        if "corrupt_image" in faults and sensor == "camera" and sensor_events:
            i = len(sensor_events) // 3
            sensor_events[i][4] = "corrupt_image"
            note("corrupt_image", sensor_events[i][3])
        for receive, s, k, stamp, fault in sensor_events:
            events.append(_Event(receive, order, s, k, stamp, fault))
            order += 1
        if "duplicate" in faults and sensor in ("imu", "audio", "lidar"):
            every = {"imu": 25, "audio": 15, "lidar": 8}[sensor]
            for i in range(every // 2, len(sensor_events), every):
                receive, s, k, stamp, fault = sensor_events[i]
                events.append(_Event(receive + 0.0002, order, s, k, stamp, "duplicate"))
                order += 1
                note("duplicate", stamp)
    if cfg.inputs.audio.type == "audio_data_stamped":
        for k in range(int(np.ceil(duration))):
            events.append(_Event(t0 + k, order, "audio_info", k, t0 + k))
            order += 1
    events.sort(key=lambda e: (e.receive_s, e.order))
    return events, applied


class _Sensors:
    """Message content for each sensor at the requested sizes."""

    def __init__(self, cfg: RobotConfig, opts: MakeBagOptions):
        self.cfg, self.opts = cfg, opts
        # Rendered at a quarter of the camera's size and scaled up: the scene is smooth anyway, and a
        # full-size render takes 30 ms per 640x480 frame.
        small = dataclasses.replace(cfg.model.camera, width=max(16, opts.camera_width // 4),
                                    height=max(16, opts.camera_height // 4))
        self.synthetic = SyntheticSensors(dataclasses.replace(cfg.model, camera=small), opts.seed)
        self.audio_rate = cfg.inputs.audio.source_rate

    def frame(self, t: float) -> np.ndarray:
        import cv2
        small = self.synthetic.camera(t)
        return cv2.resize(small, (self.opts.camera_width, self.opts.camera_height), interpolation=cv2.INTER_LINEAR)

    def audio(self, stamp: float) -> np.ndarray:
        n = int(round(AUDIO_CHUNK_S * self.audio_rate))
        return self.synthetic.audio(stamp + n / self.audio_rate, n=n, rate=self.audio_rate)

    def imu(self, t: float) -> np.ndarray:
        return self.synthetic.imu(t, n=1, rate=RATES_HZ["imu"])[0]

    def lidar(self, t: float) -> np.ndarray:
        return self.synthetic.lidar(t)


def _build(ts, cfg: RobotConfig, sensors: _Sensors, ev: _Event, rng: np.random.Generator):
    frame_id = FRAME_IDS.get(ev.sensor, "")
    if ev.sensor == "audio_info":
        return M.audio_info(ts, sensors.audio_rate, 1, cfg.inputs.audio.source_format)
    if ev.sensor == "camera":
        pixels = sensors.frame(ev.stamp_s)
        if cfg.inputs.camera.type == "compressed_image":
            import cv2
            ok, jpeg = cv2.imencode(".jpg", pixels[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
            data = jpeg.tobytes() if ev.fault != "corrupt_image" else rng.bytes(2000)
            return M.compressed_image(ts, ev.stamp_s, frame_id, data)
        msg = M.image(ts, ev.stamp_s, frame_id, pixels)
        if ev.fault == "corrupt_image":  # half the rows lost in transfer; height and step still claim all
            msg = dataclasses.replace(msg, data=msg.data[: len(msg.data) // 2].copy())
        return msg
    if ev.sensor == "audio":
        samples = sensors.audio(ev.stamp_s)
        kind = cfg.inputs.audio.type
        pcm16 = np.clip(np.round(samples * 32767.0), -32768, 32767).astype("<i2")
        if kind == "audio_stamped":
            return M.audio_stamped(ts, ev.stamp_s, frame_id, pcm16, sensors.audio_rate)
        as_f32 = cfg.inputs.audio.source_format == "F32LE"
        if kind == "image_pcm":
            return M.image_pcm(ts, ev.stamp_s, frame_id, samples.astype("<f4") if as_f32 else pcm16)
        return M.audio_data_stamped(ts, ev.stamp_s, frame_id, samples.astype("<f4") if as_f32 else pcm16)
    if ev.sensor == "imu":
        v = sensors.imu(ev.stamp_s).astype(np.float64)
        if ev.fault == "nan":
            v[0] = np.nan
        return M.imu(ts, ev.stamp_s, frame_id, v[:3], v[3:])
    if ev.sensor == "lidar":
        ranges = sensors.lidar(ev.stamp_s)
        if ev.fault == "nan":
            ranges = ranges.copy()
            ranges[rng.choice(len(ranges), 10, replace=False)] = np.nan
        lidar = cfg.model.lidar
        return M.laser_scan(ts, ev.stamp_s, frame_id, ranges, lidar.range_min, lidar.range_max, 1.0 / RATES_HZ["lidar"])
    if ev.sensor == "joint_state":
        q, qd = sensors.synthetic.joint_state(ev.stamp_s)
        return M.joint_state(ts, M.stamp_ns(ev.stamp_s), cfg.model.action.names, q, qd, np.zeros_like(q),
                             frame_id=frame_id)
    raise AssertionError(ev.sensor)


def make_bag(out: str | Path, cfg: RobotConfig, opts: MakeBagOptions, progress: bool | None = None,
             log: Callable[[str], None] = print) -> MakeBagReport:
    """Write the synthetic bag to ``out`` (a new path) and describe what went into it."""
    from tqdm import tqdm

    cfg = cfg.absolute()   # a bag holds absolute topic names; the config may give relative ones
    opts.validate()
    if cfg.inputs.lidar.type != "laser_scan":
        raise MakeBagError("make-bag writes sensor_msgs/LaserScan; set inputs.lidar.type: laser_scan")
    flavour = "mgonzs13" if cfg.inputs.audio.type == "audio_stamped" else "ros_drivers"
    ts = make_typestore(opts.distro or distro_of(cfg), flavour)
    topics = {s: _topic_and_type(cfg, s) for s in MODALITIES}
    rng = np.random.default_rng([opts.seed, 4])
    events, applied = _schedule(cfg, opts, rng)
    sensors = _Sensors(cfg, opts)
    manifest = {"tool": "mm-fusion make-bag", "duration_s": opts.duration_s, "seed": opts.seed,
                "faults": list(opts.faults.kinds), "dropout_sensor": opts.faults.dropout_sensor,
                "camera": f"{opts.camera_width}x{opts.camera_height}", "start_s": opts.start_s}
    content_rng = np.random.default_rng([opts.seed, 5])
    show = sys.stderr.isatty() if progress is None else progress
    with BagWriter(out, ts, storage=opts.storage, custom_data={"mm_fusion_ros.make_bag": json.dumps(manifest)}) as bag:
        for sensor, (topic, msgtype) in topics.items():
            bag.add_topic(topic, msgtype)
        if cfg.inputs.audio.type == "audio_data_stamped":
            bag.add_topic(cfg.inputs.audio.info_topic, AUDIO_INFO_TYPE)
        # A duplicate is the very same bytes recorded twice: keep the original's until its copy is written.
        duplicated = {(ev.sensor, ev.index) for ev in events if ev.fault == "duplicate"}
        pending: dict[tuple[str, int], bytes] = {}
        for ev in tqdm(events, desc="make-bag", unit="msg", disable=not show, file=sys.stderr):
            topic = cfg.inputs.audio.info_topic if ev.sensor == "audio_info" else topics[ev.sensor][0]
            key = (ev.sensor, ev.index)
            if key in pending:
                data = pending.pop(key)
            else:
                msg = _build(ts, cfg, sensors, ev, content_rng)
                data = bytes(ts.serialize_cdr(msg, msg.__msgtype__))
                if key in duplicated:
                    pending[key] = data
            bag.write_raw(topic, M.stamp_ns(ev.receive_s), data)
        counts = dict(bag.counts)
    log(f"make-bag: wrote {out} ({opts.duration_s:g} s, {sum(counts.values())} messages, "
        f"faults: {', '.join(opts.faults.kinds) or 'none'})")
    return MakeBagReport(Path(out), counts, applied)
