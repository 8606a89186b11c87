"""Typed configuration for the whole pipeline, loaded from ``config/robot.yaml``.

The YAML file is at the same time a ROS 2 parameters file (``fusion_node:
ros__parameters: ...``) and the only source of defaults for the CLI, so a value
is never written twice. Every section is a small frozen dataclass; loading
checks unknown keys, types and impossible values and names the offending key
(``model.audio.n_fft``) in the error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

NODE_NAME = "fusion_node"
# The input streams, in the order of the model's mask, state and attention rows; everything that
# iterates over inputs (aligner, runtime, diagnostics, replay, nodes) iterates over this.
MODALITIES = ("camera", "audio", "imu", "lidar", "joint_state")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _check_channels(channels: tuple[int, ...], key: str) -> None:
    _check(len(channels) >= 1 and all(c > 0 for c in channels), key,
           f"must be a non-empty list of positive ints, got {list(channels)}")


@dataclass(frozen=True)
class CameraConfig:
    height: int = 96
    width: int = 96
    backbone: Literal["simple", "resnet"] = "simple"
    channels: tuple[int, ...] = (8, 16, 32)
    # Each layer's stride (the first is the stem's). The keypoints are read off the last layer's map:
    # (4, 2, 2) gives 6x6 cells of 11 cm over the cell's table, (4, 2, 1) 12x12 of 5.6 cm.
    strides: tuple[int, ...] = (4, 2, 2)
    # Keypoints read at full resolution off a 1x1 convolution of the pixels (a learned colour filter each),
    # beside the CNN's: a 6x6 map places a 4 cm button cap to ~2 cm, a colour centroid to 0.5 mm. 0: none.
    pixel_keypoints: int = 0

    def validate(self, key: str) -> None:
        _check(0 <= self.pixel_keypoints <= 64, f"{key}.pixel_keypoints", f"must be in [0, 64], got {self.pixel_keypoints}")
        _check(8 <= self.height <= 4096, f"{key}.height", f"must be in [8, 4096], got {self.height}")
        _check(8 <= self.width <= 4096, f"{key}.width", f"must be in [8, 4096], got {self.width}")
        _check_channels(self.channels, f"{key}.channels")
        _check(len(self.strides) == len(self.channels), f"{key}.strides",
               f"needs one stride per layer of channels ({len(self.channels)}), got {list(self.strides)}")
        _check(all(s in (1, 2, 4) for s in self.strides), f"{key}.strides",
               f"each stride must be 1, 2 or 4, got {list(self.strides)}")
        total = math.prod(self.strides)
        _check(min(self.height, self.width) >= 2 * total, f"{key}.strides",
               f"strides {list(self.strides)} shrink a {self.width}x{self.height} image below 2x2 "
               f"(total stride {total})")


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 16000
    window_s: float = 1.0
    n_fft: int = 512
    hop: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0
    channels: tuple[int, ...] = (8, 16)
    stream_frames: int = 8        # newest log-mel frames computed per tick; older ones come from the cache

    @property
    def window_samples(self) -> int:
        return int(round(self.sample_rate * self.window_s))

    @property
    def n_frames(self) -> int:
        # No centre padding: the last frame ends at the newest sample, as it must live.
        return 1 + (self.window_samples - self.n_fft) // self.hop

    def validate(self, key: str) -> None:
        _check(self.sample_rate > 0, f"{key}.sample_rate", f"must be positive, got {self.sample_rate}")
        _check(self.window_s > 0, f"{key}.window_s", f"must be positive, got {self.window_s}")
        # The STFT is a two-stage polyphase transform (see LogMelSpectrogram); these bounds keep its blocks whole.
        _check(self.n_fft >= 16 and self.n_fft % 8 == 0, f"{key}.n_fft",
               f"must be a multiple of 8 and at least 16, got {self.n_fft}")
        _check(0 < self.hop <= self.n_fft and self.hop % 4 == 0, f"{key}.hop",
               f"must be a multiple of 4 in (0, n_fft={self.n_fft}], got {self.hop}")
        _check(self.window_samples >= self.n_fft, f"{key}.window_s",
               f"window of {self.window_samples} samples ({self.window_s} s at {self.sample_rate} Hz) "
               f"is shorter than one FFT (n_fft={self.n_fft})")
        _check(self.n_mels > 0, f"{key}.n_mels", f"must be positive, got {self.n_mels}")
        _check(0.0 <= self.f_min < self.f_max, f"{key}.f_min", f"must satisfy 0 <= f_min < f_max, got {self.f_min}")
        _check(self.f_max <= self.sample_rate / 2, f"{key}.f_max",
               f"must not exceed Nyquist ({self.sample_rate / 2} Hz), got {self.f_max}")
        _check_channels(self.channels, f"{key}.channels")
        _check(1 <= self.stream_frames <= self.n_frames, f"{key}.stream_frames",
               f"must be in [1, {self.n_frames}] (the frames of one window), got {self.stream_frames}")


@dataclass(frozen=True)
class ImuConfig:
    rate_hz: float = 200.0
    window_s: float = 0.2
    channels: tuple[int, ...] = (16, 32)
    # Each window's own per-channel mean subtracted inside the network: what is left is what changed within
    # the window (the detent's snap, a contact), not the wrist's steady rotation rate or gravity's direction.
    # A velocity-controlled arm's rotation rate is its last command, and a policy cloned with it copies it
    # (README "Learning", item 23: silenced, the IMU left the policy unable to start).
    high_pass: bool = False

    @property
    def window_samples(self) -> int:
        return int(round(self.rate_hz * self.window_s))

    def validate(self, key: str) -> None:
        _check(self.rate_hz > 0, f"{key}.rate_hz", f"must be positive, got {self.rate_hz}")
        _check(self.window_s > 0, f"{key}.window_s", f"must be positive, got {self.window_s}")
        _check(self.window_samples >= 4, f"{key}.window_s",
               f"window holds {self.window_samples} samples at {self.rate_hz} Hz; at least 4 are needed")
        _check_channels(self.channels, f"{key}.channels")


@dataclass(frozen=True)
class LidarConfig:
    beams: int = 360
    range_min: float = 0.05
    range_max: float = 30.0
    channels: tuple[int, ...] = (16, 32)

    def validate(self, key: str) -> None:
        _check(self.beams >= 8, f"{key}.beams", f"must be at least 8, got {self.beams}")
        _check(0.0 <= self.range_min < self.range_max, f"{key}.range_min",
               f"must satisfy 0 <= range_min < range_max, got {self.range_min} / {self.range_max}")
        _check_channels(self.channels, f"{key}.channels")


@dataclass(frozen=True)
class EncoderConfig:
    """Liquid-spike encoder: LIF spiking layer feeding a CfC cell, one per modality."""

    beta: float = 0.95
    threshold: float = 1.0
    num_spike_steps: int = 32
    hidden: int = 64
    cfc_mode: Literal["default", "no_gate", "pure"] = "default"
    backbone_units: int = 64
    backbone_layers: int = 1

    def validate(self, key: str) -> None:
        _check(0.0 < self.beta <= 1.0, f"{key}.beta", f"must be in (0, 1], got {self.beta}")
        _check(self.threshold > 0, f"{key}.threshold", f"must be positive, got {self.threshold}")
        _check(1 <= self.num_spike_steps <= 256, f"{key}.num_spike_steps",
               f"must be in [1, 256], got {self.num_spike_steps}")
        _check(self.hidden > 0, f"{key}.hidden", f"must be positive, got {self.hidden}")
        _check(self.backbone_units > 0, f"{key}.backbone_units", f"must be positive, got {self.backbone_units}")
        _check(self.backbone_layers >= 0, f"{key}.backbone_layers", f"must be >= 0, got {self.backbone_layers}")


@dataclass(frozen=True)
class FusionConfig:
    strategy: Literal["early", "late", "hybrid", "hierarchical", "bilinear", "adaptive"] = "hybrid"
    heads: int = 4                # attention heads (hybrid, hierarchical)
    rank: int = 4                 # factors per modality (bilinear)
    keypoint_queries: int = 0     # queries of the fused state over the camera's keypoints (0: none; FusionNet)
    # What the queries are computed from: the fused state, or the audio cell's state alone (the cue), so
    # that what they read cannot be inferred from where the arm is heading (KeypointRead).
    keypoint_query_source: Literal["fused", "audio"] = "fused"
    # The cell's buttons as a cue names them (0: off; CueRead): the camera's keypoints read as this many
    # (x, y), the audio cell's state as which of them the tone names, and the named one's offset from the
    # tool (the Panda's published kinematics over the joint states) into the fused vector.
    cue_objects: int = 0
    # The cue read's estimate of every button held across ticks while the camera cannot see it (a gate per
    # button from how strongly the camera's pixel keypoints find their colour), in one more slot of the
    # state: overhead, the hand covers the cued cap for the last 2-3 cm of the approach and the whole press
    # (README item 23). Needs cue_objects and model.camera.pixel_keypoints.
    cue_memory: bool = False

    def validate(self, key: str, dim: int) -> None:
        _check(self.heads > 0 and dim % self.heads == 0, f"{key}.heads",
               f"must be a positive divisor of model.encoder.hidden={dim}, got {self.heads}")
        _check(1 <= self.rank <= 64, f"{key}.rank", f"must be in [1, 64], got {self.rank}")
        _check(0 <= self.keypoint_queries <= 16, f"{key}.keypoint_queries",
               f"must be in [0, 16], got {self.keypoint_queries}")
        _check(0 <= self.cue_objects <= 16, f"{key}.cue_objects", f"must be in [0, 16], got {self.cue_objects}")
        _check(not self.cue_memory or self.cue_objects > 0, f"{key}.cue_memory",
               "needs cue_objects above 0: it holds the cue read's estimates")
        _check(not self.cue_memory or dim >= 3 * self.cue_objects + 1, f"{key}.cue_memory",
               f"needs model.encoder.hidden >= 3 * cue_objects + 1 = {3 * self.cue_objects + 1}, got {dim}")
        _check(not (self.cue_objects and self.keypoint_queries), f"{key}.cue_objects",
               f"cannot be set together with {key}.keypoint_queries, another way to read the camera's keypoints: "
               f"set one of them to 0 (got {self.cue_objects} and {self.keypoint_queries})")


DEFAULT_JOINTS = tuple(f"joint_{i}" for i in range(1, 8))


@dataclass(frozen=True)
class ActionConfig:
    """The 7-DOF action: joint names and the per-DOF range the network's head is scaled into.

    ``lower``/``upper`` are the model's output range, part of its weights' meaning (saved in
    checkpoints). The limits the arm gets are ``safety.lower``/``safety.upper``.
    """

    names: tuple[str, ...] = DEFAULT_JOINTS
    lower: tuple[float, ...] = (-1.0,) * 7
    upper: tuple[float, ...] = (1.0,) * 7
    # joint: the head says joint velocities. tool: it says the tool tip's twist (v, w; base frame), which
    # damped least squares on the Panda's published kinematics turns into joint velocities inside the
    # network (``model.kinematics.tool_twist_to_joints``); the output is joint velocities either way.
    space: Literal["joint", "tool"] = "joint"
    # tool: the posture the null space pulls towards (rad), one per DOF; the Panda's ready pose by default
    rest: tuple[float, ...] = (0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4)
    null_gain: float = 0.5             # tool: 1/s, that pull
    damping: float = 0.05              # tool: lambda of the damped least squares
    # What the head reads. fused: the fused vector (and the tool's pose, in tool space). task: only what
    # training supervises to mean something in the task, the cue read (the named button's offset from the
    # tool, the tool's height, the belief), the phase flags (``sim.task_state.PHASES``) and the tool's pose,
    # none of which the action's loss trains: see ``ActionHead``.
    reads: Literal["fused", "task"] = "fused"

    @property
    def dof(self) -> int:
        return len(self.names)

    def validate(self, key: str) -> None:
        _check(len(self.names) == 7, f"{key}.names", f"must name 7 DOF, got {len(self.names)}")
        _check(len(set(self.names)) == len(self.names), f"{key}.names", f"names must be unique, got {list(self.names)}")
        for side in ("lower", "upper"):
            vals = getattr(self, side)
            _check(len(vals) == len(self.names), f"{key}.{side}",
                   f"needs one value per DOF ({len(self.names)}), got {len(vals)}")
            _check(all(math.isfinite(v) for v in vals), f"{key}.{side}", f"values must be finite, got {list(vals)}")
        for i, (lo, hi) in enumerate(zip(self.lower, self.upper)):
            _check(lo < hi, f"{key}.lower", f"lower[{i}]={lo} must be below upper[{i}]={hi} ({self.names[i]})")
        if self.space == "tool":
            _check(len(self.rest) == len(self.names), f"{key}.rest",
                   f"space tool needs a rest posture, one value per DOF ({len(self.names)}), got {len(self.rest)}")
            _check(self.null_gain >= 0, f"{key}.null_gain", f"must be >= 0, got {self.null_gain}")
            _check(self.damping > 0, f"{key}.damping", f"must be positive, got {self.damping}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's shapes and weights layout; saved in checkpoints."""

    camera: CameraConfig = field(default_factory=CameraConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    imu: ImuConfig = field(default_factory=ImuConfig)
    lidar: LidarConfig = field(default_factory=LidarConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    fused_state_dim: int = 32
    # The inputs the network uses; the others are masked inside it, at every tick, as if absent
    # (a modality ablation's checkpoint: `mm-fusion train --modalities`).
    modalities: tuple[str, ...] = MODALITIES
    # Whether the network sees the joint velocities (the joint_state input's second half) or only the
    # positions. A velocity-controlled arm's measured velocity is its previous command: a policy cloned
    # from demonstrations with it learns to copy it (open loop it tracks the expert, closed loop it never
    # starts moving; measured, see README "Learning"). The input keeps its shape either way.
    joint_velocity: bool = True

    def validate(self, key: str) -> None:
        for name in ("camera", "audio", "imu", "lidar", "encoder", "action"):
            getattr(self, name).validate(f"{key}.{name}")
        _check(len(self.modalities) >= 1 and all(m in MODALITIES for m in self.modalities)
               and len(set(self.modalities)) == len(self.modalities), f"{key}.modalities",
               f"must be distinct names from {list(MODALITIES)}, got {list(self.modalities)}")
        self.fusion.validate(f"{key}.fusion", self.encoder.hidden)
        _check(not self.fusion.cue_memory or self.camera.pixel_keypoints > 0, f"{key}.fusion.cue_memory",
               f"needs {key}.camera.pixel_keypoints above 0: its gates read how strongly they find their colour")
        _check(self.action.space != "tool" or "joint_state" in self.modalities, f"{key}.action.space",
               "tool turns the tool's twist into joint velocities at the measured joints: modalities must "
               f"include joint_state, got {list(self.modalities)}")
        _check(self.fused_state_dim > 0, f"{key}.fused_state_dim", f"must be positive, got {self.fused_state_dim}")
        _check(self.action.reads != "task" or (self.action.space == "tool" and self.fusion.cue_objects > 0),
               f"{key}.action.reads", "task reads the cue read and the tool's pose: it needs action.space tool and "
               f"fusion.cue_objects above 0, got space {self.action.space} and cue_objects {self.fusion.cue_objects}")


@dataclass(frozen=True)
class RemoteConfig:
    """Where the ``remote`` engine's policy server (``mm-fusion serve``) is, and how long a step may take."""

    endpoint: str = "tcp://127.0.0.1:5555"
    # A step without a reply by then is a missed tick: the command rests. The server drops a request that
    # waited this long in its queue instead of serving it late.
    timeout_ms: float = 5.0
    # CURVE (`mm-fusion keys DIR`): the server's public key (DIR/server.key) and this client's key pair
    # (DIR/clients/NAME.key_secret). Both or neither; neither is refused for a non-loopback endpoint.
    server_key: str = ""
    client_key: str = ""
    # After sending a step, poll for its reply without sleeping for up to this long (then wait normally).
    # A thread that sleeps through the server's step wakes up late on a virtual machine whose idle core
    # has halted; spinning keeps the core and the thread awake, at the price of that much CPU per tick.
    busy_poll_ms: float = 0.0

    def validate(self, key: str) -> None:
        from .remote.endpoint import endpoint_problem

        problem = endpoint_problem(self.endpoint, self.server_key)
        _check(not problem, f"{key}.endpoint", problem)
        _check(0.0 < self.timeout_ms <= 60000.0, f"{key}.timeout_ms", f"must be in (0, 60000] ms, got {self.timeout_ms}")
        _check(0.0 <= self.busy_poll_ms <= self.timeout_ms, f"{key}.busy_poll_ms",
               f"must be in [0, timeout_ms={self.timeout_ms:g}] ms, got {self.busy_poll_ms}")
        _check(bool(self.server_key) == bool(self.client_key), f"{key}.server_key",
               "give both server_key and client_key (CURVE), or neither")


@dataclass(frozen=True)
class EngineConfig:
    """Which compiled engine runs the streaming step, and where its artefacts live."""

    @property
    def artifact_path(self) -> Path:
        if self.artifact_dir:
            return Path(os.path.expanduser(self.artifact_dir))
        ros_home = os.environ.get("ROS_HOME") or os.path.join(os.path.expanduser("~"), ".ros")
        return Path(ros_home) / "mm_fusion_ros"

    backend: Literal["auto", "torch", "onnxruntime", "tensorrt", "compiled", "remote"] = "auto"
    precision: Literal["fp32", "fp16"] = "fp32"
    # Where model.onnx, TensorRT plans and their cache keys are kept; relative to the working directory.
    # Where model.onnx, TensorRT plans and their keys are kept. Empty: a per-user cache,
    # $ROS_HOME/mm_fusion_ros (or ~/.ros/mm_fusion_ros), never the working directory, which under
    # ros2 launch is wherever the shell happened to be. A relative path is relative to the working directory.
    artifact_dir: str = ""
    # Rebuild a cached TensorRT plan even when its key still matches.
    force_rebuild: bool = False
    intra_op_threads: int = 1
    remote: RemoteConfig = field(default_factory=RemoteConfig)   # backend "remote": the policy server

    def validate(self, key: str) -> None:
        _check(self.intra_op_threads >= 0, f"{key}.intra_op_threads",
               f"must be >= 0 (0 lets the runtime choose), got {self.intra_op_threads}")
        self.remote.validate(f"{key}.remote")


# ---------------------------------------------------------------- the live loop (inputs, safety, outputs)

QOS_CHOICES = ("reliable", "best_effort")


_NAME = re.compile(r"^(~/|/)?[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")


def check_topic_name(name: str, key: str) -> None:
    """A ROS topic name: relative (``imu/data``: moved by the node's namespace), private (``~/tick``) or
    absolute (``/imu/data``)."""
    _check(bool(_NAME.match(name)), key,
           f"must be a ROS topic name like 'camera/image_raw', '~/tick' or '/scan', got {name!r}")


def resolve_name(name: str, namespace: str = "/", node: str = NODE_NAME) -> str:
    """The absolute name a node called ``node`` in ``namespace`` gives ``name`` (as rcl expands it)."""
    ns = "/" + namespace.strip("/") if namespace.strip("/") else ""
    if name.startswith("/"):
        return name
    if name.startswith("~/"):
        return f"{ns}/{node}/{name[2:]}"
    return f"{ns}/{name}"


def _check_input(key: str, topic: str, max_age: float, depth: int) -> None:
    check_topic_name(topic, f"{key}.topic")
    _check(max_age > 0, f"{key}.max_age", f"must be positive seconds, got {max_age}")
    _check(1 <= depth <= 10000, f"{key}.depth", f"must be in [1, 10000], got {depth}")


@dataclass(frozen=True)
class CameraInput:
    topic: str = "camera/image_raw"
    type: Literal["image", "compressed_image"] = "image"   # sensor_msgs/Image | sensor_msgs/CompressedImage
    max_age: float = 0.1          # s; a newer frame is expected every 33 ms at 30 Hz
    qos: Literal["reliable", "best_effort"] = "best_effort"
    depth: int = 10

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class AudioInput:
    topic: str = "audio/audio_stamped"
    # audio_common_msgs/AudioDataStamped (+ AudioInfo on info_topic) | audio_common_msgs/AudioStamped |
    # the fallback on standard messages: sensor_msgs/Image, one row of 16SC1/32FC1 PCM (see README).
    type: Literal["audio_data_stamped", "audio_stamped", "image_pcm"] = "audio_data_stamped"
    info_topic: str = "audio/audio_info"
    # Rate and format of streams whose messages do not carry them (AudioDataStamped before an
    # AudioInfo arrives, and image_pcm).
    source_rate: int = 16000
    source_format: Literal["S16LE", "F32LE"] = "S16LE"
    max_age: float = 0.1
    qos: Literal["reliable", "best_effort"] = "best_effort"
    depth: int = 100

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)
        check_topic_name(self.info_topic, f"{key}.info_topic")
        _check(1000 <= self.source_rate <= 384000, f"{key}.source_rate",
               f"must be in [1000, 384000] Hz, got {self.source_rate}")


@dataclass(frozen=True)
class ImuInput:
    topic: str = "imu/data"
    max_age: float = 0.05
    qos: Literal["reliable", "best_effort"] = "best_effort"
    depth: int = 200

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class LidarInput:
    topic: str = "scan"
    type: Literal["laser_scan", "point_cloud2"] = "laser_scan"
    max_age: float = 0.25         # s; scans come at 10 Hz
    qos: Literal["reliable", "best_effort"] = "best_effort"
    depth: int = 10
    # m, in the PointCloud2's own (sensor) frame, z up: the horizontal slice of a 3-D cloud that is
    # binned by azimuth. Without it the floor is the nearest return of every beam. A planar cloud
    # (z = 0) passes whole; LaserScan does not use it.
    z_min: float = -0.1
    z_max: float = 0.1

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)
        _check(math.isfinite(self.z_min) and math.isfinite(self.z_max), f"{key}.z_min",
               f"z_min and z_max must be finite, got {self.z_min} / {self.z_max}")
        _check(self.z_min < self.z_max, f"{key}.z_min",
               f"must be below z_max, got z_min {self.z_min} / z_max {self.z_max}")


@dataclass(frozen=True)
class JointStateInput:
    """The arm's own joint positions and velocities (sensor_msgs/JointState), in model.action.names order.

    Messages are matched by name: a driver may list more joints (a gripper's fingers) or order them
    otherwise; a message that lacks one of the configured joints, or its velocity, is refused.
    """

    topic: str = "joint_states"
    max_age: float = 0.05         # s; joint_state_broadcaster publishes at 50-1000 Hz
    qos: Literal["reliable", "best_effort"] = "best_effort"
    depth: int = 100

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class InputsConfig:
    """Where each sensor comes from, and how old its newest data may be before it is masked."""

    camera: CameraInput = field(default_factory=CameraInput)
    audio: AudioInput = field(default_factory=AudioInput)
    imu: ImuInput = field(default_factory=ImuInput)
    lidar: LidarInput = field(default_factory=LidarInput)
    joint_state: JointStateInput = field(default_factory=JointStateInput)
    # Modalities without which the action is not trusted: the watchdog holds the output while any is stale.
    # A velocity command computed without knowing where the joints are is not trusted either.
    required: tuple[str, ...] = ("camera", "imu", "lidar", "joint_state")
    buffer_s: float = 2.0         # s of history kept per modality (bounded memory)
    max_future_s: float = 0.5     # s; stamps further ahead of the clock are dropped as bad
    camera_cache: int = 4         # decoded+resized frames kept, so a frame used by 3 ticks is decoded once

    def validate(self, key: str, audio_window_s: float, imu_window_s: float) -> None:
        for name in MODALITIES:
            getattr(self, name).validate(f"{key}.{name}")
        for i, name in enumerate(self.required):
            _check(name in MODALITIES, f"{key}.required[{i}]", f"must be one of {list(MODALITIES)}, got {name!r}")
        _check(len(set(self.required)) == len(self.required), f"{key}.required",
               f"lists a modality twice: {list(self.required)}")
        longest = max(audio_window_s, imu_window_s)
        _check(self.buffer_s > longest, f"{key}.buffer_s",
               f"must exceed the longest model window ({longest} s), got {self.buffer_s}")
        _check(self.max_future_s > 0, f"{key}.max_future_s", f"must be positive, got {self.max_future_s}")
        _check(1 <= self.camera_cache <= 64, f"{key}.camera_cache", f"must be in [1, 64], got {self.camera_cache}")


@dataclass(frozen=True)
class SafetyConfig:
    """What stands between the network and the arm, in the units the arm is commanded in.

    ``lower``, ``upper`` and ``max_acceleration`` take one value for all DOF or one per DOF.
    """

    # The command's limits per DOF (rad/s for velocity control). Not model.action.lower/upper, the
    # network's output range: a tighter limit here changes what the arm gets, not the model, so a
    # checkpoint still loads.
    lower: tuple[float, ...] = (-1.0,)
    upper: tuple[float, ...] = (1.0,)
    # Largest rate of change of each command value, in action units per second (rad/s^2 for velocity
    # control): a tick may change the command by this times the time elapsed since the previous tick,
    # so the arm's acceleration does not depend on control_rate_hz. 5.0 = 0.05 per tick at 100 Hz.
    max_acceleration: tuple[float, ...] = (5.0,)
    on_stale: Literal["zero", "hold_last"] = "zero"   # watchdog output while a required input is stale
    # s; hold_last keeps a velocity command going while it cannot be checked: at most this long, then rest.
    hold_timeout_s: float = 0.5
    start_enabled: bool = False   # disabled = dry run: computed and previewed, not commanded

    def validate(self, key: str, names: tuple[str, ...]) -> None:
        dof = len(names)
        for name in ("lower", "upper", "max_acceleration"):
            values = getattr(self, name)
            _check(len(values) in (1, dof), f"{key}.{name}",
                   f"needs one value or one per DOF ({dof}), got {len(values)}")
            _check(all(math.isfinite(v) for v in values), f"{key}.{name}",
                   f"values must be finite, got {list(values)}")
        _check(all(v > 0 for v in self.max_acceleration), f"{key}.max_acceleration",
               f"values must be positive (action units per second), got {list(self.max_acceleration)}")
        for i, (lo, hi) in enumerate(zip(self.per_dof("lower", dof), self.per_dof("upper", dof))):
            _check(lo < hi, f"{key}.lower", f"lower {lo} must be below upper {hi} for {names[i]} (DOF {i})")
        _check(math.isfinite(self.hold_timeout_s) and self.hold_timeout_s > 0, f"{key}.hold_timeout_s",
               f"must be positive seconds, got {self.hold_timeout_s}")

    def per_dof(self, name: str, dof: int) -> tuple[float, ...]:
        """``lower``, ``upper`` or ``max_acceleration`` with one value per DOF."""
        values = getattr(self, name)
        return values * dof if len(values) == 1 else values


@dataclass(frozen=True)
class OutputsConfig:
    action_topic: str = "mm_fusion/action"                 # std_msgs/Float64MultiArray (forward_command_controller)
    joint_command_topic: str = "mm_fusion/joint_command"   # sensor_msgs/JointState
    fused_state_topic: str = "mm_fusion/fused_state"       # std_msgs/Float32MultiArray
    preview_topic: str = "mm_fusion/preview"               # the action while disabled (dry run)
    estop_topic: str = "mm_fusion/estop"                   # std_msgs/Bool; true latches zero output
    enable_service: str = "mm_fusion/enable"               # std_srvs/SetBool
    # std_srvs/Trigger: forget the recurrent state, the input buffers and the rate limiter from the next tick
    # (a new task or episode starts: what a policy's reset() is in a learning framework).
    reset_service: str = "mm_fusion/reset"
    # MoveIt Servo: the first six DOF as a TwistStamped (linear xyz, angular xyz) and the 7th as a gripper value.
    twist_enabled: bool = False
    twist_topic: str = "servo_node/delta_twist_cmds"
    twist_frame_id: str = "base_link"
    gripper_topic: str = "mm_fusion/gripper"
    diagnostics_period_s: float = 1.0
    log_period_s: float = 5.0

    def validate(self, key: str) -> None:
        for name in ("action_topic", "joint_command_topic", "fused_state_topic", "preview_topic", "estop_topic",
                     "enable_service", "reset_service", "twist_topic", "gripper_topic"):
            value = getattr(self, name)
            check_topic_name(value, f"{key}.{name}")
        _check(self.diagnostics_period_s > 0, f"{key}.diagnostics_period_s",
               f"must be positive, got {self.diagnostics_period_s}")
        _check(self.log_period_s > 0, f"{key}.log_period_s", f"must be positive, got {self.log_period_s}")


@dataclass(frozen=True)
class RobotConfig:
    """The fusion node's whole parameter set (``fusion_node.ros__parameters``)."""

    control_rate_hz: float = 100.0
    # A checkpoint written by ``mm_fusion_ros.model.save_checkpoint``; empty means freshly
    # initialised weights from ``seed`` (useful for plumbing tests, never for a real arm).
    checkpoint: str = ""
    seed: int = 0
    # The ROS 2 distribution whose message definitions bags are read and written with (rosbags type store).
    ros_distro: Literal["humble", "iron", "jazzy", "kilted"] = "kilted"
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    use_sim_time: bool = False
    # Lifecycle: configure and activate at start (a plain `ros2 run` ticks); false waits for a lifecycle
    # manager or `ros2 lifecycle set`.
    autostart: bool = True

    def absolute(self, namespace: str = "/", node: str = NODE_NAME) -> "RobotConfig":
        """This config with every topic name resolved as a node ``node`` in ``namespace`` would (what bags,
        which hold absolute names, and other ROS-free tools compare against)."""
        def resolved(section: Any, names: tuple[str, ...]) -> Any:
            return dataclasses.replace(section, **{n: resolve_name(getattr(section, n), namespace, node)
                                                   for n in names})
        inputs = dataclasses.replace(
            self.inputs, camera=resolved(self.inputs.camera, ("topic",)),
            audio=resolved(self.inputs.audio, ("topic", "info_topic")), imu=resolved(self.inputs.imu, ("topic",)),
            lidar=resolved(self.inputs.lidar, ("topic",)), joint_state=resolved(self.inputs.joint_state, ("topic",)))
        names = tuple(f.name for f in dataclasses.fields(self.outputs)
                      if f.name.endswith(("_topic", "_service")))
        return dataclasses.replace(self, inputs=inputs, outputs=resolved(self.outputs, names))

    def validate(self) -> None:
        _check(math.isfinite(self.control_rate_hz) and 0 < self.control_rate_hz <= 2000, "control_rate_hz",
               f"must be in (0, 2000] Hz, got {self.control_rate_hz}")
        self.model.validate("model")
        self.engine.validate("engine")
        self.inputs.validate("inputs", self.model.audio.window_s, self.model.imu.window_s)
        self.safety.validate("safety", self.model.action.names)
        self.outputs.validate("outputs")


# ---------------------------------------------------------------- building from dicts

# Keys that no longer exist, and what to write instead: an old file is refused with the way out,
# not only with "unknown key". A per-tick value silently read as per second would be 100x off.
REPLACED_KEYS = {
    "safety.max_delta": "no longer supported: use safety.max_acceleration, in action units per second "
                        "(not per tick): max_delta * control_rate_hz, e.g. 0.05 per tick at 100 Hz = 5.0",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        _check(value in allowed, key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {type(value).__name__}")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected a bool, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an int, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        # No parameter here has a meaning for inf or NaN (YAML's .inf / .nan).
        _check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if isinstance(tp, types.UnionType):  # pragma: no cover - no optional fields yet
        raise ConfigError(f"{key}: unsupported type {tp}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict, key: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    for name in unknown:
        dotted = f"{key}.{name}" if key else name
        if dotted in REPLACED_KEYS:
            raise ConfigError(f"{dotted}: {REPLACED_KEYS[dotted]}")
    if unknown:
        where = key or "top level"
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {name: _coerce(value, hints[name], f"{key}.{name}" if key else name) for name, value in data.items()}
    return cls(**kwargs)


def config_from_dict(params: dict) -> RobotConfig:
    """Build and validate a RobotConfig from the ``ros__parameters`` mapping."""
    cfg = _build(RobotConfig, params or {}, "")
    cfg.validate()
    return cfg


def read_node_parameters(path: str | Path, node: str = NODE_NAME) -> dict:
    """The ``<node>: ros__parameters:`` mapping of a ROS 2 parameters file (ConfigError naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or node not in doc:
        raise ConfigError(f"{path}: expected a ROS 2 parameters file with a top-level '{node}' key")
    block = doc[node]
    if not isinstance(block, dict) or not isinstance(block.get("ros__parameters"), dict):
        raise ConfigError(f"{path}: '{node}' must contain 'ros__parameters'")
    return dict(block["ros__parameters"])


def launch_parameters(path: str | Path, node: str) -> dict:
    """A node's ``ros__parameters`` from a parameters file, flattened to dotted names (what the launch files
    hand each node, so that its block matches under any namespace); {} when the file has no such block."""
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    out: dict = {}

    def walk(value: dict, prefix: str) -> None:
        for key, item in value.items():
            if isinstance(item, dict):
                walk(item, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = item

    walk((doc.get(node) or {}).get("ros__parameters") or {}, "")
    return out


def load_config(path: str | Path) -> RobotConfig:
    """Load ``fusion_node.ros__parameters`` from a ROS 2 parameters YAML file."""
    params = read_node_parameters(path)
    try:
        return config_from_dict(params)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (lists, not tuples) suitable for YAML, JSON and checkpoints."""
    def convert(v: Any) -> Any:
        if isinstance(v, tuple):
            return [convert(x) for x in v]
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        return v
    return convert(dataclasses.asdict(cfg))


def model_config_from_dict(data: dict) -> ModelConfig:
    cfg = _build(ModelConfig, data, "model")
    cfg.validate("model")
    return cfg
