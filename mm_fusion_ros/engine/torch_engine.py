"""Torch eager: the reference every other backend is compared against."""

from __future__ import annotations

import numpy as np
import torch

from ..model import INPUT_NAMES, OUTPUT_NAMES, FusionNet, input_specs, output_specs
from .base import Engine


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, model: FusionNet, device: str = "cpu", threads: int = 0):
        super().__init__(input_specs(model.cfg), output_specs(model.cfg))
        # Torch's intra-op pool is process-wide. On a small robot computer an unbounded pool
        # fights the sensor callbacks for the cores (a 2 ms step became 30-70 ms here).
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = [torch.from_numpy(inputs[name]).to(self.device) for name in INPUT_NAMES]
            outputs = self.model(*args)
        return {name: out.float().cpu().numpy() for name, out in zip(OUTPUT_NAMES, outputs)}

    def describe(self) -> str:
        return f"torch eager on {self.device} ({torch.get_num_threads()} threads)"
