"""The simulated cell's configuration (``sim_node.ros__parameters`` in ``config/sim.yaml``).

The same frozen-dataclass scheme as ``mm_fusion_ros.config``: one YAML block is
both the ROS 2 parameters of ``sim_node`` and the defaults of ``mm-fusion
record``; an unknown key, a wrong type or an impossible scene (targets that
cannot fit, a rate of zero, a zero-pixel camera) is refused at load, naming the
key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, _build, _check, read_node_parameters

SIM_NODE_NAME = "sim_node"


def _check_range(pair: tuple[float, ...], key: str, lo: float, hi: float, unit: str) -> None:
    _check(len(pair) == 2, key, f"must be [min, max], got {list(pair)}")
    _check(lo <= pair[0] <= pair[1] <= hi, key, f"must satisfy {lo} <= min <= max <= {hi} {unit}, got {list(pair)}")


def _check_rate(rate: float, key: str, physics_hz: float) -> None:
    _check(0 < rate <= physics_hz, key, f"must be in (0, {physics_hz:g}] Hz (the physics rate), got {rate}")


@dataclass(frozen=True)
class PhysicsConfig:
    timestep: float = 0.0025      # s (400 Hz); a sensor is captured on the physics step at or after its time

    def validate(self, key: str) -> None:
        _check(1e-4 <= self.timestep <= 0.005, f"{key}.timestep", f"must be in [0.0001, 0.005] s, got {self.timestep}")


@dataclass(frozen=True)
class SceneConfig:
    """Buttons on the work surface; positions and click depths are drawn per episode."""

    targets: int = 3              # buttons, one per colour (red, green, blue, yellow, ...)
    area_x: tuple[float, ...] = (0.42, 0.62)    # m, in the robot base frame: where button centres may be
    area_y: tuple[float, ...] = (-0.17, 0.17)
    min_separation: float = 0.10  # m between button centres
    cap_radius: float = 0.022     # m
    click_depth: tuple[float, ...] = (0.003, 0.010)  # m of travel at which the detent snaps, drawn per button
    # m from the click to the end stop; pressing into the stop fails the episode (overtravel), so no fixed
    # press depth works on most buttons: the arm has to feel the click (IMU) and let go.
    free_travel: float = 0.0025
    click_force: float = 8.0      # N the spring holds just before the detent snaps
    after_click_force: float = 1.5  # N the spring holds after it (the drop is what the wrist feels)

    def validate(self, key: str) -> None:
        _check(1 <= self.targets <= 6, f"{key}.targets", f"must be in [1, 6], got {self.targets}")
        _check_range(self.area_x, f"{key}.area_x", 0.25, 0.80, "m")
        _check_range(self.area_y, f"{key}.area_y", -0.40, 0.40, "m")
        _check(self.cap_radius > 0.005, f"{key}.cap_radius", f"must exceed 0.005 m, got {self.cap_radius}")
        _check(self.min_separation >= 2 * self.cap_radius + 0.02, f"{key}.min_separation",
               f"must leave 2 cm between caps (>= {2 * self.cap_radius + 0.02:.3f} m), got {self.min_separation}")
        _check_range(self.click_depth, f"{key}.click_depth", 0.001, 0.02, "m")
        _check(0.001 <= self.free_travel <= 0.02, f"{key}.free_travel", f"must be in [0.001, 0.02] m")
        _check(0 < self.after_click_force < self.click_force, f"{key}.after_click_force",
               f"must be in (0, click_force={self.click_force}) N, got {self.after_click_force}")
        # Whether the buttons fit: a greedy hexagonal packing bound is too clever; demand the area
        # hold them with room to spare so that rejection sampling (a bounded number of tries) succeeds.
        w = self.area_x[1] - self.area_x[0] + self.min_separation
        h = self.area_y[1] - self.area_y[0] + self.min_separation
        capacity = (w * h) / (self.min_separation ** 2 * math.sqrt(3) / 2)
        _check(capacity >= 2.5 * self.targets, f"{key}.targets",
               f"{self.targets} buttons {self.min_separation} m apart do not fit reliably in area_x "
               f"{list(self.area_x)} x area_y {list(self.area_y)} (room for about {capacity / 2.5:.1f}); "
               "enlarge the area or lower min_separation")


@dataclass(frozen=True)
class EpisodeConfig:
    time_limit_s: float = 15.0
    start_time_s: float = 100.0   # sim clock at an episode's start (never 0: a zero stamp reads as "unset" in ROS)

    def validate(self, key: str) -> None:
        _check(1.0 <= self.time_limit_s <= 600, f"{key}.time_limit_s", f"must be in [1, 600] s, got {self.time_limit_s}")
        _check(self.start_time_s >= 1.0, f"{key}.start_time_s", f"must be >= 1 s, got {self.start_time_s}")


@dataclass(frozen=True)
class SimCameraConfig:
    rate_hz: float = 30.0
    width: int = 96
    height: int = 96
    fovy_deg: float = 30.0
    height_m: float = 1.25        # above the table, looking straight down at the centre of the button area
    encoding: Literal["rgb8", "jpeg"] = "jpeg"   # sensor_msgs/Image rgb8, or CompressedImage as image_transport sends
    jpeg_quality: int = 90
    latency_s: tuple[float, ...] = (0.012, 0.025)  # capture -> receive (exposure, USB, driver)

    def validate(self, key: str, physics_hz: float) -> None:
        _check_rate(self.rate_hz, f"{key}.rate_hz", physics_hz)
        _check(8 <= self.width <= 1920, f"{key}.width", f"must be in [8, 1920] px, got {self.width}")
        _check(8 <= self.height <= 1080, f"{key}.height", f"must be in [8, 1080] px, got {self.height}")
        _check(5 <= self.fovy_deg <= 120, f"{key}.fovy_deg", f"must be in [5, 120] degrees, got {self.fovy_deg}")
        _check(0.3 <= self.height_m <= 3.0, f"{key}.height_m", f"must be in [0.3, 3] m, got {self.height_m}")
        _check(10 <= self.jpeg_quality <= 100, f"{key}.jpeg_quality", f"must be in [10, 100]")
        _check_range(self.latency_s, f"{key}.latency_s", 0.0, 0.5, "s")


@dataclass(frozen=True)
class SimAudioConfig:
    sample_rate: int = 16000
    chunk_s: float = 0.02
    cue_start_s: float = 0.5      # first cue, after the episode starts
    cue_period_s: float = 1.0     # the cue repeats; every 1 s audio window then holds some of it (README item 17)
    cue_s: float = 0.4
    cue_tones_hz: tuple[float, ...] = (500.0, 1100.0, 2300.0, 700.0, 1600.0, 3200.0)  # button k's tone
    cue_level: float = 0.25       # full scale
    noise_level: float = 0.02     # background (fans, the room)
    hum_level: float = 0.05       # the arm's motor hum at 1 rad/s of summed joint speed
    latency_s: tuple[float, ...] = (0.001, 0.004)

    def validate(self, key: str, targets: int) -> None:
        _check(8000 <= self.sample_rate <= 96000, f"{key}.sample_rate", f"must be in [8000, 96000] Hz")
        n = self.chunk_s * self.sample_rate
        _check(0.005 <= self.chunk_s <= 0.1 and abs(n - round(n)) < 1e-6, f"{key}.chunk_s",
               f"must be in [0.005, 0.1] s and a whole number of samples, got {self.chunk_s}")
        _check(0 <= self.cue_start_s, f"{key}.cue_start_s", "must be >= 0")
        _check(0.05 <= self.cue_s < self.cue_period_s, f"{key}.cue_s",
               f"must be in [0.05, cue_period_s={self.cue_period_s}) s, got {self.cue_s}")
        _check(len(self.cue_tones_hz) >= targets, f"{key}.cue_tones_hz",
               f"needs a tone per button ({targets}), got {len(self.cue_tones_hz)}")
        _check(all(50 <= f < self.sample_rate / 2 for f in self.cue_tones_hz), f"{key}.cue_tones_hz",
               f"tones must be in [50, Nyquist) Hz, got {list(self.cue_tones_hz)}")
        for name in ("cue_level", "noise_level", "hum_level"):
            _check(0 <= getattr(self, name) <= 1, f"{key}.{name}", "must be in [0, 1] (full scale)")
        _check_range(self.latency_s, f"{key}.latency_s", 0.0, 0.5, "s")


@dataclass(frozen=True)
class SimLidarConfig:
    rate_hz: float = 10.0
    beams: int = 360
    range_min: float = 0.05
    range_max: float = 8.0
    height_m: float = 0.15        # scan plane above the table, at the front edge of the work surface
    noise_std: float = 0.01       # m
    dropout: float = 0.02         # probability a beam returns nothing (inf, REP 117)
    latency_s: tuple[float, ...] = (0.002, 0.006)  # after the sweep ends

    def validate(self, key: str, physics_hz: float) -> None:
        _check_rate(self.rate_hz, f"{key}.rate_hz", physics_hz)
        _check(8 <= self.beams <= 4096, f"{key}.beams", f"must be in [8, 4096], got {self.beams}")
        _check(0 <= self.range_min < self.range_max, f"{key}.range_min", "must satisfy 0 <= range_min < range_max")
        _check(0.05 <= self.height_m <= 0.5, f"{key}.height_m", f"must be in [0.05, 0.5] m")
        _check(0 <= self.noise_std <= 0.2, f"{key}.noise_std", "must be in [0, 0.2] m")
        _check(0 <= self.dropout < 0.5, f"{key}.dropout", "must be in [0, 0.5)")
        _check_range(self.latency_s, f"{key}.latency_s", 0.0, 0.5, "s")


@dataclass(frozen=True)
class SimImuConfig:
    rate_hz: float = 200.0
    accel_noise: float = 0.03     # m/s^2 per sample (white)
    gyro_noise: float = 0.002     # rad/s
    accel_bias: float = 0.05      # m/s^2, per-episode constant drawn per axis
    gyro_bias: float = 0.003      # rad/s
    latency_s: tuple[float, ...] = (0.0005, 0.002)

    def validate(self, key: str, physics_hz: float) -> None:
        _check_rate(self.rate_hz, f"{key}.rate_hz", physics_hz)
        for name in ("accel_noise", "gyro_noise", "accel_bias", "gyro_bias"):
            _check(0 <= getattr(self, name) <= 5, f"{key}.{name}", "must be in [0, 5]")
        _check_range(self.latency_s, f"{key}.latency_s", 0.0, 0.5, "s")


@dataclass(frozen=True)
class SimJointStateConfig:
    rate_hz: float = 100.0
    position_noise: float = 1e-4  # rad (encoder quantisation)
    velocity_noise: float = 0.005 # rad/s
    latency_s: tuple[float, ...] = (0.0005, 0.0015)

    def validate(self, key: str, physics_hz: float) -> None:
        _check_rate(self.rate_hz, f"{key}.rate_hz", physics_hz)
        _check(0 <= self.position_noise <= 0.1, f"{key}.position_noise", "must be in [0, 0.1] rad")
        _check(0 <= self.velocity_noise <= 1, f"{key}.velocity_noise", "must be in [0, 1] rad/s")
        _check_range(self.latency_s, f"{key}.latency_s", 0.0, 0.5, "s")


@dataclass(frozen=True)
class IntruderConfig:
    """A person's arm (a vertical cylinder) reaching into the cell from the side."""

    probability: float = 0.7      # of an episode having an intrusion
    start_s: tuple[float, ...] = (1.5, 7.0)  # when it starts moving in
    dwell_s: tuple[float, ...] = (1.0, 2.5)  # how long it stays
    speed: float = 0.5            # m/s, in and out
    reach_y: tuple[float, ...] = (0.45, 0.55)  # |y| it reaches (outside the camera's view)
    x: tuple[float, ...] = (0.35, 0.65)
    radius: float = 0.045
    field_y: float = 0.65         # protective field: |y| below this (and x in field_x) stops the arm
    field_x: tuple[float, ...] = (0.15, 0.95)

    def validate(self, key: str) -> None:
        _check(0 <= self.probability <= 1, f"{key}.probability", f"must be in [0, 1], got {self.probability}")
        _check_range(self.start_s, f"{key}.start_s", 0.0, 600, "s")
        _check_range(self.dwell_s, f"{key}.dwell_s", 0.0, 60, "s")
        _check(0.05 <= self.speed <= 3, f"{key}.speed", f"must be in [0.05, 3] m/s, got {self.speed}")
        _check_range(self.reach_y, f"{key}.reach_y", 0.2, 1.0, "m")
        _check_range(self.x, f"{key}.x", 0.0, 1.0, "m")
        _check(0.01 <= self.radius <= 0.2, f"{key}.radius", "must be in [0.01, 0.2] m")
        _check(self.field_y > self.reach_y[1], f"{key}.field_y",
               f"must exceed reach_y max ({self.reach_y[1]}) or the intruder never enters the field")
        _check_range(self.field_x, f"{key}.field_x", 0.0, 2.0, "m")


@dataclass(frozen=True)
class CellSafetyConfig:
    """What fails an episode, as a collaborative cell's safety functions would."""

    max_force: float = 40.0       # N of contact force on the tool (a button bottoming out under a push)
    protective_speed: float = 0.03  # m/s of tool speed allowed while the intruder is in the protective field
    reaction_s: float = 0.5       # s after the intruder enters the field before the speed limit applies
    command_timeout_s: float = 0.1  # a velocity command older than this is replaced by zero

    def validate(self, key: str) -> None:
        _check(1 <= self.max_force <= 500, f"{key}.max_force", "must be in [1, 500] N")
        _check(0 < self.protective_speed <= 1, f"{key}.protective_speed", "must be in (0, 1] m/s")
        _check(0 <= self.reaction_s <= 5, f"{key}.reaction_s", "must be in [0, 5] s")
        _check(0.005 <= self.command_timeout_s <= 5, f"{key}.command_timeout_s", "must be in [0.005, 5] s")


@dataclass(frozen=True)
class FrameIds:
    """The sensors' header.frame_id, the same in a recorded bag and on sim_node's topics."""

    camera: str = "camera_optical_frame"   # REP 103 optical frame: z forward, x right, y down
    audio: str = "microphone"
    lidar: str = "laser"
    imu: str = "imu_link"
    joint_states: str = ""        # as joint_state_broadcaster: no frame


@dataclass(frozen=True)
class CellConfig:
    seed: int = 0
    physics: PhysicsConfig = field(default_factory=PhysicsConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)
    episode: EpisodeConfig = field(default_factory=EpisodeConfig)
    camera: SimCameraConfig = field(default_factory=SimCameraConfig)
    audio: SimAudioConfig = field(default_factory=SimAudioConfig)
    lidar: SimLidarConfig = field(default_factory=SimLidarConfig)
    imu: SimImuConfig = field(default_factory=SimImuConfig)
    joint_states: SimJointStateConfig = field(default_factory=SimJointStateConfig)
    intruder: IntruderConfig = field(default_factory=IntruderConfig)
    safety: CellSafetyConfig = field(default_factory=CellSafetyConfig)
    frame_ids: FrameIds = field(default_factory=FrameIds)

    @property
    def physics_hz(self) -> float:
        return 1.0 / self.physics.timestep

    def validate(self) -> None:
        _check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        self.physics.validate("physics")
        self.scene.validate("scene")
        self.episode.validate("episode")
        hz = self.physics_hz
        self.camera.validate("camera", hz)
        self.audio.validate("audio", self.scene.targets)
        self.lidar.validate("lidar", hz)
        self.imu.validate("imu", hz)
        self.joint_states.validate("joint_states", hz)
        self.intruder.validate("intruder")
        self.safety.validate("safety")


def cell_config_from_dict(params: dict) -> CellConfig:
    cfg = _build(CellConfig, params or {}, "")
    cfg.validate()
    return cfg


def load_cell_config(path: str | Path, node: str = SIM_NODE_NAME) -> CellConfig:
    """The ``sim_node.ros__parameters`` block of a ROS 2 parameters file."""
    params = read_node_parameters(path, node)
    # rclpy's own, and sim_node's (topics, pacing; mm_fusion_ros.ros.sim_node): not the cell's.
    params.pop("use_sim_time", None)
    params.pop("node", None)
    try:
        return cell_config_from_dict(params)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
