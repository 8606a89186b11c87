"""The mm-fusion command line, run as a user runs it (a separate process)."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def mm_fusion(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, "-m", "mm_fusion_ros.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def _config_with(tmp_path, mutate):
    doc = yaml.safe_load((REPO / "config" / "robot.yaml").read_text())
    params = doc["fusion_node"]["ros__parameters"]
    params["engine"]["artifact_dir"] = str(tmp_path / "artifacts")
    mutate(params)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_export_writes_onnx_and_metadata(tmp_path):
    cfg = _config_with(tmp_path, lambda p: None)
    out = tmp_path / "exported"
    run = mm_fusion("export", "--config", str(cfg), "--out", str(out))
    assert run.returncode == 0, run.stderr
    meta = json.loads((out / "model.json").read_text())
    assert (out / "model.onnx").stat().st_size > 10_000
    assert meta["inputs"][0] == {"name": "camera", "shape": [1, 96, 96, 3], "dtype": "uint8"}
    assert meta["inputs"][4] == {"name": "joint_state", "shape": [1, 14], "dtype": "float32"}   # 7 q, then 7 qd
    assert next(i for i in meta["inputs"] if i["name"] == "mask")["shape"] == [1, 5]
    assert not list(out.glob("*.tmp")), "temporary files left behind"


def test_bench_engine_json(tmp_path):
    cfg = _config_with(tmp_path, lambda p: None)
    plot = tmp_path / "bench.png"
    run = mm_fusion("bench-engine", "--config", str(cfg), "--backends", "torch,onnxruntime", "--iterations", "40",
                    "--rounds", "2", "--warmup", "3", "--json", "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)  # exactly one JSON object on stdout
    for name in ("torch", "onnxruntime"):
        entry = report["backends"][name]
        assert 0 < entry["p50_ms"] <= entry["p99_ms"]
    assert report["backends"]["torch"]["speedup_vs_torch"] == 1.0
    ratio = report["backends"]["torch"]["p50_ms"] / report["backends"]["onnxruntime"]["p50_ms"]
    assert abs(report["backends"]["onnxruntime"]["speedup_vs_torch"] - ratio) < 0.02 * ratio + 0.01
    assert plot.stat().st_size > 1000


def test_bad_config_is_refused_before_any_work(tmp_path):
    def typo(p):
        p["model"]["audio"]["nfft"] = 512
    cfg = _config_with(tmp_path, typo)
    out = tmp_path / "never"
    run = mm_fusion("export", "--config", str(cfg), "--out", str(out))
    assert run.returncode == 2
    assert "model.audio" in run.stderr and "nfft" in run.stderr and "n_fft" in run.stderr
    assert not out.exists()

    def impossible(p):
        p["model"]["audio"]["window_s"] = 0.01
    run = mm_fusion("demo", "--config", str(_config_with(tmp_path, impossible)))
    assert run.returncode == 2 and "shorter than one FFT" in run.stderr

    run = mm_fusion("bench-engine", "--config", str(tmp_path / "missing.yaml"))
    assert run.returncode == 2 and "not found" in run.stderr


def test_demo_runs_and_reports_cadence(tmp_path):
    cfg = _config_with(tmp_path, lambda p: None)
    plot = tmp_path / "demo.png"
    run = mm_fusion("demo", "--config", str(cfg), "--duration", "2", "--backend", "onnxruntime", "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    assert "summary:" in run.stdout and "all finite: True" in run.stdout
    assert "inference backend: onnxruntime" in run.stderr
    assert plot.stat().st_size > 1000
