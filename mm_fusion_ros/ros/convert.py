"""ROS messages <-> samples: the one place where message fields are read or written.

Live nodes (rclpy messages) and bag replay / training (rosbags messages) call
the same functions, so both see identical samples. The readers are
duck-typed: they use attribute access and ``np.frombuffer``/``np.asarray`` only,
never ``isinstance`` on a message class, because rclpy hands over
``array.array``/``bytes`` where rosbags hands over numpy arrays.

A message that cannot be used raises ``samples.BadSample`` with a stable
cause key ``"<modality>.<cause>"``; the caller drops and counts it. Causes:

==========================  ====================================================
camera.zero_stamp           header.stamp is 0 (every other modality likewise)
camera.bad_encoding         Image encoding other than rgb8 / bgr8 / mono8
camera.bad_size             width/height 0, step < width * channels, or data
                            length != height * step
camera.bad_format           CompressedImage that is neither jpeg nor png
camera.empty                CompressedImage without data
audio.unknown_format        sample format / PortAudio code / Image encoding
                            that is not uncompressed PCM we can read
audio.bad_info              sample rate or channel count <= 0
audio.bad_size              byte count not whole frames, Image height != 1 or
                            data length != step
audio.empty                 no samples
audio.oversize              longer than the model's audio window
audio.non_finite            NaN/Inf in float PCM
imu.non_finite              NaN/Inf in linear_acceleration / angular_velocity
imu.missing_accel/gyro      covariance[0] == -1: the driver says it has no such data
lidar.empty                 LaserScan without ranges
lidar.bad_angles            angle_increment 0/NaN, or the last ray's angle
                            angle_min + (len(ranges) - 1) * angle_increment
                            more than one increment from angle_max
lidar.missing_xyz           PointCloud2 without x, y and z fields
lidar.bad_fields            unknown field datatype or a field past point_step
lidar.bad_size              data shorter than height * row_step, or
                            row_step < width * point_step
joint_state.missing_joint   a configured joint is not in ``name`` (the message
                            is matched by name, extra joints are ignored)
joint_state.bad_size        position / velocity not one value per name
joint_state.no_velocity     velocity empty: the policy needs it, and a finite
                            difference of stamps would be guessing
joint_state.non_finite      NaN/Inf position or velocity of a configured joint
==========================  ====================================================
"""

from __future__ import annotations

import logging
import math
import re
from array import array
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..config import AudioConfig, LidarConfig
from ..samples import (RAW_ENCODINGS, AudioSample, BadSample, CameraSample, ImuSample, JointStateSample,
                       LidarSample)
from ..sensors import lidar_beams, pcm_to_mono

# ---------------------------------------------------------------- time


def stamp_to_s(stamp: Any) -> float:
    """builtin_interfaces/Time -> seconds."""
    return int(stamp.sec) + int(stamp.nanosec) * 1e-9


def s_to_stamp_fields(t: float) -> tuple[int, int]:
    """Seconds -> (sec, nanosec) of a builtin_interfaces/Time, nanosec in [0, 1e9)."""
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"a ROS time must be finite and non-negative, got {t}")
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return int(sec), int(nanosec)


def _stamp(msg: Any, modality: str) -> float:
    t = stamp_to_s(msg.header.stamp)
    if t == 0.0:
        # An unset stamp: the driver did not stamp at capture, so the data cannot be aligned.
        raise BadSample(f"{modality}.zero_stamp", "header.stamp is 0 (unset); stamp messages at capture")
    return t


def _bytes(data: Any) -> np.ndarray:
    """A uint8[] field as a 1-D uint8 array, without a copy where the field exposes a buffer."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError):
        return np.asarray(data, dtype=np.uint8).ravel()


def _typed(data: Any, dtype: Any) -> np.ndarray:
    """A numeric array field (array.array, numpy array or list) as a 1-D array of ``dtype``."""
    dtype = np.dtype(dtype)
    if isinstance(data, array):   # rclpy: view the buffer in its own type, convert only if it differs
        own = np.frombuffer(data, dtype=np.dtype(data.typecode))
        return own if own.dtype == dtype else own.astype(dtype)
    return np.asarray(data, dtype=dtype).ravel()


# ---------------------------------------------------------------- camera

_ENCODING_CHANNELS = {"rgb8": 3, "bgr8": 3, "mono8": 1}


def camera_from_image(msg: Any) -> CameraSample:
    """sensor_msgs/Image (rgb8, bgr8, mono8) -> CameraSample; the pixels are not copied or decoded."""
    stamp = _stamp(msg, "camera")
    encoding = str(msg.encoding)
    if encoding not in RAW_ENCODINGS:
        raise BadSample("camera.bad_encoding",
                        f"Image encoding {encoding!r} is not supported; publish one of {list(RAW_ENCODINGS)} "
                        f"or a CompressedImage (jpeg/png)")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    channels = _ENCODING_CHANNELS[encoding]
    if height <= 0 or width <= 0:
        raise BadSample("camera.bad_size", f"Image is {width}x{height}")
    if step < width * channels:
        raise BadSample("camera.bad_size", f"step {step} < width {width} * {channels} bytes per pixel ({encoding})")
    data = _bytes(msg.data)
    if data.size != height * step:
        raise BadSample("camera.bad_size",
                        f"{data.size} bytes of data, expected height {height} * step {step} = {height * step}")
    return CameraSample(stamp=stamp, encoding=encoding, width=width, height=height, step=step, data=data)


def camera_from_compressed(msg: Any) -> CameraSample:
    """sensor_msgs/CompressedImage (jpeg or png, image_transport's "bgr8; jpeg compressed bgr8" too)."""
    stamp = _stamp(msg, "camera")
    data = _bytes(msg.data)
    if data.size == 0:
        raise BadSample("camera.empty", "CompressedImage has no data")
    fmt = str(msg.format).lower()
    if "compresseddepth" in fmt:
        raise BadSample("camera.bad_format", f"format {msg.format!r} is a depth image, not a colour camera")
    if "jpeg" in fmt or "jpg" in fmt:
        encoding = "jpeg"
    elif "png" in fmt:
        encoding = "png"
    elif not fmt and data[:2].tobytes() == b"\xff\xd8":
        encoding = "jpeg"   # format left empty by the publisher: the magic bytes tell
    elif not fmt and data[:4].tobytes() == b"\x89PNG":
        encoding = "png"
    else:
        raise BadSample("camera.bad_format", f"CompressedImage format {msg.format!r} is neither jpeg nor png")
    return CameraSample(stamp=stamp, encoding=encoding, width=0, height=0, step=0, data=data)


# ---------------------------------------------------------------- audio


@dataclass(frozen=True)
class AudioFormat:
    """How raw PCM bytes are laid out: rate (Hz), interleaved channels, GStreamer-style format name."""

    sample_rate: int
    channels: int
    sample_format: str   # "S16LE", "F32LE", ... (see PCM_FORMATS)


# GStreamer / audio_common_msgs AudioInfo.sample_format names -> numpy dtype.
PCM_FORMATS = {
    "U8": "u1", "S8": "i1",
    "S16LE": "<i2", "S16BE": ">i2",
    "S32LE": "<i4", "S32BE": ">i4",
    "F32LE": "<f4", "F32BE": ">f4",
    "F64LE": "<f8", "F64BE": ">f8",
}
_PACKED_24 = "S24LE"   # three bytes per sample, no container


def audio_format_from_info(info: Any) -> AudioFormat:
    """audio_common_msgs/AudioInfo (ros-drivers) -> AudioFormat; refuses compressed streams."""
    coding = str(getattr(info, "coding_format", "") or "").lower()
    if coding not in ("", "wave", "wav", "pcm", "raw"):
        raise BadSample("audio.unknown_format", f"coding_format {info.coding_format!r}: only raw PCM can be used")
    return AudioFormat(sample_rate=int(info.sample_rate), channels=int(info.channels),
                       sample_format=str(info.sample_format).upper())


def _pcm_from_bytes(raw: np.ndarray, fmt: AudioFormat) -> tuple[np.ndarray, float | None]:
    """Bytes -> interleaved samples in their own dtype, and the full scale when it is not the dtype's."""
    name = fmt.sample_format.upper()
    if name == _PACKED_24:
        if raw.size % 3:
            raise BadSample("audio.bad_size", f"{raw.size} bytes is not a whole number of S24LE samples")
        b = raw.reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        return (value ^ 0x800000) - 0x800000, float(1 << 23)   # sign-extend 24 bits
    if name not in PCM_FORMATS:
        raise BadSample("audio.unknown_format",
                        f"sample_format {fmt.sample_format!r} is not one of {sorted(PCM_FORMATS) + [_PACKED_24]}")
    dtype = np.dtype(PCM_FORMATS[name])
    if raw.size % dtype.itemsize:
        raise BadSample("audio.bad_size", f"{raw.size} bytes is not a whole number of {name} samples")
    return np.frombuffer(raw, dtype=dtype), None


def _audio_chunk(stamp: float, pcm: np.ndarray, channels: int, rate: int, max_s: float,
                 full_scale: float | None = None) -> AudioSample:
    if rate <= 0 or channels <= 0:
        raise BadSample("audio.bad_info", f"sample rate {rate} Hz and {channels} channels")
    if pcm.size == 0:
        raise BadSample("audio.empty", "audio chunk has no samples")
    if pcm.size % channels:
        raise BadSample("audio.bad_size", f"{pcm.size} samples do not split into {channels} channels")
    frames = pcm.size // channels
    if frames > max_s * rate + 0.5:
        raise BadSample("audio.oversize",
                        f"chunk of {frames / rate:.3f} s is longer than the model's audio window ({max_s} s)")
    if pcm.dtype.kind == "f" and not np.isfinite(pcm).all():
        raise BadSample("audio.non_finite", "audio chunk holds NaN or Inf")
    mono = pcm_to_mono(pcm, channels, full_scale)
    return AudioSample(stamp=stamp, sample_rate=int(rate), samples=mono)


def audio_from_audio_data_stamped(msg: Any, info: AudioFormat | None, fallback: AudioFormat, *,
                                  max_s: float = AudioConfig.window_s) -> AudioSample:
    """audio_common_msgs/AudioDataStamped (header + audio.data uint8[]).

    The bytes carry no format: ``info`` is the latest AudioInfo (see
    ``audio_format_from_info``), ``fallback`` the configured source format used
    until one arrives. ``max_s`` is the model's audio window.
    """
    stamp = _stamp(msg, "audio")
    fmt = info or fallback
    pcm, full_scale = _pcm_from_bytes(_bytes(msg.audio.data), fmt)
    return _audio_chunk(stamp, pcm, fmt.channels, fmt.sample_rate, max_s, full_scale)


# PortAudio sample format codes (portaudio.h) used by mgonzs13's audio_common AudioInfo.format,
# -> (AudioData field, dtype).
PORTAUDIO_FORMATS = {
    0x01: ("float32_data", np.float32),   # paFloat32
    0x02: ("int32_data", np.int32),       # paInt32
    0x08: ("int16_data", np.int16),       # paInt16
    0x10: ("int8_data", np.int8),         # paInt8
    0x20: ("uint8_data", np.uint8),       # paUInt8 (offset binary)
}


def audio_from_audio_stamped(msg: Any, *, max_s: float = AudioConfig.window_s) -> AudioSample:
    """audio_common_msgs/AudioStamped from mgonzs13/audio_common.

    header + audio (Audio: audio_data (AudioData: float32_data, int32_data,
    int16_data, int8_data, uint8_data) + info (AudioInfo: format as a PortAudio
    code, channels, rate, chunk)). The array named by ``info.format`` is read.
    """
    stamp = _stamp(msg, "audio")
    info = msg.audio.info
    code = int(info.format)
    if code not in PORTAUDIO_FORMATS:
        raise BadSample("audio.unknown_format",
                        f"PortAudio format {code:#x} is not one of {[hex(c) for c in PORTAUDIO_FORMATS]}")
    field_name, dtype = PORTAUDIO_FORMATS[code]
    pcm = _typed(getattr(msg.audio.audio_data, field_name), dtype)
    return _audio_chunk(stamp, pcm, int(info.channels), int(info.rate), max_s)


_IMAGE_PCM = re.compile(r"(8|16|32|64)([USF])C(\d+)")
_IMAGE_PCM_DTYPES = {("8", "U"): "u1", ("8", "S"): "i1", ("16", "S"): "i2", ("32", "S"): "i4",
                     ("32", "F"): "f4", ("64", "F"): "f8"}


def audio_from_image_pcm(msg: Any, rate: int, *, max_s: float = AudioConfig.window_s) -> AudioSample:
    """Audio on standard messages only: a sensor_msgs/Image holding one row of PCM.

    The convention (for robots without audio_common_msgs): ``height`` 1,
    ``width`` = samples per channel, ``encoding`` ``"16SC<n>"`` (int16),
    ``"32SC<n>"``, ``"32FC<n>"`` (float, +-1) or ``"8UC<n>"`` with n interleaved
    channels, ``step`` = width * n * bytes per sample, ``is_bigendian`` as
    usual, ``header.stamp`` = capture time of the first sample. The rate is not
    in the message; it comes from the configuration (``inputs.audio.source_rate``).
    """
    stamp = _stamp(msg, "audio")
    match = _IMAGE_PCM.fullmatch(str(msg.encoding))
    if match is None or (match[1], match[2]) not in _IMAGE_PCM_DTYPES:
        raise BadSample("audio.unknown_format",
                        f"Image encoding {msg.encoding!r} is not PCM; use 16SC<n>, 32SC<n>, 32FC<n> or 8UC<n>")
    channels = int(match[3])
    dtype = np.dtype(_IMAGE_PCM_DTYPES[(match[1], match[2])]).newbyteorder(">" if msg.is_bigendian else "<")
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height != 1:
        raise BadSample("audio.bad_size", f"PCM Image must have height 1, got {height}")
    data = _bytes(msg.data)
    row = width * max(channels, 1) * dtype.itemsize
    if step < row or data.size != step:
        raise BadSample("audio.bad_size",
                        f"PCM Image {width} samples x {channels} channels of {dtype.itemsize} bytes needs "
                        f"step >= {row} and data == step, got step {step} and {data.size} bytes")
    pcm = np.frombuffer(data[:row], dtype=dtype)
    return _audio_chunk(stamp, pcm, channels, int(rate), max_s)


# ---------------------------------------------------------------- imu


def imu_from_msg(msg: Any) -> ImuSample:
    """sensor_msgs/Imu -> ImuSample (linear_acceleration, angular_velocity; orientation is not used)."""
    stamp = _stamp(msg, "imu")
    a, g = msg.linear_acceleration, msg.angular_velocity
    accel = np.array([a.x, a.y, a.z], dtype=np.float64)
    gyro = np.array([g.x, g.y, g.z], dtype=np.float64)
    if not (np.isfinite(accel).all() and np.isfinite(gyro).all()):
        raise BadSample("imu.non_finite", f"accel {accel.tolist()} gyro {gyro.tolist()}")
    # sensor_msgs/Imu: element 0 of a covariance set to -1 means the field is not provided.
    if msg.linear_acceleration_covariance[0] == -1:
        raise BadSample("imu.missing_accel", "linear_acceleration_covariance[0] == -1: no accelerometer data")
    if msg.angular_velocity_covariance[0] == -1:
        raise BadSample("imu.missing_gyro", "angular_velocity_covariance[0] == -1: no gyroscope data")
    return ImuSample(stamp=stamp, accel=accel, gyro=gyro)


# ---------------------------------------------------------------- joint states


def joint_state_from_msg(msg: Any, names: Sequence[str]) -> JointStateSample:
    """sensor_msgs/JointState -> positions and velocities of ``names``, in that order (effort unused)."""
    stamp = _stamp(msg, "joint_state")
    listed = list(msg.name)
    index = {n: i for i, n in enumerate(listed)}
    missing = [n for n in names if n not in index]
    if missing:
        raise BadSample("joint_state.missing_joint",
                        f"joint(s) {missing} not in the message (it names {listed}); the configured order is "
                        f"model.action.names {list(names)}")
    position, velocity = _typed(msg.position, np.float64), _typed(msg.velocity, np.float64)
    if position.size != len(listed):
        raise BadSample("joint_state.bad_size", f"{position.size} positions for {len(listed)} names")
    if velocity.size == 0:
        raise BadSample("joint_state.no_velocity", "velocity is empty; the policy needs joint velocities")
    if velocity.size != len(listed):
        raise BadSample("joint_state.bad_size", f"{velocity.size} velocities for {len(listed)} names")
    pick = np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))
    q, qd = position[pick], velocity[pick]
    if not (np.isfinite(q).all() and np.isfinite(qd).all()):
        raise BadSample("joint_state.non_finite", f"position {q.tolist()} velocity {qd.tolist()}")
    return JointStateSample(stamp=stamp, position=q, velocity=qd)


# ---------------------------------------------------------------- lidar


# Scan geometries whose angle_max is not the last ray's angle, already reported (log once each).
_NOTED_SCAN_GEOMETRIES: set[tuple[int, float, float, float]] = set()
_log = logging.getLogger(__name__)


def lidar_from_laser_scan(msg: Any, cfg: LidarConfig) -> LidarSample:
    """sensor_msgs/LaserScan -> the model's beam grid (nearest valid return per beam, inf where none).

    Valid returns lie within both the scan's [range_min, range_max] and the
    model's. Ray i is at angle_min + i * angle_increment, as the message defines
    it; angle_max only serves to check the count. Drivers size ``ranges`` two
    ways: (angle_max - angle_min) / angle_increment + 1 rays (angle_max is the
    last ray's angle) or ceil((angle_max - angle_min) / angle_increment) rays
    (pointcloud_to_laserscan, ira_laser_tools' merger: the last ray falls short
    of angle_max by up to one increment). Both are taken: a count is refused only
    when the last ray lies more than one increment from angle_max, which is a
    scan whose angles say something else than its ranges. A scan whose last ray
    is not at angle_max is logged once per geometry.
    """
    stamp = _stamp(msg, "lidar")
    ranges = _typed(msg.ranges, np.float32)
    n = ranges.size
    if n == 0:
        raise BadSample("lidar.empty", "LaserScan has no ranges")
    a_min, a_max, step = float(msg.angle_min), float(msg.angle_max), float(msg.angle_increment)
    if not (math.isfinite(a_min) and math.isfinite(a_max) and math.isfinite(step)) or step == 0.0:
        raise BadSample("lidar.bad_angles", f"angle_min {a_min}, angle_max {a_max}, angle_increment {step}")
    span = (a_max - a_min) / step            # increments from angle_min to angle_max
    off = (n - 1) - span                     # where the last ray is, in increments past angle_max
    # The angle fields are float32: a span of increments carries rounding of a few 1e-8 of
    # (|angle_min| + |angle_max|) / |angle_increment|; 1e-6 of that is well clear of it.
    slack = 1e-6 * (abs(a_min) + abs(a_max)) / abs(step) + 1e-9
    if abs(off) > 1.0 + slack:
        raise BadSample("lidar.bad_angles",
                        f"{n} ranges, but angle_min {a_min:.6f} + {n - 1} * angle_increment {step:.6g} puts the "
                        f"last ray {off:+.2f} increments from angle_max {a_max:.6f} (at most one is allowed)")
    if abs(off) > slack:
        geometry = (n, a_min, a_max, step)
        if geometry not in _NOTED_SCAN_GEOMETRIES:
            _NOTED_SCAN_GEOMETRIES.add(geometry)
            _log.warning("LaserScan of %d ranges: the last ray is %+.2f increments from angle_max %.6f; "
                         "using angle_min + i * angle_increment for ray i, as the message defines it",
                         n, off, a_max)
    angles = a_min + step * np.arange(n, dtype=np.float64)
    lo = max(float(msg.range_min), cfg.range_min) if math.isfinite(msg.range_min) else cfg.range_min
    hi = min(float(msg.range_max), cfg.range_max) if math.isfinite(msg.range_max) else cfg.range_max
    return LidarSample(stamp=stamp, ranges=lidar_beams(angles, ranges, cfg.beams, lo, hi))


# sensor_msgs/PointField datatype -> numpy type code
_POINTFIELD_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 8: "f8"}


def lidar_from_point_cloud2(msg: Any, cfg: LidarConfig, *, z_min: float = -math.inf,
                            z_max: float = math.inf) -> LidarSample:
    """sensor_msgs/PointCloud2 -> the model's beam grid by azimuth atan2(y, x), range hypot(x, y).

    x, y, z are read by their PointField offset and datatype (any layout,
    ``point_step``/``row_step`` padding, either byte order); points with a NaN
    coordinate (no return, organised clouds) are skipped. ``z_min``/``z_max``
    keep a horizontal slice of a 3D cloud, so that the floor does not win as the
    nearest return of every beam.
    """
    stamp = _stamp(msg, "lidar")
    fields = {str(f.name): f for f in msg.fields}
    missing = [c for c in "xyz" if c not in fields]
    if missing:
        raise BadSample("lidar.missing_xyz", f"PointCloud2 has no field(s) {missing}; fields are {list(fields)}")
    point_step, row_step = int(msg.point_step), int(msg.row_step)
    height, width = int(msg.height), int(msg.width)
    order = ">" if msg.is_bigendian else "<"
    formats, offsets = [], []
    for c in "xyz":
        f = fields[c]
        code = _POINTFIELD_DTYPES.get(int(f.datatype))
        if code is None:
            raise BadSample("lidar.bad_fields", f"field {c!r} has unknown datatype {f.datatype}")
        dtype = np.dtype(order + code)
        if int(f.offset) + dtype.itemsize > point_step:
            raise BadSample("lidar.bad_fields", f"field {c!r} at offset {f.offset} runs past point_step {point_step}")
        formats.append(dtype)
        offsets.append(int(f.offset))
    if height * width == 0:
        return LidarSample(stamp=stamp, ranges=np.full(cfg.beams, np.inf, dtype=np.float32))
    data = _bytes(msg.data)
    if row_step < width * point_step or data.size < (height - 1) * row_step + width * point_step:
        raise BadSample("lidar.bad_size",
                        f"{data.size} bytes for {height} rows of {width} points (point_step {point_step}, "
                        f"row_step {row_step})")
    point = np.dtype({"names": ["x", "y", "z"], "formats": formats, "offsets": offsets, "itemsize": point_step})
    points = np.ndarray(shape=(height, width), dtype=point, buffer=data, strides=(row_step, point_step))
    x = points["x"].astype(np.float64).ravel()
    y = points["y"].astype(np.float64).ravel()
    z = points["z"].astype(np.float64).ravel()
    with np.errstate(invalid="ignore"):
        keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(z) & (z >= z_min) & (z <= z_max)
    x, y = x[keep], y[keep]
    ranges = lidar_beams(np.arctan2(y, x), np.hypot(x, y), cfg.beams, cfg.range_min, cfg.range_max)
    return LidarSample(stamp=stamp, ranges=ranges)


# ---------------------------------------------------------------- outputs


def sample_converter(modality: str, msgtype: str, cfg: Any,
                     audio_info: Callable[[], AudioFormat | None] = lambda: None) -> Callable[[Any], Any] | None:
    """message -> sample(s) for ``modality`` carried as ROS type ``msgtype`` ("sensor_msgs/msg/Image"),
    configured from the RobotConfig ``cfg``; None when that type cannot carry that modality.

    fusion_node and bag replay both convert through here, so a message gives the same samples live
    and offline. ``audio_info`` returns the latest AudioInfo of an AudioDataStamped stream (None
    before one arrived: the configured source rate and format apply).
    """
    inputs, model = cfg.inputs, cfg.model
    window_s = model.audio.window_s   # an audio chunk longer than the model's window is refused
    fallback = AudioFormat(inputs.audio.source_rate, 1, inputs.audio.source_format)
    table: dict[tuple[str, str], Callable[[Any], Any]] = {
        ("camera", "sensor_msgs/msg/Image"): camera_from_image,
        ("camera", "sensor_msgs/msg/CompressedImage"): camera_from_compressed,
        ("audio", "sensor_msgs/msg/Image"):
            lambda m: audio_from_image_pcm(m, inputs.audio.source_rate, max_s=window_s),
        ("audio", "audio_common_msgs/msg/AudioDataStamped"):
            lambda m: audio_from_audio_data_stamped(m, audio_info(), fallback, max_s=window_s),
        ("audio", "audio_common_msgs/msg/AudioStamped"): lambda m: audio_from_audio_stamped(m, max_s=window_s),
        ("imu", "sensor_msgs/msg/Imu"): imu_from_msg,
        ("lidar", "sensor_msgs/msg/LaserScan"): lambda m: lidar_from_laser_scan(m, model.lidar),
        ("lidar", "sensor_msgs/msg/PointCloud2"):
            lambda m: lidar_from_point_cloud2(m, model.lidar, z_min=inputs.lidar.z_min, z_max=inputs.lidar.z_max),
        ("joint_state", "sensor_msgs/msg/JointState"): lambda m: joint_state_from_msg(m, model.action.names),
    }
    return table.get((modality, msgtype))


def _finite(values: Iterable[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: refusing to publish non-finite values {out}")
    return out


def _set_stamp(header: Any, stamp_s: float) -> None:
    header.stamp.sec, header.stamp.nanosec = s_to_stamp_fields(stamp_s)


def action_msg(values: Sequence[float]):
    """std_msgs/Float64MultiArray with the action in ``data`` (what forward_command_controller reads)."""
    from std_msgs.msg import Float64MultiArray
    msg = Float64MultiArray()
    msg.data = array("d", _finite(values, "action_msg"))
    return msg


def joint_state_msg(names: Sequence[str], values: Sequence[float], stamp_s: float):
    """sensor_msgs/JointState carrying a velocity command.

    The action is a joint velocity (rad/s), so it goes in ``velocity``;
    ``position`` and ``effort`` stay empty, which JointState allows ("all arrays
    are optional; empty when not used").
    """
    from sensor_msgs.msg import JointState
    values = _finite(values, "joint_state_msg")
    if len(names) != len(values):
        raise ValueError(f"joint_state_msg: {len(names)} names for {len(values)} values")
    msg = JointState()
    _set_stamp(msg.header, stamp_s)
    msg.name = [str(n) for n in names]
    msg.velocity = array("d", values)
    return msg


def fused_state_msg(values: Sequence[float]):
    """std_msgs/Float32MultiArray with the fused state vector in ``data``."""
    from std_msgs.msg import Float32MultiArray
    msg = Float32MultiArray()
    msg.data = array("f", _finite(values, "fused_state_msg"))
    return msg


def twist_msg(values6: Sequence[float], stamp_s: float, frame_id: str):
    """geometry_msgs/TwistStamped for MoveIt Servo: values6 = linear xyz (m/s), angular xyz (rad/s)."""
    from geometry_msgs.msg import TwistStamped
    v = _finite(values6, "twist_msg")
    if len(v) != 6:
        raise ValueError(f"twist_msg: needs 6 values (linear xyz, angular xyz), got {len(v)}")
    msg = TwistStamped()
    _set_stamp(msg.header, stamp_s)
    msg.header.frame_id = frame_id
    msg.twist.linear.x, msg.twist.linear.y, msg.twist.linear.z = v[:3]
    msg.twist.angular.x, msg.twist.angular.y, msg.twist.angular.z = v[3:]
    return msg
