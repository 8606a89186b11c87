"""TensorRT: a plan built once from model.onnx, cached, and loaded at start.

Building is a separate step (``mm-fusion build-engine``): a robot must never
spend its first control tick in the TensorRT builder. The plan is stored next
to a small JSON key (ONNX SHA-256, TensorRT version, GPU name, precision) and
is rebuilt only when that key changes; loading a plan whose key does not match
the current ONNX file, TensorRT and GPU is refused with a message saying how to
rebuild.

In fp16 the layers that compute the recurrent state from ``state`` and ``dt``
are pinned to fp32: dt is ~1e-2 s at 100 Hz and small dt terms vanish in fp16,
and rounding errors fed back every tick accumulate in the state.

Device buffers come from torch's CUDA allocator, so no pycuda is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..files import write_json_atomic
from ..model import TensorSpec
from .base import Engine
from .export import file_sha256

FP32_INPUTS = ("state", "dt")
FP32_OUTPUTS = ("new_state",)


class StaleEngineError(RuntimeError):
    """The cached plan is missing or was built for another model, TensorRT, GPU or precision."""


def tensorrt_available() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    import torch
    return torch.cuda.is_available()


def plan_paths(artifact_dir: str | Path, precision: str) -> tuple[Path, Path]:
    base = Path(artifact_dir) / f"model.{precision}"
    return base.with_suffix(".plan"), base.with_suffix(".json")


def cache_key(onnx_path: str | Path, precision: str) -> dict:
    import tensorrt as trt
    import torch

    return {"onnx_sha256": file_sha256(onnx_path), "tensorrt_version": trt.__version__,
            "gpu": torch.cuda.get_device_name(0), "precision": precision}


def _fp32_layers(network) -> list:
    """Layers on a path from the state/dt inputs to the new_state output."""
    producers: dict[str, object] = {}
    consumers: dict[str, list] = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            producers[layer.get_output(j).name] = layer
        for j in range(layer.num_inputs):
            t = layer.get_input(j)
            if t is not None:
                consumers.setdefault(t.name, []).append(layer)

    def walk(starts, step):
        seen, stack = set(), list(starts)
        while stack:
            layer = stack.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            stack.extend(step(layer))
        return seen

    def downstream(layer):
        return [c for j in range(layer.num_outputs) for c in consumers.get(layer.get_output(j).name, [])]

    def upstream(layer):
        return [producers[t.name] for j in range(layer.num_inputs)
                if (t := layer.get_input(j)) is not None and t.name in producers]

    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    outputs = [network.get_output(i).name for i in range(network.num_outputs)]
    from_state = walk([c for name in inputs if name in FP32_INPUTS for c in consumers.get(name, [])], downstream)
    to_state = walk([producers[name] for name in outputs if name in FP32_OUTPUTS], upstream)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [layer for layer in layers if id(layer) in from_state and id(layer) in to_state]


def build_plan(onnx_path: str | Path, artifact_dir: str | Path, precision: str = "fp32",
               force: bool = False, workspace_mb: int = 1024, log=print) -> Path:
    """Build (or reuse) the plan for ``onnx_path``; returns the plan path."""
    import tensorrt as trt

    plan_path, key_path = plan_paths(artifact_dir, precision)
    key = cache_key(onnx_path, precision)
    if not force and plan_path.is_file() and key_path.is_file():
        if json.loads(key_path.read_text()) == key:
            log(f"TensorRT plan {plan_path} is up to date ({key['gpu']}, TensorRT {key['tensorrt_version']})")
            return plan_path
    log(f"building TensorRT {precision} plan from {onnx_path} on {key['gpu']} (this takes a while)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _fp32_layers(network)
        for layer in pinned:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output_type(j) in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
        log(f"fp16 plan: {len(pinned)} recurrent-state layers pinned to fp32")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    os.replace(tmp, plan_path)
    write_json_atomic(key_path, key)
    log(f"wrote {plan_path}")
    return plan_path


class TensorRTEngine(Engine):
    name = "tensorrt"

    def __init__(self, onnx_path: str | Path, artifact_dir: str | Path, input_specs: tuple[TensorSpec, ...],
                 output_specs: tuple[TensorSpec, ...], precision: str = "fp32"):
        import tensorrt as trt
        import torch

        super().__init__(input_specs, output_specs)
        plan_path, key_path = plan_paths(artifact_dir, precision)
        if not plan_path.is_file() or not key_path.is_file():
            raise StaleEngineError(f"no TensorRT plan at {plan_path}; build it first with "
                                   f"`mm-fusion build-engine --config <robot.yaml>`")
        stored, current = json.loads(key_path.read_text()), cache_key(onnx_path, precision)
        if stored != current:
            changed = [k for k in current if stored.get(k) != current[k]]
            raise StaleEngineError(f"TensorRT plan {plan_path} was built for another {', '.join(changed)} "
                                   f"({ {k: stored.get(k) for k in changed} } vs { {k: current[k] for k in changed} }); "
                                   f"rebuild with `mm-fusion build-engine`")
        self.precision = precision
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise StaleEngineError(f"TensorRT could not deserialize {plan_path}; rebuild with `mm-fusion build-engine`")
        self.context = self.engine.create_execution_context()
        self._check_bindings(trt)
        self.stream = torch.cuda.Stream()
        self.buffers = {}
        for spec in input_specs + output_specs:
            dtype = getattr(torch, spec.dtype)
            self.buffers[spec.name] = torch.empty(spec.shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(spec.name, self.buffers[spec.name].data_ptr())

    def _bindings(self, trt) -> dict[str, tuple[str, tuple[int, ...], str]]:
        out = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            mode = "input" if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output"
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name))).name
            out[name] = (mode, shape, dtype)
        return out

    def _check_bindings(self, trt) -> None:
        real = self._bindings(trt)
        wanted = {s.name: ("input", s.shape, s.dtype) for s in self.input_specs}
        wanted.update({s.name: ("output", s.shape, s.dtype) for s in self.output_specs})
        if real != wanted:
            listing = ", ".join(f"{m} {n}{list(s)}:{d}" for n, (m, s, d) in real.items())
            raise StaleEngineError(f"TensorRT plan bindings do not match the config. The engine has: {listing}. "
                                   "Re-export and rebuild with `mm-fusion export` and `mm-fusion build-engine`.")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.cuda.stream(self.stream):
            for spec in self.input_specs:
                self.buffers[spec.name].copy_(torch.from_numpy(inputs[spec.name]), non_blocking=False)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execution failed")
            outputs = {s.name: self.buffers[s.name].cpu().numpy() for s in self.output_specs}
        self.stream.synchronize()
        return outputs

    def describe(self) -> str:
        import tensorrt as trt
        import torch
        return f"TensorRT {trt.__version__} {self.precision} on {torch.cuda.get_device_name(0)}"
