"""Stepping an engine through time: the recurrent state, and sensor data hygiene.

``FusionStream`` owns the recurrent state between ticks (engines are
stateless), and it is where NaN/Inf in sensor data is stopped: a camera frame
cannot hold NaN (uint8), audio or IMU windows with non-finite samples are
zeroed and that modality is masked for the tick, and the event is counted.
LiDAR is different: inf/NaN are normal "no return" beams, masked per beam
inside the model. Live node, bag replay and the demo all step through here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..config import MODALITIES, ModelConfig
from .base import Engine, InputError

# Modalities whose windows must be finite; a non-finite value masks the modality for the tick.
_MUST_BE_FINITE = {"audio": 1, "imu": 2}


@dataclass(frozen=True)
class StepResult:
    action: np.ndarray        # (dof,)
    fused_state: np.ndarray   # (fused_state_dim,)
    attention: np.ndarray     # (M, M)
    contribution: np.ndarray  # (M,)
    mask: np.ndarray          # (M,) the mask the model actually used


class FusionStream:
    def __init__(self, engine: Engine, cfg: ModelConfig):
        self.engine = engine
        self.cfg = cfg
        self.counters: Counter[str] = Counter()
        self.state = np.zeros((1, len(MODALITIES), cfg.encoder.hidden), dtype=np.float32)

    def reset(self) -> None:
        """Forget the recurrent state (a clock jump backwards, a restarted bag)."""
        self.state[:] = 0.0
        self.counters["state_resets"] += 1

    def step(self, camera: np.ndarray, audio: np.ndarray, imu: np.ndarray, lidar: np.ndarray,
             mask: np.ndarray, dt: float) -> StepResult:
        """One tick. Arrays are unbatched: camera (H, W, 3) uint8, audio (N,), imu (T, 6), lidar (beams,)."""
        if not np.isfinite(dt) or dt <= 0.0:
            raise InputError(f"dt must be a positive finite number of seconds, got {dt}")
        mask = np.asarray(mask, dtype=np.float32).reshape(1, len(MODALITIES)).copy()
        windows = {"audio": audio, "imu": imu}
        for name, index in _MUST_BE_FINITE.items():
            window = windows[name]
            if window.dtype.kind == "f" and not np.isfinite(window).all():
                windows[name] = np.where(np.isfinite(window), window, 0.0).astype(window.dtype)
                mask[0, index] = 0.0
                self.counters[f"nonfinite_{name}"] += 1
        inputs = {
            "camera": camera[None], "audio": windows["audio"][None], "imu": windows["imu"][None],
            "lidar": lidar[None], "mask": mask, "dt": np.array([[dt]], dtype=np.float32), "state": self.state,
        }
        out = self.engine.step(inputs)
        if np.isfinite(out["new_state"]).all():
            self.state = np.ascontiguousarray(out["new_state"], dtype=np.float32)
        else:  # never feed a poisoned state back; start clean instead
            self.counters["nonfinite_state"] += 1
            self.reset()
        self.counters["ticks"] += 1
        return StepResult(out["action"][0], out["fused_state"][0], out["attention"][0],
                          out["contribution"][0], mask[0])
