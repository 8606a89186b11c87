"""``bench/tables.py``: every row's `make train` is one that `mm-fusion train` accepts, rows differ from the shipped
recipe in one thing only, the tables render what the rows wrote, and bad requests are refused before any work."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from mm_fusion_ros.cli import build_parser
from mm_fusion_ros.config import MODALITIES, load_config
from mm_fusion_ros.train import TrainConfig, check_task_targets, trained_config

from conftest import load_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    return load_script("bench_tables", REPO / "bench" / "tables.py")


def _round0_command(tables, row: dict) -> list[str]:
    """The round-0 `mm-fusion train` command line `make train` runs for this row (Makefile variables filled in)."""
    make = {k: v for k, v in (a.split("=", 1) for a in tables.make_args(row, Path("x.pt"))[2:])}
    return ["train", "bags", "--config", str(REPO / "config" / "sim.yaml"), "--out", "x.pt", "--epochs", "8",
            "--camera-pretrain-steps", make["CAMERA_PRETRAIN"], *shlex.split(make["TRAIN_TARGETS"]),
            "--head-steps", "3000"]


def test_every_row_is_a_training_that_mm_fusion_train_accepts(tables):
    cfg = load_config(REPO / "config" / "sim.yaml")
    rows = tables.rows()
    assert len([r for r in rows.values() if r["table"] == "modalities"]) == 9
    assert sorted(r["strategy"] for r in rows.values() if r["table"] == "strategies") == \
        sorted(s for s in tables.STRATEGIES if s != tables.SHIPPED_STRATEGY)
    for name, row in rows.items():
        args = build_parser().parse_args(_round0_command(tables, row))
        mods = tuple(m for m in args.modalities.split(",") if m)
        tc = TrainConfig(strategy=args.strategy, modalities=mods, epochs=args.epochs,
                         camera_target_weight=args.camera_target_weight, cue_target_weight=args.cue_target_weight,
                         keypoint_target_weight=args.keypoint_target_weight,
                         phase_target_weight=args.phase_target_weight, head_steps=args.head_steps,
                         camera_pretrain_steps=args.camera_pretrain_steps)
        tc.validate()
        model = trained_config(cfg, tc).model
        check_task_targets(model, tc)
        # One thing changed: the inputs (joint states always among them) or the strategy.
        if row["table"] == "modalities":
            assert "joint_state" in model.modalities and model.fusion.strategy == cfg.model.fusion.strategy
            if name.startswith("without_"):
                assert set(model.modalities) == set(MODALITIES) - {name.removeprefix("without_")}
            if name.startswith("only_"):
                assert set(model.modalities) == {name.removeprefix("only_"), "joint_state"}
        else:
            assert model.modalities == cfg.model.modalities and model.fusion.strategy == row["strategy"]
        assert (args.camera_pretrain_steps > 0) == ("camera" in model.modalities), name
    # The all-inputs row is `make train` with its defaults' targets, the shipped recipe.
    make = tables.make_args(rows["all"], Path("x.pt"))
    makefile = (REPO / "Makefile").read_text()
    default_targets = next(line.split("=", 1)[1].split() for line in makefile.splitlines()
                           if line.startswith("TRAIN_TARGETS ="))
    assert sorted(shlex.split(make[3].split("=", 1)[1])) == sorted(default_targets)


def test_render_shows_what_the_rows_wrote(tables, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "OUT", tmp_path)
    summary = {"episodes": 200, "successes": 150, "success_rate": 0.75, "success_ci95": [0.686, 0.804],
               "failure_reasons": {"timeout": 50}}
    (tmp_path / "without_imu.json").write_text(json.dumps({
        "summary": summary, "train_min": 51.2, "onnx_step_p50_ms": 0.6, "parameters": 1234, "peak_memory_mb": 4000}))
    (tmp_path / "without_imu.eval.json").write_text("{}")   # eval's own report: not a row
    text = tables.render()
    assert "| all but imu | 150/200 (75.0 %, CI 68.6-80.4 %) | timeout 50 | 51.2 min |" in text
    assert "| all five inputs | not run |" in text
    assert "| hierarchical | 87.2 % | not run |" in text
    # An adopted checkpoint without its rounds knows its final stage's memory only, and says so.
    (tmp_path / "all.json").write_text(json.dumps({
        "summary": summary, "train_min": 45.0, "onnx_step_p50_ms": 0.8, "parameters": 1234, "peak_memory_mb": 2500,
        "peak_memory_stages": "final only"}))
    assert "| hybrid | 86.7 % | 150/200 (75.0 %, CI 68.6-80.4 %) | 0.8 ms | 1,234 | 2500 MB (final stage only) | " \
           "45.0 min |" in tables.render()


def test_bad_requests_are_refused_before_any_work(tables, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tables, "OUT", tmp_path / "never")
    assert tables.main(["run", "without_everything"]) == 2
    assert "unknown row(s) without_everything" in capsys.readouterr().err
    assert tables.main(["run", "all", "--seed", "0", "--episodes", "100"]) == 2
    assert "evaluation seeds must lie in 1000-1999" in capsys.readouterr().err
    assert tables.main(["run", "all", "without_imu", "--trained", str(tmp_path / "x.pt"), "--train-min", "3"]) == 2
    assert "--trained and --train-min go together, with one row" in capsys.readouterr().err
    assert tables.main(["run", "all", "--trained", str(tmp_path / "x.pt"), "--train-min", "3"]) == 2
    assert "--trained: no checkpoint at" in capsys.readouterr().err
    (tmp_path / "x.pt").write_bytes(b"")
    assert tables.main(["run", "all", "--trained", str(tmp_path / "x.pt"), "--train-min", "3",
                        "--trained-rounds", str(tmp_path / "round0.pt")]) == 2
    assert f"no checkpoint at {tmp_path / 'round0.pt'}" in capsys.readouterr().err
    assert tables.main(["run", "all", "--trained-rounds", str(tmp_path / "x.pt")]) == 2
    assert "--trained-rounds goes with --trained" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
