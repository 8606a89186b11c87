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
        # The STFT runs as four quarter-length polyphase convolutions (see LogMelSpectrogram).
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
    strategy: Literal["early", "late", "hybrid", "hierarchical"] = "hybrid"
    heads: int = 4

    def validate(self, key: str, dim: int) -> None:
        _check(self.heads > 0 and dim % self.heads == 0, f"{key}.heads",
               f"must be a positive divisor of model.encoder.hidden={dim}, got {self.heads}")


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


@dataclass(frozen=True)
class RobotConfig:
    """The fusion node's whole parameter set (``fusion_node.ros__parameters``)."""

    control_rate_hz: float = 100.0
    # A checkpoint written by ``mm_fusion_ros.model.save_checkpoint``; empty means freshly
    # initialised weights from ``seed`` (useful for plumbing tests, never for a real arm).
    checkpoint: str = ""
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    use_sim_time: bool = False

    def validate(self) -> None:
        _check(math.isfinite(self.control_rate_hz) and 0 < self.control_rate_hz <= 2000, "control_rate_hz",
               f"must be in (0, 2000] Hz, got {self.control_rate_hz}")
        self.model.validate("model")
        self.engine.validate("engine")


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
