"""Engines: ONNX export, input checks, and parity of every available backend with torch eager."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from conftest import with_strategy

from mm_fusion_ros.config import MODALITIES
from mm_fusion_ros.engine import InputError, create_engine, ensure_onnx, resolve_backend
from mm_fusion_ros.engine.base import Engine
from mm_fusion_ros.engine.export import FORBIDDEN_OPS, file_sha256
from mm_fusion_ros.engine.onnxruntime_engine import OnnxRuntimeEngine
from mm_fusion_ros.engine.stream import FusionStream
from mm_fusion_ros.engine.torch_engine import TorchEngine
from mm_fusion_ros.model import INPUT_NAMES, OUTPUT_NAMES, build_model, input_specs, output_specs
from mm_fusion_ros.synthetic import SyntheticSensors

PARITY_TOL = 1e-4
PARITY_TICKS = 200


@pytest.fixture(scope="module")
def robot(default_config, tmp_path_factory):
    art = tmp_path_factory.mktemp("artifacts")
    cfg = dataclasses.replace(default_config, engine=dataclasses.replace(default_config.engine, artifact_dir=str(art)))
    model = build_model(cfg.model, seed=3)
    return cfg, model


@pytest.fixture(scope="module")
def onnx_path(robot):
    cfg, model = robot
    return ensure_onnx(model, cfg.engine.artifact_dir, log=lambda _: None)


def test_export_is_a_flat_static_graph_with_metadata(robot, onnx_path):
    cfg, model = robot
    proto = onnx.load(str(onnx_path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & FORBIDDEN_OPS, f"control flow in the step: {ops & FORBIDDEN_OPS}"
    graph_inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    for spec in input_specs(cfg.model):
        assert graph_inputs[spec.name] == list(spec.shape)  # static: every dim a number
    assert [o.name for o in proto.graph.output] == list(OUTPUT_NAMES)
    meta = json.loads((onnx_path.parent / "model.json").read_text())
    assert meta["onnx_sha256"] == file_sha256(onnx_path)
    assert meta["model_config"]["encoder"]["num_spike_steps"] == 32
    assert [i["name"] for i in meta["inputs"]] == list(INPUT_NAMES)
    # Every input reaches the graph's arithmetic (an input no node reads would be a modality the engine ignores).
    consumed = {name for n in proto.graph.node for name in n.input}
    assert set(INPUT_NAMES) - {"state", "audio_frames"} <= consumed, set(INPUT_NAMES) - consumed


def _export_in(folder: str, seed: int) -> str:
    from mm_fusion_ros.config import RobotConfig
    from mm_fusion_ros.engine.export import export_onnx
    return str(export_onnx(build_model(RobotConfig().model, seed=seed), folder))


def test_two_processes_exporting_to_one_folder_at_once_both_get_a_whole_model(tmp_path):
    """As eval's workers do on a first run: each checks and renames only the file it wrote (measured before:
    one of two workers failed on the other's half-written model.onnx.tmp)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.starmap(_export_in, [(str(tmp_path), 3), (str(tmp_path), 3)])
    assert paths == [str(tmp_path / "model.onnx")] * 2
    onnx.checker.check_model(onnx.load(paths[0]), full_check=True)
    assert not list(tmp_path.glob("*.tmp"))


def test_ensure_onnx_reuses_until_the_weights_change(robot, onnx_path):
    cfg, model = robot
    before = onnx_path.stat().st_mtime_ns
    assert ensure_onnx(model, cfg.engine.artifact_dir, log=lambda _: None) == onnx_path
    assert onnx_path.stat().st_mtime_ns == before
    other = build_model(cfg.model, seed=4)
    messages = []
    ensure_onnx(other, cfg.engine.artifact_dir, log=messages.append)
    assert messages and "exporting" in messages[0]
    assert onnx_path.stat().st_mtime_ns != before
    ensure_onnx(model, cfg.engine.artifact_dir, log=lambda _: None)  # leave the module's model exported


def test_auto_backend_without_gpu_is_onnxruntime():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks tensorrt or compiled")
    assert resolve_backend("auto") == "onnxruntime"
    with pytest.raises(ValueError, match="allowed"):
        resolve_backend("openvino")


def test_onnxruntime_on_a_gpu_machine_without_its_cuda_provider_falls_back_to_cpu(robot, onnx_path, monkeypatch):
    """The stock onnxruntime wheel on a CUDA machine: torch sees the GPU, onnxruntime has no CUDA provider.
    The node must start on the CPU and say so, not refuse to start."""
    import onnxruntime as ort

    from mm_fusion_ros.engine import tensorrt_engine

    cfg, model = robot
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(tensorrt_engine, "tensorrt_available", lambda: False)
    logs: list[str] = []
    engine = create_engine(cfg, model, "onnxruntime", log=logs.append)
    assert engine.session.get_providers() == ["CPUExecutionProvider"]
    warnings = [line for line in logs if "WARNING" in line]
    assert len(warnings) == 1 and "CUDAExecutionProvider" in warnings[0] and "CPU" in warnings[0]
    assert "inference backend: onnxruntime CPUExecutionProvider" in logs[-1]
    # auto on that machine takes the torch-compiled engine, which never asks onnxruntime for CUDA
    assert resolve_backend("auto") == "compiled"


class _MustNotRun(Engine):
    name = "spy"

    def run(self, inputs):
        raise AssertionError("bad input reached the engine")


@pytest.mark.parametrize("name, bad, pattern", [
    ("camera", lambda a: a.astype(np.float32), "dtype uint8"),
    ("audio", lambda a: a[:, :8000], r"shape \[1, 16000\]"),
    ("imu", lambda a: a.astype(np.float64), "dtype float32"),
    ("joint_state", lambda a: a[:, :7], r"shape \[1, 14\]"),    # positions without velocities
    ("joint_state", lambda a: a.astype(np.float64), "dtype float32"),
    ("state", lambda a: a[:, :3], "state"),
])
def test_bad_input_is_refused_before_the_engine(robot, make_inputs, name, bad, pattern):
    cfg, _ = robot
    engine = _MustNotRun(input_specs(cfg.model), output_specs(cfg.model))
    inputs = make_inputs(cfg.model, as_torch=False)
    inputs[name] = bad(inputs[name])
    with pytest.raises(InputError, match=pattern):
        engine.step(inputs)
    inputs = make_inputs(cfg.model, as_torch=False)
    del inputs["lidar"]
    with pytest.raises(InputError, match="missing"):
        engine.step(inputs)


def test_onnx_model_of_another_config_is_refused_with_its_real_signature(robot, onnx_path):
    cfg, _ = robot
    other = dataclasses.replace(cfg.model, lidar=dataclasses.replace(cfg.model.lidar, beams=720))
    with pytest.raises(RuntimeError, match=r"lidar\[1, 720\].*lidar\[1, 360\]"):
        OnnxRuntimeEngine(onnx_path, input_specs(other), output_specs(other))


def _drive(streams, cfg, ticks):
    """Step several streams on identical inputs; modalities drop in and out."""
    sensors = SyntheticSensors(cfg.model, seed=11)
    rng = np.random.default_rng(5)
    worst = {name: 0.0 for name in streams}
    for i in range(ticks):
        t = 2.0 + 0.01 * i
        mask = np.ones(len(MODALITIES), np.float32)
        mask[MODALITIES.index("camera")] = 0.0 if 40 <= i < 90 else 1.0   # camera drops out
        mask[MODALITIES.index("lidar")] = float(i % 7 != 3)               # lidar flickers
        mask[MODALITIES.index("joint_state")] = float(i % 11 != 5)        # a joint state comes late now and then
        dt = 0.01 + float(rng.uniform(-0.002, 0.002))
        frame = (sensors.camera(t), sensors.audio(t), sensors.imu(t), sensors.lidar(t), sensors.joint_vector(t))
        # Windows move one hop per tick, so the engines compute only the newest log-mel frames.
        audio_end = int(round(t * cfg.model.audio.sample_rate))
        results = {name: s.step(*frame, mask, dt, audio_end) for name, s in streams.items()}
        ref, ref_state = results["torch"], streams["torch"].state
        for name, r in results.items():
            diff = max(np.abs(r.action - ref.action).max(), np.abs(r.fused_state - ref.fused_state).max(),
                       np.abs(streams[name].state - ref_state).max())
            worst[name] = max(worst[name], float(diff))
    return worst


def test_onnxruntime_matches_torch_over_200_ticks(robot, onnx_path):
    cfg, model = robot
    streams = {"torch": FusionStream(TorchEngine(model), cfg.model),
               "onnxruntime": FusionStream(create_engine(cfg, model, "onnxruntime", log=lambda _: None), cfg.model)}
    worst = _drive(streams, cfg, PARITY_TICKS)
    assert worst["onnxruntime"] < PARITY_TOL, worst
    assert streams["onnxruntime"].counters["ticks"] == PARITY_TICKS
    assert streams["onnxruntime"].counters["audio_frame_resyncs"] == 1   # the cache carried the rest


def test_onnxruntime_follows_the_joint_state_like_torch(robot, onnx_path, make_inputs):
    """The arm's joint state moves the exported step's outputs exactly as it moves torch's; masked, it cannot."""
    cfg, model = robot
    ort_engine = create_engine(cfg, model, "onnxruntime", log=lambda _: None)
    torch_engine = TorchEngine(model)
    base = make_inputs(cfg.model, 21, as_torch=False)
    moved = {**base, "joint_state": np.ascontiguousarray(-2.0 * base["joint_state"] + 0.3, np.float32)}
    outs = {}
    for label, inputs in (("base", base), ("moved", moved)):
        ref, got = torch_engine.step(dict(inputs)), ort_engine.step(dict(inputs))
        for name in ("action", "fused_state", "new_state", "contribution"):
            np.testing.assert_allclose(got[name], ref[name], atol=PARITY_TOL, rtol=0, err_msg=f"{label} {name}")
        outs[label] = got
    js = MODALITIES.index("joint_state")
    assert np.abs(outs["moved"]["action"] - outs["base"]["action"]).max() > 1e-4
    assert np.abs(outs["moved"]["new_state"][:, js] - outs["base"]["new_state"][:, js]).max() > 1e-4
    masked = np.ones_like(base["mask"])
    masked[:, js] = 0.0
    a = ort_engine.step({**base, "mask": masked})
    b = ort_engine.step({**moved, "mask": masked})
    np.testing.assert_allclose(a["action"], b["action"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(b["new_state"][:, js], base["state"][:, js])   # held while masked


@pytest.mark.parametrize("strategy", ["early", "late", "hierarchical", "bilinear", "adaptive", "hybrid+keypoints",
                                      "hybrid+audio_keypoints", "hybrid+cue", "hybrid+cue+tool",
                                      "hybrid+cue+tool+memory", "hybrid+cue+tool+memory+task"])
def test_every_fusion_strategy_exports_flat_and_matches_torch(robot, tmp_path, strategy):
    """The default (hybrid) is covered above; each other strategy must export and run the same too, and
    so must the fused state's queries over the camera's keypoints (``+keypoints``: two of them) and the cue
    read (``+cue``: three buttons, the Panda's kinematics inside the graph) and the tool-space head (``+tool``:
    the damped least squares inside the graph) and the cue read's memory (``+memory``: pixel keypoints, their
    gates, one more state slot; with it the IMU high-passed) and the head that reads the task (``+task``: the
    phase flags, the intruder flag's gate on the twist)."""
    cfg, _ = robot
    model_cfg = with_strategy(cfg.model, strategy)
    cfg = dataclasses.replace(cfg, model=model_cfg,
                              engine=dataclasses.replace(cfg.engine, artifact_dir=str(tmp_path)))
    model = build_model(model_cfg, seed=5)
    path = ensure_onnx(model, cfg.engine.artifact_dir, log=lambda _: None)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & FORBIDDEN_OPS, ops & FORBIDDEN_OPS
    streams = {"torch": FusionStream(TorchEngine(model), model_cfg),
               "onnxruntime": FusionStream(create_engine(cfg, model, "onnxruntime", log=lambda _: None), model_cfg)}
    worst = _drive(streams, cfg, PARITY_TICKS)
    assert worst["onnxruntime"] < PARITY_TOL, worst


def test_compiled_engine_matches_torch_over_200_ticks(robot):
    cfg, model = robot
    engine = create_engine(cfg, model, "compiled", log=lambda _: None)
    streams = {"torch": FusionStream(TorchEngine(model), cfg.model), "compiled": FusionStream(engine, cfg.model)}
    worst = _drive(streams, cfg, PARITY_TICKS)
    assert worst["compiled"] < PARITY_TOL, worst


def test_tensorrt_matches_torch_and_caches_its_plan(robot, onnx_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installable in this workplace (NVIDIA index only)")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from mm_fusion_ros.engine.tensorrt_engine import build_plan, plan_paths

    cfg, model = robot
    plan = build_plan(onnx_path, cfg.engine.artifact_dir, "fp32", log=lambda _: None)
    built = plan.stat().st_mtime_ns
    messages = []
    build_plan(onnx_path, cfg.engine.artifact_dir, "fp32", log=messages.append)
    assert plan.stat().st_mtime_ns == built and "up to date" in messages[0]
    assert plan_paths(cfg.engine.artifact_dir, "fp32")[0] == plan
    streams = {"torch": FusionStream(TorchEngine(model), cfg.model),
               "tensorrt": FusionStream(create_engine(cfg, model, "tensorrt", log=lambda _: None), cfg.model)}
    worst = _drive(streams, cfg, PARITY_TICKS)
    assert worst["tensorrt"] < PARITY_TOL, worst


def test_nonfinite_sensor_data_is_masked_and_counted(robot):
    cfg, model = robot
    stream = FusionStream(TorchEngine(model), cfg.model)
    sensors = SyntheticSensors(cfg.model)
    audio = sensors.audio(1.0)
    audio[100] = np.nan
    imu = sensors.imu(1.0)
    imu[3, 2] = np.inf
    joints = sensors.joint_vector(1.0)
    joints[9] = np.nan           # a velocity
    ones = np.ones(len(MODALITIES), np.float32)
    result = stream.step(sensors.camera(1.0), audio, imu, sensors.lidar(1.0), joints, ones, 0.01)
    assert np.isfinite(result.action).all() and np.isfinite(stream.state).all()
    assert result.mask.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert stream.counters["nonfinite_audio"] == 1 and stream.counters["nonfinite_imu"] == 1
    assert stream.counters["nonfinite_joint_state"] == 1
    # The joint state alone: only it is masked, and the caller's array is left as it was.
    result = stream.step(sensors.camera(1.01), sensors.audio(1.01), sensors.imu(1.01), sensors.lidar(1.01), joints,
                         ones, 0.01)
    assert result.mask.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0] and np.isnan(joints[9])
    assert stream.counters["nonfinite_joint_state"] == 2 and stream.counters["nonfinite_imu"] == 1
    with pytest.raises(InputError, match="dt"):
        stream.step(sensors.camera(1.0), audio, imu, sensors.lidar(1.0), joints, ones, 0.0)
