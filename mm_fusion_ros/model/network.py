"""The whole fusion network as one streaming step.

``FusionNet.forward`` is a pure function of tensors::

    (camera, audio, imu, lidar, mask, dt, state, audio_frames)
        -> (action, fused_state, new_state, attention, contribution, new_audio_frames)

The state between ticks is explicit input and output: ``state`` is one CfC
hidden vector per modality, ``audio_frames`` the log-mel frames of the audio
window (a cache of arithmetic, see ``AudioEncoder``: the step computes only the
newest frames). Nothing is kept in module buffers between calls, so an
exported ONNX/TensorRT engine is stateless and the runtime owns the state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import MODALITIES, ActionConfig, ModelConfig, config_to_dict, model_config_from_dict
from .fusion import make_fusion
from .liquid import CfCCells
from .preprocess import AudioEncoder, CameraEncoder, ImuEncoder, LidarEncoder
from .spiking import LeakyIntegrateFire

INPUT_NAMES = ("camera", "audio", "imu", "lidar", "mask", "dt", "state", "audio_frames")
OUTPUT_NAMES = ("action", "fused_state", "new_state", "attention", "contribution", "new_audio_frames")
CHECKPOINT_FORMAT = "mm_fusion_ros.checkpoint/1"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def describe(self) -> str:
        return f"{self.name}{list(self.shape)}:{self.dtype}"


def input_specs(cfg: ModelConfig, batch: int = 1) -> tuple[TensorSpec, ...]:
    m = len(MODALITIES)
    return (
        TensorSpec("camera", (batch, cfg.camera.height, cfg.camera.width, 3), "uint8"),
        TensorSpec("audio", (batch, cfg.audio.window_samples), "float32"),
        TensorSpec("imu", (batch, cfg.imu.window_samples, 6), "float32"),
        TensorSpec("lidar", (batch, cfg.lidar.beams), "float32"),
        TensorSpec("mask", (batch, m), "float32"),
        TensorSpec("dt", (batch, 1), "float32"),
        TensorSpec("state", (batch, m, cfg.encoder.hidden), "float32"),
        TensorSpec("audio_frames", (batch, cfg.audio.n_mels, cfg.audio.n_frames), "float32"),
    )


def output_specs(cfg: ModelConfig, batch: int = 1) -> tuple[TensorSpec, ...]:
    m = len(MODALITIES)
    return (
        TensorSpec("action", (batch, cfg.action.dof), "float32"),
        TensorSpec("fused_state", (batch, cfg.fused_state_dim), "float32"),
        TensorSpec("new_state", (batch, m, cfg.encoder.hidden), "float32"),
        TensorSpec("attention", (batch, m, m), "float32"),
        TensorSpec("contribution", (batch, m), "float32"),
        TensorSpec("new_audio_frames", (batch, cfg.audio.n_mels, cfg.audio.n_frames), "float32"),
    )


class ActionHead(nn.Module):
    """Fused vector -> 7 values squashed into the configured per-DOF [lower, upper]."""

    def __init__(self, dim: int, cfg: ActionConfig):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, cfg.dof))
        lower = torch.tensor(cfg.lower, dtype=torch.float32).unsqueeze(0)
        upper = torch.tensor(cfg.upper, dtype=torch.float32).unsqueeze(0)
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("span", upper - lower, persistent=False)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.lower + self.span * (0.5 * (torch.tanh(self.mlp(fused)) + 1.0))


class FusionNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder.hidden
        enc = cfg.encoder
        self.camera = CameraEncoder(cfg.camera, dim)
        self.audio = AudioEncoder(cfg.audio, dim)
        self.imu = ImuEncoder(cfg.imu, dim)
        self.lidar = LidarEncoder(cfg.lidar, dim)
        self.lif = LeakyIntegrateFire(enc.beta, enc.threshold, enc.num_spike_steps)
        self.cells = CfCCells(len(MODALITIES), dim, dim, enc.cfc_mode, enc.backbone_units, enc.backbone_layers)
        self.fusion = make_fusion(cfg.fusion.strategy, dim, len(MODALITIES), cfg.fusion.heads,
                                  cfg.fusion.rank)
        self.action_head = ActionHead(dim, cfg.action)
        self.state_head = nn.Linear(dim, cfg.fused_state_dim)

    def initial_state(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, len(MODALITIES), self.cfg.encoder.hidden)

    def forward(self, camera, audio, imu, lidar, mask, dt, state, audio_frames):
        audio_token, frames = self.audio(audio, audio_frames)
        currents = torch.stack([self.camera(camera), audio_token, self.imu(imu), self.lidar(lidar)], dim=1)
        rates = self.lif(currents)  # all four modalities' LIF layers at once
        updated = self.cells(rates, state, dt)
        # A masked modality keeps its previous state: stale or missing data must not
        # drive the recurrent memory, and the cell resumes where it was when data returns.
        new_state = torch.where(mask.unsqueeze(-1) > 0.5, updated, state)
        fused, attention, contribution = self.fusion(new_state, mask)
        return self.action_head(fused), self.state_head(fused), new_state, attention, contribution, frames


def build_model(cfg: ModelConfig, seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet(cfg).eval()


def save_checkpoint(model: FusionNet, path: str | Path) -> None:
    """Weights plus the ModelConfig that made them, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": config_to_dict(model.cfg),
                "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> FusionNet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a torch file at all
        raise ValueError(f"{path}: not an mm_fusion_ros checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an mm_fusion_ros checkpoint (expected format {CHECKPOINT_FORMAT})")
    model = FusionNet(model_config_from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def config_mismatch(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Dotted keys whose values differ between two model configs."""
    out: list[str] = []

    def walk(x, y, key):
        if isinstance(x, dict):
            for k in x:
                walk(x[k], y.get(k), f"{key}.{k}")
        elif x != y:
            out.append(f"{key}: {x!r} != {y!r}")
    walk(config_to_dict(a), config_to_dict(b), "model")
    return out
