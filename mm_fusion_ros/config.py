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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

NODE_NAME = "fusion_node"
MODALITIES = ("camera", "audio", "imu", "lidar")


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

    def validate(self, key: str) -> None:
        _check(8 <= self.height <= 4096, f"{key}.height", f"must be in [8, 4096], got {self.height}")
        _check(8 <= self.width <= 4096, f"{key}.width", f"must be in [8, 4096], got {self.width}")
        _check_channels(self.channels, f"{key}.channels")


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

    def validate(self, key: str, dim: int) -> None:
        _check(self.heads > 0 and dim % self.heads == 0, f"{key}.heads",
               f"must be a positive divisor of model.encoder.hidden={dim}, got {self.heads}")
        _check(1 <= self.rank <= 64, f"{key}.rank", f"must be in [1, 64], got {self.rank}")


DEFAULT_JOINTS = tuple(f"joint_{i}" for i in range(1, 8))


@dataclass(frozen=True)
class ActionConfig:
    """The 7-DOF action: joint names and the per-DOF range the head is scaled into."""

    names: tuple[str, ...] = DEFAULT_JOINTS
    lower: tuple[float, ...] = (-1.0,) * 7
    upper: tuple[float, ...] = (1.0,) * 7

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

    def validate(self, key: str) -> None:
        for name in ("camera", "audio", "imu", "lidar", "encoder", "action"):
            getattr(self, name).validate(f"{key}.{name}")
        self.fusion.validate(f"{key}.fusion", self.encoder.hidden)
        _check(self.fused_state_dim > 0, f"{key}.fused_state_dim", f"must be positive, got {self.fused_state_dim}")


@dataclass(frozen=True)
class EngineConfig:
    """Which compiled engine runs the streaming step, and where its artefacts live."""

    backend: Literal["auto", "torch", "onnxruntime", "tensorrt", "compiled"] = "auto"
    precision: Literal["fp32", "fp16"] = "fp32"
    # Where model.onnx, TensorRT plans and their cache keys are kept; relative to the working directory.
    artifact_dir: str = "artifacts"
    # Rebuild a cached TensorRT plan even when its key still matches.
    force_rebuild: bool = False
    intra_op_threads: int = 1

    def validate(self, key: str) -> None:
        _check(self.artifact_dir != "", f"{key}.artifact_dir", "must not be empty")
        _check(self.intra_op_threads >= 0, f"{key}.intra_op_threads",
               f"must be >= 0 (0 lets the runtime choose), got {self.intra_op_threads}")


# ---------------------------------------------------------------- the live loop (inputs, safety, outputs)

QOS_CHOICES = ("reliable", "best_effort")


def _check_input(key: str, topic: str, max_age: float, depth: int) -> None:
    _check(topic.startswith("/") and " " not in topic, f"{key}.topic",
           f"must be an absolute topic name like '/camera/image_raw', got {topic!r}")
    _check(max_age > 0, f"{key}.max_age", f"must be positive seconds, got {max_age}")
    _check(1 <= depth <= 10000, f"{key}.depth", f"must be in [1, 10000], got {depth}")


@dataclass(frozen=True)
class CameraInput:
    topic: str = "/camera/image_raw"
    type: Literal["image", "compressed_image"] = "image"   # sensor_msgs/Image | sensor_msgs/CompressedImage
    max_age: float = 0.1          # s; a newer frame is expected every 33 ms at 30 Hz
    qos: Literal["reliable", "best_effort"] = "reliable"
    depth: int = 10

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class AudioInput:
    topic: str = "/audio/audio_stamped"
    # audio_common_msgs/AudioDataStamped (+ AudioInfo on info_topic) | audio_common_msgs/AudioStamped |
    # the fallback on standard messages: sensor_msgs/Image, one row of 16SC1/32FC1 PCM (see README).
    type: Literal["audio_data_stamped", "audio_stamped", "image_pcm"] = "audio_data_stamped"
    info_topic: str = "/audio/audio_info"
    # Rate and format of streams whose messages do not carry them (AudioDataStamped before an
    # AudioInfo arrives, and image_pcm).
    source_rate: int = 16000
    source_format: Literal["S16LE", "F32LE"] = "S16LE"
    max_age: float = 0.1
    qos: Literal["reliable", "best_effort"] = "reliable"
    depth: int = 100

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)
        _check(self.info_topic.startswith("/"), f"{key}.info_topic",
               f"must be an absolute topic name, got {self.info_topic!r}")
        _check(1000 <= self.source_rate <= 384000, f"{key}.source_rate",
               f"must be in [1000, 384000] Hz, got {self.source_rate}")


@dataclass(frozen=True)
class ImuInput:
    topic: str = "/imu/data"
    max_age: float = 0.05
    qos: Literal["reliable", "best_effort"] = "reliable"
    depth: int = 200

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class LidarInput:
    topic: str = "/scan"
    type: Literal["laser_scan", "point_cloud2"] = "laser_scan"
    max_age: float = 0.25         # s; scans come at 10 Hz
    qos: Literal["reliable", "best_effort"] = "reliable"
    depth: int = 10

    def validate(self, key: str) -> None:
        _check_input(key, self.topic, self.max_age, self.depth)


@dataclass(frozen=True)
class InputsConfig:
    """Where each sensor comes from, and how old its newest data may be before it is masked."""

    camera: CameraInput = field(default_factory=CameraInput)
    audio: AudioInput = field(default_factory=AudioInput)
    imu: ImuInput = field(default_factory=ImuInput)
    lidar: LidarInput = field(default_factory=LidarInput)
    # Modalities without which the action is not trusted: the watchdog holds the output while any is stale.
    required: tuple[str, ...] = ("camera", "imu", "lidar")
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
    """What stands between the network and the arm."""

    # Largest change of each action value from one tick to the next (like LeRobot's
    # max_relative_target), in the action's units; one value for all DOF or one per DOF.
    max_delta: tuple[float, ...] = (0.05,)
    on_stale: Literal["zero", "hold_last"] = "zero"   # watchdog output while a required input is stale
    start_enabled: bool = False   # disabled = dry run: computed and previewed, not commanded

    def validate(self, key: str, dof: int) -> None:
        _check(len(self.max_delta) in (1, dof), f"{key}.max_delta",
               f"needs one value or one per DOF ({dof}), got {len(self.max_delta)}")
        _check(all(math.isfinite(v) and v > 0 for v in self.max_delta), f"{key}.max_delta",
               f"values must be positive and finite, got {list(self.max_delta)}")

    def max_delta_per_dof(self, dof: int) -> tuple[float, ...]:
        return self.max_delta * dof if len(self.max_delta) == 1 else self.max_delta


@dataclass(frozen=True)
class OutputsConfig:
    action_topic: str = "/mm_fusion/action"                 # std_msgs/Float64MultiArray (forward_command_controller)
    joint_command_topic: str = "/mm_fusion/joint_command"   # sensor_msgs/JointState
    fused_state_topic: str = "/mm_fusion/fused_state"       # std_msgs/Float32MultiArray
    preview_topic: str = "/mm_fusion/preview"               # the action while disabled (dry run)
    estop_topic: str = "/mm_fusion/estop"                   # std_msgs/Bool; true latches zero output
    enable_service: str = "/mm_fusion/enable"               # std_srvs/SetBool
    # MoveIt Servo: the first six DOF as a TwistStamped (linear xyz, angular xyz) and the 7th as a gripper value.
    twist_enabled: bool = False
    twist_topic: str = "/servo_node/delta_twist_cmds"
    twist_frame_id: str = "base_link"
    gripper_topic: str = "/mm_fusion/gripper"
    diagnostics_period_s: float = 1.0
    log_period_s: float = 5.0

    def validate(self, key: str) -> None:
        for name in ("action_topic", "joint_command_topic", "fused_state_topic", "preview_topic", "estop_topic",
                     "enable_service", "twist_topic", "gripper_topic"):
            value = getattr(self, name)
            _check(value.startswith("/") and " " not in value, f"{key}.{name}",
                   f"must be an absolute name like '/mm_fusion/action', got {value!r}")
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

    def validate(self) -> None:
        _check(math.isfinite(self.control_rate_hz) and 0 < self.control_rate_hz <= 2000, "control_rate_hz",
               f"must be in (0, 2000] Hz, got {self.control_rate_hz}")
        self.model.validate("model")
        self.engine.validate("engine")
        self.inputs.validate("inputs", self.model.audio.window_s, self.model.imu.window_s)
        self.safety.validate("safety", self.model.action.dof)
        self.outputs.validate("outputs")


# ---------------------------------------------------------------- building from dicts

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


def load_config(path: str | Path) -> RobotConfig:
    """Load ``fusion_node.ros__parameters`` from a ROS 2 parameters YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict) or NODE_NAME not in doc:
        raise ConfigError(f"{path}: expected a ROS 2 parameters file with a top-level '{NODE_NAME}' key")
    node = doc[NODE_NAME]
    if not isinstance(node, dict) or "ros__parameters" not in node:
        raise ConfigError(f"{path}: '{NODE_NAME}' must contain 'ros__parameters'")
    try:
        return config_from_dict(node["ros__parameters"])
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
