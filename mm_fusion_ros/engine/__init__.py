"""Inference backends behind one interface, and the choice between them.

``auto`` takes TensorRT when it is importable and a GPU exists, else the
torch-compiled engine on CUDA, else ONNX Runtime on the CPU. ``remote`` steps on a
policy server (``mm-fusion serve``) over ZeroMQ; it is only ever chosen by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..config import RobotConfig, config_to_dict
from ..model import FusionNet, input_specs, output_specs
from .base import Engine, InputError, check_inputs
from .export import export_onnx, onnx_name

BACKENDS = ("torch", "onnxruntime", "tensorrt", "compiled", "remote")   # "auto" never picks remote

__all__ = ["BACKENDS", "Engine", "InputError", "check_inputs", "create_engine", "ensure_onnx",
           "model_fingerprint", "onnxruntime_device", "resolve_backend"]


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; allowed: auto, {', '.join(BACKENDS)}")
        return requested
    from .tensorrt_engine import tensorrt_available
    if tensorrt_available():
        return "tensorrt"
    if torch.cuda.is_available():
        return "compiled"
    return "onnxruntime"


def model_fingerprint(model: FusionNet) -> str:
    """SHA-256 of the model's code, config and weights: says whether model.onnx is still this model."""
    h = hashlib.sha256(json.dumps(config_to_dict(model.cfg), sort_keys=True).encode())
    for source in sorted((Path(__file__).resolve().parents[1] / "model").glob("*.py")):
        h.update(source.read_bytes())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ensure_onnx(model: FusionNet, artifact_dir: str | Path, log: Callable[[str], None] = print,
                batch: int = 1) -> Path:
    """Return artifact_dir/model.onnx (``onnx_name(batch)``), exporting it again only if it is missing or stale."""
    artifact_dir = Path(artifact_dir)
    onnx_path = artifact_dir / onnx_name(batch)
    meta_path = onnx_path.with_suffix(".json")
    fingerprint = model_fingerprint(model)
    if onnx_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("model_sha256") == fingerprint:
            return onnx_path
    log(f"exporting the streaming step to {onnx_path}")
    export_onnx(model, artifact_dir, extra_meta={"model_sha256": fingerprint}, batch=batch)
    return onnx_path


def onnxruntime_device(log: Callable[[str], None] = print) -> str:
    """"cuda" where torch sees a GPU and onnxruntime has its CUDA provider, else "cpu".

    The stock ``onnxruntime`` wheel has no CUDA provider; on a GPU machine that is a slower
    engine, not a reason for the node not to start, so it runs on the CPU and says so.
    """
    if not torch.cuda.is_available():
        return "cpu"
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" in providers:
        return "cuda"
    log(f"WARNING: a GPU is present but onnxruntime has no CUDAExecutionProvider (providers: "
        f"{', '.join(providers)}; install onnxruntime-gpu for it): running onnxruntime on the CPU")
    return "cpu"


def create_engine(cfg: RobotConfig, model: FusionNet, backend: str | None = None,
                  log: Callable[[str], None] = print, batch: int = 1) -> Engine:
    """Build the engine named by ``backend`` (default: the config's), logging the choice.

    ``batch`` > 1 (K streams stepped at once: ``mm-fusion eval --lockstep``) is ONNX Runtime's only.
    """
    requested = backend or cfg.engine.backend
    name = resolve_backend(requested)
    if batch != 1 and name != "onnxruntime":
        raise ValueError(f"a batch of {batch} streams runs on the onnxruntime backend only, not {name!r}")
    specs_in, specs_out = input_specs(model.cfg, batch), output_specs(model.cfg, batch)
    if name == "torch":
        from .torch_engine import TorchEngine
        engine: Engine = TorchEngine(model, threads=cfg.engine.intra_op_threads)
    elif name == "compiled":
        from .compiled_engine import CompiledEngine
        engine = CompiledEngine(model)
    elif name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine
        onnx_path = ensure_onnx(model, cfg.engine.artifact_path, log, batch)
        engine = OnnxRuntimeEngine(onnx_path, specs_in, specs_out, cfg.engine.intra_op_threads,
                                   onnxruntime_device(log))
    elif name == "remote":
        from .remote_engine import RemoteEngine
        engine = RemoteEngine(cfg.engine.remote, specs_in, specs_out, model_fingerprint(model), log=log)
    else:
        from .tensorrt_engine import TensorRTEngine
        onnx_path = ensure_onnx(model, cfg.engine.artifact_path, log)
        engine = TensorRTEngine(onnx_path, cfg.engine.artifact_path, specs_in, specs_out, cfg.engine.precision)
    log(f"inference backend: {engine.describe()} (requested '{requested}')")
    return engine
