"""Sensor samples as the ROS-free core sees them, and what one control tick hands the model.

Live nodes (``mm_fusion_ros.ros.convert``), bag replay and training all turn
their messages into these types, so the aligner, runtime and safety code never
see a ROS message. Every ``stamp`` is the capture time in seconds on the
robot's clock (``header.stamp``), never the arrival time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

RAW_ENCODINGS = ("rgb8", "bgr8", "mono8")
COMPRESSED_FORMATS = ("jpeg", "png")


class BadSample(ValueError):
    """A message that cannot be used. ``cause`` is a short stable key counted in /diagnostics."""

    def __init__(self, cause: str, detail: str):
        super().__init__(f"{cause}: {detail}")
        self.cause = cause
        self.detail = detail


@dataclass(frozen=True)
class CameraSample:
    """One camera frame, not yet decoded: decoding happens at most once, for frames a tick uses.

    ``encoding`` is one of RAW_ENCODINGS (``data`` is ``height * step`` bytes) or
    COMPRESSED_FORMATS (``data`` is the compressed stream; width/height are 0 until decoded).
    """

    stamp: float
    encoding: str
    width: int
    height: int
    step: int
    data: np.ndarray  # uint8, 1-D


@dataclass(frozen=True)
class AudioSample:
    """A chunk of mono PCM; ``stamp`` is the capture time of its first sample."""

    stamp: float
    sample_rate: int
    samples: np.ndarray  # float32, 1-D, full scale +-1

    @property
    def end(self) -> float:
        return self.stamp + len(self.samples) / self.sample_rate


@dataclass(frozen=True)
class ImuSample:
    stamp: float
    accel: np.ndarray  # (3,) m/s^2
    gyro: np.ndarray   # (3,) rad/s


@dataclass(frozen=True)
class LidarSample:
    """A scan already binned onto the model's beam grid (see ``lidar_beams``)."""

    stamp: float
    ranges: np.ndarray  # float32 (beams,), inf where a bin had no valid return


@dataclass(frozen=True)
class JointStateSample:
    """The arm's joints in the configured order (``model.action.names``)."""

    stamp: float
    position: np.ndarray  # (dof,) rad (m for a prismatic joint)
    velocity: np.ndarray  # (dof,) rad/s


Sample = CameraSample | AudioSample | ImuSample | LidarSample | JointStateSample


@dataclass(frozen=True)
class Observation:
    """Everything one tick feeds the model, plus what the diagnostics report about it."""

    t: float                 # tick time (s)
    dt: float                # elapsed time since the previous tick (s), the CfC's dt
    camera: np.ndarray       # (H, W, 3) uint8 RGB at the model size
    audio: np.ndarray        # (window_samples,) float32
    imu: np.ndarray          # (window_samples, 6) float32
    lidar: np.ndarray        # (beams,) float32
    joint_state: np.ndarray  # (2 * dof,) float32: positions then velocities, at t
    mask: np.ndarray         # (M,) float32 in MODALITIES order; 1 = present and fresh
    ages: dict[str, float]   # modality -> age of its newest data at t (inf if never seen)
    stamps: dict[str, float] # modality -> stamp of the data used (nan if masked)
    audio_gap_samples: int = 0          # zeros filled into the audio window this tick
    audio_end: int | None = None        # model-rate sample index of the audio window's last sample (None: masked)
    audio_rewritten_from: int | None = None  # lowest audio sample index written over since the last tick
    reset: bool = False                 # the clock jumped backwards: buffers and state were reset
    notes: dict[str, int] = field(default_factory=dict)  # per-tick extra counters
    # Seconds spent building this observation: "align" (buffer look-ups, windows) and
    # "preprocess" (image decode + resize, audio resample, IMU interpolation, lidar).
    timings: dict[str, float] = field(default_factory=dict)
