"""``mm-fusion eval``: closed loop in the cell through the Runtime, per-episode results, workers, faults, video,
and the refusals (a checkpoint for another model, bad options)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mm_fusion_ros.cli import main as cli_main
from mm_fusion_ros.config import load_config
from mm_fusion_ros.evaluate import Drop, EvalError, EvalOptions, Evaluator, eval_config, evaluate, summarize
from mm_fusion_ros.model import build_model, save_checkpoint

from conftest import short_cell_config

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def short_cell(tmp_path_factory) -> Path:
    """2.5 s episodes (an untrained policy times out; that is all these tests need)."""
    return short_cell_config(tmp_path_factory.mktemp("cell"), 2.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Untrained weights of the cell's model (eval must not care how they were made)."""
    path = tmp_path_factory.mktemp("ckpt") / "policy.pt"
    save_checkpoint(build_model(load_config(SIM_YAML).model, seed=3), path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("ROS_HOME", str(tmp_path_factory.mktemp("ros_home")))


@pytest.fixture(scope="module")
def two_episodes(short_cell, checkpoint, artifacts):
    return evaluate(short_cell, checkpoint, EvalOptions(episodes=2, seed=1000), progress=False, log=_quiet)


def _without_wall(episodes: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "wall_s"} for e in episodes]


def test_every_episode_is_reported_and_aggregated_with_an_interval(two_episodes):
    r = two_episodes
    assert [e["seed"] for e in r["episodes"]] == [1000, 1001]
    for e in r["episodes"]:
        assert {"seed", "outcome", "reason", "time_to_success_s", "intruder_contacts", "max_joint_speed",
                "duration_s", "ticks", "held_ticks", "contribution"} <= set(e)
        assert e["ticks"] == pytest.approx(e["duration_s"] * 100, abs=2)   # the control rate on sim time
        # The policy's commands reached the arm: the untrained network's are a few hundredths of a rad/s (its tool
        # twist starts at the labels' scale, halved by an undecided intruder flag), a held arm's 1e-16.
        assert e["max_joint_speed"] > 0.005
    # How near the tool came to the cued button: never further than where it started, and the button's
    # own estimate only from a policy trained to give one.
    from mm_fusion_ros.sim.cell import Cell
    from mm_fusion_ros.sim.config import load_cell_config
    from mm_fusion_ros.sim.scene import COLOUR_NAMES
    import numpy as np
    cell = Cell(load_cell_config(SIM_YAML), render=False)
    for e in r["episodes"]:
        spec = cell.reset(e["seed"])
        start_cm = 100 * np.hypot(*(cell.tcp()[0][:2] - np.asarray(spec.buttons[spec.target])))
        assert 0 < e["closest_cm"] <= start_cm + 0.01
        assert e["target_error_cm"] is None
        assert e["nearest_button"] in COLOUR_NAMES[:len(spec.buttons)] and e["target"] == spec.target_colour
    assert r["summary"]["nearest_is_cued"] == sum(e["nearest_button"] == e["target"] for e in r["episodes"])
    # The tip's height above the cued cap: never below the cap's full travel (the cap stops it), and
    # the lowest while over the cap only when the tool came within the cap's radius.
    travel_cm = 100 * (cell.cfg.scene.click_depth[1] + cell.cfg.scene.free_travel)
    for e in r["episodes"]:
        assert e["final_above_cap_cm"] > -travel_cm - 0.5
        assert (e["lowest_over_cap_cm"] is not None) == (e["closest_cm"] <= 100 * cell.cfg.scene.cap_radius + 0.01)
        if e["lowest_over_cap_cm"] is not None:
            assert e["lowest_over_cap_cm"] > -travel_cm - 0.5
    assert r["summary"]["over_cap"] == sum(e["lowest_over_cap_cm"] is not None for e in r["episodes"])
    s = r["summary"]
    lo, hi = s["success_ci95"]
    assert 0.0 <= lo <= s["success_rate"] <= hi <= 1.0
    assert sum(s["failure_reasons"].values()) == s["episodes"] - s["successes"]
    assert r["throughput"]["x_realtime_per_worker"] > 0


def test_results_do_not_depend_on_the_number_of_workers(short_cell, checkpoint, artifacts, two_episodes):
    again = evaluate(short_cell, checkpoint, EvalOptions(episodes=2, seed=1000, workers=2), progress=False,
                     log=_quiet)
    assert _without_wall(again["episodes"]) == _without_wall(two_episodes["episodes"])


def test_a_silenced_sensor_is_masked_and_the_watchdog_holds(short_cell, checkpoint, artifacts):
    ev = Evaluator(str(short_cell), str(checkpoint), "onnxruntime")
    try:
        plain = ev.episode(1000)
        dropped = ev.episode(1000, (Drop("lidar", 1.0, 0.5),))
    finally:
        ev.close()
    # LiDAR is required: the output is held from max_age (0.25 s) after the last scan before the gap (stamped
    # 0.4 s) until the first scan after it (stamped 1.5 s) has been swept and delivered, 0.1 s later: ~0.95 s.
    assert 85 <= dropped["held_ticks"] - plain["held_ticks"] <= 115


def test_the_video_shows_the_episode_with_the_policy_beside_it(short_cell, checkpoint, artifacts, tmp_path):
    import cv2
    out = tmp_path / "ep.mp4"
    report = evaluate(short_cell, checkpoint, EvalOptions(episodes=1, seed=1000, video=str(out)), progress=False,
                      log=_quiet)
    assert report["videos"] == [str(out)]
    cap = cv2.VideoCapture(str(out))
    frames, width = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    cap.release()
    assert frames >= 2.5 * 30 and width > 480 + 360   # witness + policy camera + the policy panel


def test_a_checkpoint_for_another_model_is_refused_listing_the_differences(tmp_path):
    robot = load_config(REPO / "config" / "robot.yaml")
    other = tmp_path / "robot_policy.pt"
    save_checkpoint(build_model(robot.model), other)
    with pytest.raises(EvalError, match=r"does not match .*sim\.yaml") as err:
        eval_config(SIM_YAML, other, "onnxruntime")
    assert "model.action.names: ['joint_1'" in str(err.value) and "model.lidar.range_max: 30.0 != 8.0" in str(err.value)


def test_a_checkpoint_trained_with_overrides_is_compared_with_them_applied(tmp_path):
    cfg = load_config(SIM_YAML)
    model_cfg = dataclasses.replace(cfg.model, fusion=dataclasses.replace(cfg.model.fusion, strategy="late"),
                                    modalities=("camera", "joint_state"))
    path = tmp_path / "late.pt"
    overrides = {"model.fusion.strategy": "late", "model.modalities": ["camera", "joint_state"]}
    save_checkpoint(build_model(model_cfg), path, {"training": {"overrides": overrides}})
    c = eval_config(SIM_YAML, path, "onnxruntime")
    assert c.model.fusion.strategy == "late" and c.model.modalities == ("camera", "joint_state")
    # Without the overrides recorded, the same weights do not match the cell's config.
    bare = tmp_path / "bare.pt"
    save_checkpoint(build_model(model_cfg), bare)
    with pytest.raises(EvalError, match="model.fusion.strategy: 'late' != 'hybrid'"):
        eval_config(SIM_YAML, bare, "onnxruntime")


@pytest.mark.parametrize("text, message", [
    ("camera", "expected MODALITY:DURATION@START"),
    ("radar:2@1", "unknown modality 'radar'"),
    ("camera:-1@2", "duration must be > 0"),
    ("camera:x@2", "expected MODALITY:DURATION@START"),
])
def test_bad_drop_specs_are_refused(text, message):
    with pytest.raises(EvalError, match=re.escape(message)):
        Drop.parse(text)


def test_drop_silences_its_modality_for_its_stretch_only():
    d = Drop.parse("camera:2.0@3.0")
    assert (d.modality, d.duration_s, d.at_s) == ("camera", 2.0, 3.0)
    assert d.silences("camera", 3.0) and d.silences("camera", 4.99)
    assert not d.silences("camera", 5.0) and not d.silences("camera", 2.99) and not d.silences("audio", 4.0)


def test_cli_refuses_bad_options_before_any_episode(checkpoint, tmp_path, capsys):
    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--episodes", "0"]) == 2
    assert "--episodes" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--video", "x.gifv"]) == 2
    assert "MP4" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(checkpoint), "--drop", "sonar:1@1"]) == 2
    with pytest.raises(EvalError, match="--video-episodes"):
        EvalOptions(episodes=2, seed=1000, video="a.mp4", video_episodes=(999,)).validate()


def test_summary_counts_reasons_and_mean_time_to_success():
    eps = [{"outcome": "success", "reason": "success", "time_to_success_s": 6.0, "duration_s": 6.0,
            "intruder_contacts": 0, "max_joint_speed": 0.5, "contribution": {m: 0.2 for m in
                                                                              ("camera", "audio", "imu", "lidar",
                                                                               "joint_state")}},
           {"outcome": "success", "reason": "success", "time_to_success_s": 8.0, "duration_s": 8.0,
            "intruder_contacts": 0, "max_joint_speed": 0.7, "contribution": {m: 0.2 for m in
                                                                              ("camera", "audio", "imu", "lidar",
                                                                               "joint_state")}},
           {"outcome": "failure", "reason": "overtravel", "time_to_success_s": None, "duration_s": 5.0,
            "intruder_contacts": 1, "max_joint_speed": 0.9, "contribution": {m: 0.2 for m in
                                                                              ("camera", "audio", "imu", "lidar",
                                                                               "joint_state")}}]
    s = summarize(eps)
    assert s["successes"] == 2 and s["failure_reasons"] == {"overtravel": 1}
    assert s["mean_time_to_success_s"] == pytest.approx(7.0) and s["intruder_contacts"] == 1
    lo, hi = s["success_ci95"]
    assert lo < 2 / 3 < hi


def test_a_policy_trained_with_the_task_state_has_its_estimate_of_the_button_scored(short_cell, artifacts, tmp_path):
    """fused_state[:2] of such a policy is its estimate of the cued button (dm): eval scores it against the
    cell's button from the policy's first command on. A state head that always says the right button
    scores 0; one that says a point 10 cm off scores 10 cm."""
    import torch

    from mm_fusion_ros.sim.cell import Cell
    from mm_fusion_ros.sim.config import load_cell_config
    from mm_fusion_ros.sim.scene import COLOUR_NAMES
    spec = Cell(load_cell_config(SIM_YAML), render=False).reset(1000)
    bx, by = spec.buttons[spec.target]
    errors = []
    for dx in (0.0, 0.1):
        net = build_model(load_config(SIM_YAML).model, seed=3)
        with torch.no_grad():
            net.state_head.weight.zero_()
            net.state_head.bias.zero_()
            net.state_head.bias[:2] = torch.tensor([10 * (bx + dx), 10 * by])
        ckpt = tmp_path / f"task_{dx}.pt"
        save_checkpoint(net, ckpt, {"training": {"train_config": {"task_state_weight": 1.0}}})
        r = evaluate(short_cell, ckpt, EvalOptions(episodes=1, seed=1000), progress=False, log=_quiet)
        errors.append(r["episodes"][0]["target_error_cm"])
    assert errors[0] == pytest.approx(0.0, abs=0.01) and errors[1] == pytest.approx(10.0, abs=0.01)


def test_a_batched_engine_steps_each_row_as_its_own_stream(artifacts):
    """``BatchedSteps``: a row's outputs are the same bits whichever row it takes and whatever its neighbours
    hold (so lockstep results cannot depend on scheduling), and agree with the batch-1 engine to float noise."""
    import numpy as np
    from conftest import random_inputs
    from mm_fusion_ros.engine import create_engine
    from mm_fusion_ros.engine.stream import BatchedSteps, PreparedStep

    cfg = load_config(SIM_YAML)
    model = build_model(cfg.model, seed=3)
    single = create_engine(cfg, model, "onnxruntime", log=_quiet)
    batched = BatchedSteps(create_engine(cfg, model, "onnxruntime", log=_quiet, batch=3))
    assert batched.batch == 3
    mask = np.ones((1, 5), np.float32)
    streams = [PreparedStep(random_inputs(cfg.model, seed=s, as_torch=False), mask, True, None) for s in range(5)]
    first = batched.run([streams[0], streams[1], streams[2]])
    moved = batched.run([streams[3], streams[0]])            # another row, other neighbours, a row left over
    again = batched.run([streams[4], streams[2], streams[0]])
    alone = single.step(streams[0].inputs)
    for name, value in first[0].items():
        assert value.shape == alone[name].shape
        np.testing.assert_array_equal(value, moved[1][name])
        np.testing.assert_array_equal(value, again[2][name])
        np.testing.assert_allclose(value, alone[name], atol=2e-5, rtol=1e-4)
    assert not np.array_equal(first[0]["action"], first[1]["action"])   # the rows did hold different streams
    with pytest.raises(ValueError, match="1 to 3 streams"):
        batched.run(streams[:4])


def test_lockstep_episodes_match_one_at_a_time_and_do_not_depend_on_workers(short_cell, checkpoint, artifacts,
                                                                            two_episodes):
    """Three episodes through two lockstep slots (a slot takes the third seed when its first ends): the same
    outcomes, ticks and holds as one at a time, and the same bits with one worker or two."""
    one = evaluate(short_cell, checkpoint, EvalOptions(episodes=3, seed=1000, lockstep=2), progress=False, log=_quiet)
    two = evaluate(short_cell, checkpoint, EvalOptions(episodes=3, seed=1000, lockstep=2, workers=2), progress=False,
                   log=_quiet)
    assert _without_wall(one["episodes"]) == _without_wall(two["episodes"])
    assert [e["seed"] for e in one["episodes"]] == [1000, 1001, 1002] and one["lockstep"] == 2
    for batched, alone in zip(one["episodes"], two_episodes["episodes"]):
        for key in ("outcome", "reason", "ticks", "held_ticks", "target", "nearest_button"):
            assert batched[key] == alone[key], key
        assert batched["max_joint_speed"] == pytest.approx(alone["max_joint_speed"], rel=1e-3)
        assert batched["closest_cm"] == pytest.approx(alone["closest_cm"], abs=0.05)


@pytest.mark.parametrize("options, message", [
    (dict(lockstep=0), "--lockstep must be in"),
    (dict(lockstep=4, backend="torch"), "--lockstep 4 batches the onnxruntime engine"),
])
def test_bad_lockstep_options_are_refused(options, message):
    with pytest.raises(EvalError, match=re.escape(message)):
        EvalOptions(**options).validate()
