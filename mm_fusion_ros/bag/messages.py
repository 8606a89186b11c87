"""rosbags message objects with every field filled in.

rosbags' message classes are plain dataclasses without ROS defaults, so a
message built by hand must name every field; these builders do it once, in the
robot's terms. ``ts`` is the type store the bag is written with.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
from rosbags.typesys.store import Typestore

# (modality, inputs.<modality>.type) -> the message type on that input's topic (fusion_node's subscription).
INPUT_MSGTYPES = {
    ("camera", "image"): "sensor_msgs/msg/Image",
    ("camera", "compressed_image"): "sensor_msgs/msg/CompressedImage",
    ("audio", "audio_data_stamped"): "audio_common_msgs/msg/AudioDataStamped",
    ("audio", "audio_stamped"): "audio_common_msgs/msg/AudioStamped",
    ("audio", "image_pcm"): "sensor_msgs/msg/Image",
    ("imu", ""): "sensor_msgs/msg/Imu",
    ("lidar", "laser_scan"): "sensor_msgs/msg/LaserScan",
    ("lidar", "point_cloud2"): "sensor_msgs/msg/PointCloud2",
    ("joint_state", ""): "sensor_msgs/msg/JointState",
}

# ROS 2 diagnostic levels (diagnostic_msgs/DiagnosticStatus)
DIAG_LEVELS = {"OK": 0, "WARN": 1, "ERROR": 2, "STALE": 3}


def stamp_ns(t: float) -> int:
    """Seconds on the robot's clock -> integer nanoseconds (what bags and headers hold)."""
    return int(round(t * 1e9))


def time_msg(ts: Typestore, t: float):
    return time_msg_ns(ts, stamp_ns(t))


def time_msg_ns(ts: Typestore, ns: int):
    # Integer nanoseconds: a float holds a 2023 epoch time only to ~240 ns, too coarse for a tick grid.
    return ts.types["builtin_interfaces/msg/Time"](sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def header(ts: Typestore, t: float, frame_id: str):
    return ts.types["std_msgs/msg/Header"](stamp=time_msg(ts, t), frame_id=frame_id)


def header_ns(ts: Typestore, ns: int, frame_id: str):
    return ts.types["std_msgs/msg/Header"](stamp=time_msg_ns(ts, ns), frame_id=frame_id)


def image(ts: Typestore, t: float, frame_id: str, pixels: np.ndarray, encoding: str = "rgb8"):
    """A raw frame; ``pixels`` is HxWxC uint8 (HxW for mono8)."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    return ts.types["sensor_msgs/msg/Image"](
        header=header(ts, t, frame_id), height=height, width=width, encoding=encoding, is_bigendian=0,
        step=pixels.strides[0], data=pixels.reshape(-1))


def compressed_image(ts: Typestore, t: float, frame_id: str, data: bytes, fmt: str = "jpeg"):
    return ts.types["sensor_msgs/msg/CompressedImage"](
        header=header(ts, t, frame_id), format=fmt, data=np.frombuffer(data, np.uint8).copy())


def image_pcm(ts: Typestore, t: float, frame_id: str, pcm: np.ndarray):
    """The fallback audio stream on standard messages: one row of 16SC1 (or 32FC1) PCM, stamped at
    the capture time of its first sample."""
    pcm = np.ascontiguousarray(pcm)
    encoding = {np.dtype("<i2"): "16SC1", np.dtype("<f4"): "32FC1"}.get(pcm.dtype.newbyteorder("<"))
    if encoding is None:
        raise ValueError(f"image_pcm carries int16 or float32 samples, got {pcm.dtype}")
    raw = pcm.astype(pcm.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    return ts.types["sensor_msgs/msg/Image"](
        header=header(ts, t, frame_id), height=1, width=len(pcm), encoding=encoding, is_bigendian=0,
        step=raw.size, data=raw.copy())


def audio_data_stamped(ts: Typestore, t: float, frame_id: str, pcm: bytes | np.ndarray):
    """ros-drivers' chunk: raw bytes in the format of the stream's AudioInfo."""
    data = np.frombuffer(bytes(pcm) if not isinstance(pcm, np.ndarray) else pcm.tobytes(), np.uint8).copy()
    return ts.types["audio_common_msgs/msg/AudioDataStamped"](
        header=header(ts, t, frame_id), audio=ts.types["audio_common_msgs/msg/AudioData"](data=data))


def audio_info(ts: Typestore, sample_rate: int, channels: int = 1, sample_format: str = "S16LE",
               coding_format: str = "wave"):
    bits = {"S16LE": 16, "S24LE": 24, "S32LE": 32, "F32LE": 32}.get(sample_format, 0)
    return ts.types["audio_common_msgs/msg/AudioInfo"](
        channels=channels, sample_rate=sample_rate, sample_format=sample_format,
        bitrate=sample_rate * channels * bits, coding_format=coding_format)


PA_INT16 = 8  # PortAudio's paInt16, the format mgonzs13's AudioInfo names


def audio_stamped(ts: Typestore, t: float, frame_id: str, pcm: np.ndarray, sample_rate: int):
    """mgonzs13's chunk of mono int16 samples (needs the mgonzs13 flavour in ``ts``)."""
    pcm = np.ascontiguousarray(pcm, dtype=np.int16)
    data = ts.types["audio_common_msgs/msg/AudioData"](
        float32_data=np.zeros(0, np.float32), int32_data=np.zeros(0, np.int32), int16_data=pcm,
        int8_data=np.zeros(0, np.int8), uint8_data=np.zeros(0, np.uint8))
    info = ts.types["audio_common_msgs/msg/AudioInfo"](format=PA_INT16, channels=1, rate=sample_rate, chunk=len(pcm))
    audio = ts.types["audio_common_msgs/msg/Audio"](audio_data=data, info=info)
    return ts.types["audio_common_msgs/msg/AudioStamped"](header=header(ts, t, frame_id), audio=audio)


def laser_scan(ts: Typestore, t: float, frame_id: str, ranges: np.ndarray, range_min: float, range_max: float,
               scan_time: float):
    """A full 360-degree scan; ``t`` is the time of the first beam (REP 117 keeps inf/NaN as they are)."""
    ranges = np.ascontiguousarray(ranges, dtype=np.float32)
    n = len(ranges)
    increment = 2 * math.pi / n
    return ts.types["sensor_msgs/msg/LaserScan"](
        header=header(ts, t, frame_id), angle_min=-math.pi, angle_max=-math.pi + (n - 1) * increment,
        angle_increment=increment, time_increment=scan_time / n, scan_time=scan_time,
        range_min=range_min, range_max=range_max, ranges=ranges, intensities=np.zeros(0, np.float32))


def imu(ts: Typestore, t: float, frame_id: str, accel: Sequence[float], gyro: Sequence[float]):
    """Accel + gyro; orientation is not estimated (REP 145: covariance[0] = -1)."""
    vec = ts.types["geometry_msgs/msg/Vector3"]
    orientation_cov = np.zeros(9, np.float64)
    orientation_cov[0] = -1.0
    return ts.types["sensor_msgs/msg/Imu"](
        header=header(ts, t, frame_id),
        orientation=ts.types["geometry_msgs/msg/Quaternion"](x=0.0, y=0.0, z=0.0, w=1.0),
        orientation_covariance=orientation_cov,
        angular_velocity=vec(x=float(gyro[0]), y=float(gyro[1]), z=float(gyro[2])),
        angular_velocity_covariance=np.zeros(9, np.float64),
        linear_acceleration=vec(x=float(accel[0]), y=float(accel[1]), z=float(accel[2])),
        linear_acceleration_covariance=np.zeros(9, np.float64))


def _no_layout(ts: Typestore):
    # What fusion_node publishes (rclpy's default): data only, no dimensions.
    return ts.types["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)


def float64_array(ts: Typestore, values: Iterable[float]):
    data = np.array(values, np.float64).reshape(-1)
    return ts.types["std_msgs/msg/Float64MultiArray"](layout=_no_layout(ts), data=data)


def float32_array(ts: Typestore, values: Iterable[float]):
    data = np.array(values, np.float32).reshape(-1)
    return ts.types["std_msgs/msg/Float32MultiArray"](layout=_no_layout(ts), data=data)


def joint_state(ts: Typestore, t_ns: int, names: Sequence[str], position: Sequence[float] = (),
                velocity: Sequence[float] = (), effort: Sequence[float] = (), frame_id: str = ""):
    return ts.types["sensor_msgs/msg/JointState"](
        header=header_ns(ts, t_ns, frame_id), name=list(names), position=np.asarray(position, np.float64).reshape(-1),
        velocity=np.asarray(velocity, np.float64).reshape(-1), effort=np.asarray(effort, np.float64).reshape(-1))


def diagnostic_status(ts: Typestore, name: str, level: int | str, message: str, values: Mapping[str, object],
                      hardware_id: str = ""):
    lvl = DIAG_LEVELS[level] if isinstance(level, str) else int(level)
    kv = ts.types["diagnostic_msgs/msg/KeyValue"]
    return ts.types["diagnostic_msgs/msg/DiagnosticStatus"](
        level=lvl, name=name, message=message, hardware_id=hardware_id,
        values=[kv(key=str(k), value=str(v)) for k, v in values.items()])


def diagnostic_array(ts: Typestore, t_ns: int, statuses: Sequence[object]):
    return ts.types["diagnostic_msgs/msg/DiagnosticArray"](header=header_ns(ts, t_ns, ""), status=list(statuses))


def clock(ts: Typestore, t_ns: int):
    return ts.types["rosgraph_msgs/msg/Clock"](clock=time_msg_ns(ts, t_ns))
