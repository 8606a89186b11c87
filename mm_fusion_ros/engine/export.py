"""Export the streaming step to ONNX: static shapes, batch 1, spike steps unrolled.

Writes ``model.onnx`` and ``model.json`` (input/output specs, the model config,
the ONNX file's SHA-256 that TensorRT plans are keyed on, and versions). Both
are written under temporary names and renamed when complete.

``batch`` > 1 writes ``model_batch<K>.onnx`` (and its ``.json``): the same step
for K independent streams at once, which ``mm-fusion eval --lockstep K`` runs so
that K episodes pay the graph's per-operator cost once (the live node is batch 1).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from ..config import config_to_dict
from ..files import write_json_atomic
from ..model import INPUT_NAMES, OUTPUT_NAMES, FusionNet, input_specs, output_specs

OPSET = 18
FORBIDDEN_OPS = {"Loop", "Scan", "If"}  # the step must be a flat graph for TensorRT and for latency


class ExportError(RuntimeError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_name(batch: int = 1) -> str:
    """The ONNX file's name in the artifact folder: ``model.onnx`` for the live node's batch 1."""
    return "model.onnx" if batch == 1 else f"model_batch{batch}.onnx"


def example_inputs(model: FusionNet, batch: int = 1) -> tuple[torch.Tensor, ...]:
    out = []
    for spec in input_specs(model.cfg, batch):
        out.append(torch.zeros(spec.shape, dtype=getattr(torch, spec.dtype)))
    return tuple(out)


def export_onnx(model: FusionNet, out_dir: str | Path, extra_meta: dict | None = None, batch: int = 1) -> Path:
    """Export ``model`` to ``out_dir/model.onnx`` (+ ``model.json``; ``onnx_name(batch)`` for another batch);
    returns the ONNX path."""
    import onnx

    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / onnx_name(batch)
    # A name of this process's own: eval's workers (or two nodes) may export the same model to one folder
    # at once, and a shared temporary name let one of them check the other's half-written file.
    tmp = out_dir / f"{onnx_path.name}.{os.getpid()}.tmp"
    model = model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, example_inputs(model, batch), dynamo=True, opset_version=OPSET,
                                    input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                    external_data=False, verbose=False)
    program.save(str(tmp))
    proto = onnx.load(str(tmp))
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    if ops & FORBIDDEN_OPS:
        tmp.unlink()
        raise ExportError(f"exported graph contains control flow {sorted(ops & FORBIDDEN_OPS)}; "
                          "the streaming step must be unrolled")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if names_in != list(INPUT_NAMES) or names_out != list(OUTPUT_NAMES):
        tmp.unlink()
        raise ExportError(f"exported graph has inputs {names_in} and outputs {names_out}; "
                          f"expected {list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}")
    os.replace(tmp, onnx_path)
    meta = {
        "format": "mm_fusion_ros.onnx/1",
        "onnx_sha256": file_sha256(onnx_path),
        "opset": OPSET,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "nodes": len(proto.graph.node),
        "batch": batch,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in input_specs(model.cfg, batch)],
        "outputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in output_specs(model.cfg, batch)],
        "model_config": config_to_dict(model.cfg),
        **(extra_meta or {}),
    }
    write_json_atomic(onnx_path.with_suffix(".json"), meta)
    return onnx_path

