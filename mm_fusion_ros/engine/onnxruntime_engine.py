"""ONNX Runtime: the CPU default, and CUDA when onnxruntime-gpu finds a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model import TensorSpec
from .base import Engine

_ORT_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(float16)": "float16"}


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, input_specs: tuple[TensorSpec, ...],
                 output_specs: tuple[TensorSpec, ...], threads: int = 1, device: str = "cpu"):
        import onnxruntime as ort

        super().__init__(input_specs, output_specs)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers)
        self.threads = threads
        self._check_signature()
        self._output_names = [s.name for s in output_specs]

    def _check_signature(self) -> None:
        # The ONNX file on disk may come from another config; name the real signature if so.
        real = {i.name: (tuple(i.shape), _ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()}
        real.update({o.name: (tuple(o.shape), _ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()})
        for spec in self.input_specs + self.output_specs:
            if real.get(spec.name) != (spec.shape, spec.dtype):
                listing = ", ".join(f"{n}{list(s)}:{t}" for n, (s, t) in real.items())
                raise RuntimeError(f"ONNX model does not match the config: expected {spec.describe()}; "
                                   f"the model has {listing}. Re-export with `mm-fusion export`.")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self._output_names, inputs)
        return dict(zip(self._output_names, outputs))

    def describe(self) -> str:
        return f"onnxruntime {self.session.get_providers()[0]} ({self.threads} intra-op threads)"
