"""What the cell's sensors produce, ROS-free: one dataclass per sensor, plus the order they arrive in.

Every reading has ``stamp`` (capture time on the sim clock: ``header.stamp``) and
``receive`` (when a driver would have it in hand: after exposure and transfer, a
finished audio chunk, a finished LiDAR sweep), so that a recorded bag and a live
``sim_node`` show the same capture-before-receive latencies as a real robot.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CameraFrame:
    stamp: float
    receive: float
    pixels: np.ndarray        # (H, W, 3) uint8 RGB

    sensor = "camera"


JPEG_FORMAT = "rgb8; jpeg compressed bgr8"   # CompressedImage.format as image_transport's compressed plugin writes it


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """RGB pixels -> a JPEG stream, as image_transport's compressed plugin sends (the same bytes live and in bags)."""
    import cv2
    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(pixels[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("JPEG encoding failed")
    return data.tobytes()


@dataclass(frozen=True)
class AudioChunk:
    stamp: float              # first sample
    receive: float
    pcm: np.ndarray           # (n,) int16 mono
    sample_rate: int

    sensor = "audio"


@dataclass(frozen=True)
class LidarScan:
    stamp: float              # first beam (REP 117 / LaserScan convention)
    receive: float
    ranges: np.ndarray        # (beams,) float32, inf where nothing returned
    angle_min: float
    angle_increment: float
    scan_time: float
    range_min: float
    range_max: float

    sensor = "lidar"

    @property
    def angle_max(self) -> float:
        return self.angle_min + (len(self.ranges) - 1) * self.angle_increment


@dataclass(frozen=True)
class ImuReading:
    stamp: float
    receive: float
    accel: np.ndarray         # (3,) m/s^2, specific force in the IMU frame (gravity included, as real IMUs)
    gyro: np.ndarray          # (3,) rad/s

    sensor = "imu"


@dataclass(frozen=True)
class JointReading:
    stamp: float
    receive: float
    position: np.ndarray      # (7,) rad
    velocity: np.ndarray      # (7,) rad/s
    effort: np.ndarray        # (7,) N m

    sensor = "joint_states"


Reading = CameraFrame | AudioChunk | LidarScan | ImuReading | JointReading
SENSORS = ("camera", "audio", "lidar", "imu", "joint_states")


@dataclass(order=True)
class _Queued:
    receive: float
    order: int
    reading: Reading = field(compare=False)


class ArrivalQueue:
    """Readings in the order a driver would deliver them (receive time, then capture order)."""

    def __init__(self) -> None:
        self._heap: list[_Queued] = []
        self._order = 0

    def push(self, readings: list[Reading]) -> None:
        for r in readings:
            heapq.heappush(self._heap, _Queued(r.receive, self._order, r))
            self._order += 1

    def pop_due(self, t: float) -> list[Reading]:
        """Every reading received at or before ``t``."""
        out = []
        while self._heap and self._heap[0].receive <= t:
            out.append(heapq.heappop(self._heap).reading)
        return out

    def drain(self) -> list[Reading]:
        return self.pop_due(float("inf"))

    def __len__(self) -> int:
        return len(self._heap)
