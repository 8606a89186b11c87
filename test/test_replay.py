"""Offline replay: bag order and clock, outputs per tick, determinism, bad input, regression compare.

The engine is torch eager here: the same network as ONNX Runtime, and no ONNX export into the
shared artifacts folder (the replay benchmark covers ONNX Runtime).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from mm_fusion_ros.bag.make_bag import Faults, MakeBagOptions, make_bag
from mm_fusion_ros.bag.reader import BagReader
from mm_fusion_ros.cli import main as cli_main
from mm_fusion_ros.config import MODALITIES
from mm_fusion_ros.replay import ReplayError, ReplayOptions, compare_bags, replay, summary_path_for

DURATION = 2.0
SMALL = dict(camera_width=64, camera_height=48)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # engine.intra_op_threads is 1, but torch eager takes every core; on a busy two-core machine its
    # OpenMP threads spin against each other and a 2 ms step becomes 30 ms.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cfg(default_config):
    return dataclasses.replace(default_config, engine=dataclasses.replace(default_config.engine, backend="torch"))


@pytest.fixture(scope="module")
def bags(tmp_path_factory, cfg) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("replay")
    clean, faulty = root / "clean", root / "faulty"
    make_bag(clean, cfg, MakeBagOptions(duration_s=DURATION, seed=1, **SMALL), progress=False, log=_quiet)
    make_bag(faulty, cfg, MakeBagOptions(duration_s=DURATION, seed=1, faults=Faults.parse(
        "dropout,out_of_order,duplicate,nan,corrupt_image"), **SMALL), progress=False, log=_quiet)
    return {"root": root, "clean": clean, "faulty": faulty}


@pytest.fixture(scope="module")
def clean_run(bags, cfg):
    out = bags["root"] / "out_clean"
    return replay(bags["clean"], cfg, ReplayOptions(out=out, progress=False), log=_quiet)


def _messages(path: Path) -> list[tuple[str, int, bytes]]:
    with BagReader(path, log=_quiet) as bag:
        return [(m.topic, m.t_ns, m.data) for m in bag.messages()]


def _decoded(path: Path, topic: str) -> list[tuple[int, object]]:
    with BagReader(path, log=_quiet) as bag:
        return [(m.t_ns, bag.decode(m)) for m in bag.messages(topics=[topic])]


def test_outputs_every_tick_in_bag_time(clean_run, bags, cfg):
    with BagReader(bags["clean"], log=_quiet) as bag:
        start_ns, end_ns = bag.start_ns, bag.end_ns
    period_ns = int(round(1e9 / cfg.control_rate_hz))
    expected = list(range((start_ns // period_ns + 1) * period_ns, end_ns + 1, period_ns))
    assert clean_run.ticks == len(expected)
    out = cfg.outputs
    for topic in (out.action_topic, out.joint_command_topic, out.fused_state_topic, "/fusion_node/tick"):
        msgs = _decoded(clean_run.out, topic)
        assert [t for t, _ in msgs] == expected, topic
    actions = _decoded(clean_run.out, out.action_topic)
    joints = _decoded(clean_run.out, out.joint_command_topic)
    assert all(len(m.data) == 7 for _, m in actions)
    t_ns, joint = joints[50]
    assert list(joint.name) == list(cfg.model.action.names)
    assert joint.header.stamp.sec * 1_000_000_000 + joint.header.stamp.nanosec == t_ns
    assert np.array_equal(joint.velocity, actions[50][1].data)
    commands = np.array([m.data for _, m in actions])
    lower, upper = np.array(cfg.model.action.lower), np.array(cfg.model.action.upper)
    assert np.all(commands >= lower) and np.all(commands <= upper)
    assert np.abs(commands).max() > 0                       # enabled: real commands, not only rest
    fused = _decoded(clean_run.out, out.fused_state_topic)[0][1]
    assert len(fused.data) == cfg.model.fused_state_dim
    diag = _decoded(clean_run.out, "/fusion_node/tick")[-1][1]
    assert diag.status[0].name == "fusion_node: mm_fusion: tick"


def test_summary_next_to_the_output(clean_run, cfg):
    path = summary_path_for(clean_run.out)
    assert path == clean_run.summary_path and path.is_file()
    summary = json.loads(path.read_text())
    assert summary["ticks"] == clean_run.ticks
    assert set(summary["mask_rate"]) == set(MODALITIES)
    assert summary["mask_rate"]["imu"] == 0.0
    assert summary["mask_rate"]["joint_state"] < 0.05        # 100 Hz joint states: fresh from the first ticks on
    assert set(summary["stage_ms"]) >= {"align", "preprocess", "infer", "safety", "publish"}
    assert len(summary["action"]["command"]["mean"]) == 7
    rep = summary["replay"]
    assert rep["missing_topics"] == [] and rep["bag_problems"] == []
    assert rep["messages_read"][cfg.inputs.imu.topic] == 400
    assert rep["messages_read"][cfg.inputs.joint_state.topic] == 200
    assert rep["speed_x_realtime"] > 0


def test_two_runs_give_identical_output_bags(clean_run, bags, cfg):
    again = replay(bags["clean"], cfg, ReplayOptions(out=bags["root"] / "again", progress=False), log=_quiet)
    assert _messages(again.out) == _messages(clean_run.out)


class _RecordingRuntime:
    """Stands in for Runtime to record the order of adds and ticks."""

    def __init__(self, real):
        self.real, self.calls = real, []

    def add(self, sample, now):
        self.calls.append(("add", now, sample.stamp))
        return self.real.add(sample, now)

    def tick(self, t):
        self.calls.append(("tick", t, None))
        return self.real.tick(t)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_messages_arrive_in_receive_order_between_ticks(bags, cfg):
    from mm_fusion_ros.runtime import Runtime

    rec = _RecordingRuntime(Runtime(cfg, log=_quiet))
    replay(bags["faulty"], cfg, ReplayOptions(out=bags["root"] / "order", progress=False), runtime=rec, log=_quiet)
    last_tick, last_add = -np.inf, -np.inf
    for kind, when, stamp in rec.calls:
        if kind == "tick":
            assert when > last_tick and when >= last_add     # a tick never precedes what arrived before it
            last_tick = when
        else:
            assert when >= last_add and when > last_tick     # receive order, after the ticks before it
            last_add = when
            assert stamp < when                               # capture stamps, not arrival times, go in
    ticks = [w for k, w, _ in rec.calls if k == "tick"]
    # Epoch seconds in a float resolve ~0.24 us: the grid is exact in the bag's nanoseconds.
    assert np.allclose(np.diff(ticks), 1.0 / cfg.control_rate_hz, rtol=0, atol=1e-6)


def test_faults_are_dropped_and_counted_by_cause(bags, cfg):
    run = replay(bags["faulty"], cfg, ReplayOptions(out=bags["root"] / "out_faulty", progress=False), log=_quiet)
    summary = run.summary
    drops = summary["drops"]
    assert drops.get("camera.bad_size", 0) == 1                      # the corrupt frame
    assert drops.get("imu.non_finite", 0) > 0                        # NaN samples
    assert drops.get("imu.duplicate", 0) > 0 and drops.get("imu.out_of_order", 0) > 0
    # The camera dropped out for 20% of the bag (plus its max_age): masked for about that share of ticks.
    assert 0.15 < summary["mask_rate"]["camera"] < 0.4
    assert run.ticks == 200


def test_missing_topic_is_masked_and_named(bags, cfg, tmp_path):
    renamed = dataclasses.replace(cfg, inputs=dataclasses.replace(
        cfg.inputs, audio=dataclasses.replace(cfg.inputs.audio, topic="/mic/nowhere")))
    logged: list[str] = []
    run = replay(bags["clean"], renamed, ReplayOptions(out=tmp_path / "out", progress=False), log=logged.append)
    assert any("/mic/nowhere" in line and "not in the bag" in line for line in logged)
    assert run.summary["replay"]["missing_topics"] == ["/mic/nowhere"]
    assert run.summary["mask_rate"]["audio"] == 1.0
    assert run.summary["mask_rate"]["camera"] < 0.1                  # the rest replays as usual


def test_required_topic_missing_holds_the_output(bags, cfg, tmp_path):
    renamed = dataclasses.replace(cfg, inputs=dataclasses.replace(
        cfg.inputs, lidar=dataclasses.replace(cfg.inputs.lidar, topic="/nope")))
    run = replay(bags["clean"], renamed, ReplayOptions(out=tmp_path / "out", progress=False), log=_quiet)
    commands = np.array([m.data for _, m in _decoded(run.out, cfg.outputs.action_topic)])
    assert np.all(commands == 0.0)                                   # watchdog: rest throughout


def _without_topic(src_bag: Path, out: Path, topic: str) -> Path:
    """A copy of ``src_bag`` that never had ``topic`` (as a robot's recording without the driver running)."""
    from mm_fusion_ros.bag.typestore import make_typestore
    from mm_fusion_ros.bag.writer import BagWriter

    with BagReader(src_bag, log=_quiet) as src, BagWriter(out, make_typestore()) as dst:
        assert topic in src.topics
        for name, info in src.topics.items():
            if name != topic:
                dst.add_topic(name, info.msgtype)
        for msg in src.messages():
            if msg.topic != topic:
                dst.write_raw(msg.topic, msg.t_ns, msg.data)
    return out


def test_bag_without_joint_states_masks_them_and_holds_the_output(bags, cfg, clean_run, tmp_path):
    """An arm whose joint_state_broadcaster was not recorded: the policy never sees where the joints are,
    and joint_state is required, so the watchdog holds the arm at rest for the whole bag."""
    topic = cfg.inputs.joint_state.topic
    bag = _without_topic(bags["clean"], tmp_path / "no_joints", topic)
    logged: list[str] = []
    run = replay(bag, cfg, ReplayOptions(out=tmp_path / "out", progress=False), log=logged.append)
    assert any(topic in line and "not in the bag" in line for line in logged)
    assert run.summary["replay"]["missing_topics"] == [topic]
    assert run.summary["mask_rate"]["joint_state"] == 1.0
    assert run.summary["mask_rate"]["camera"] < 0.1 and run.summary["mask_rate"]["imu"] == 0.0   # the rest as usual
    assert run.ticks == clean_run.ticks
    commands = np.array([m.data for _, m in _decoded(run.out, cfg.outputs.action_topic)])
    assert np.all(commands == 0.0)                                   # watchdog: rest throughout
    # Control: the same bag with its joint states commands the arm.
    clean = np.array([m.data for _, m in _decoded(clean_run.out, cfg.outputs.action_topic)])
    assert np.abs(clean).max() > 0


def test_bag_without_any_configured_topic_is_refused(bags, cfg, tmp_path):
    elsewhere = dataclasses.replace(cfg, inputs=dataclasses.replace(
        cfg.inputs, **{n: dataclasses.replace(getattr(cfg.inputs, n), topic=f"/other/{n}")
                       for n in MODALITIES}))
    with pytest.raises(ReplayError, match="none of the configured input topics"):
        replay(bags["clean"], elsewhere, ReplayOptions(out=tmp_path / "out", progress=False), log=_quiet)
    assert not (tmp_path / "out").exists()


def test_truncated_bag_replays_what_it_holds(bags, cfg, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(bags["faulty"], cut)
    mcap = next(cut.glob("*.mcap"))
    data = mcap.read_bytes()
    mcap.write_bytes(data[: int(len(data) * 0.8)])
    run = replay(cut, cfg, ReplayOptions(out=tmp_path / "out", progress=False), log=_quiet)
    assert run.summary["replay"]["bag_problems"]
    assert 0 < run.ticks <= 200 and run.out.is_dir()


def test_undecodable_message_is_counted_and_skipped(bags, cfg, tmp_path):
    from mm_fusion_ros.bag.typestore import make_typestore
    from mm_fusion_ros.bag.writer import BagWriter

    spoiled = tmp_path / "spoiled"
    with BagReader(bags["clean"], log=_quiet) as src, BagWriter(spoiled, make_typestore()) as dst:
        for topic, info in src.topics.items():
            dst.add_topic(topic, info.msgtype)
        for i, msg in enumerate(src.messages()):
            dst.write_raw(msg.topic, msg.t_ns, msg.data)
            if i == 100:   # a truncated Imu: the CDR header and a few bytes
                dst.write_raw(cfg.inputs.imu.topic, msg.t_ns + 1, msg.data[:12] if msg.topic == cfg.inputs.imu.topic
                              else b"\x00\x01\x00\x00\x01\x02")
    run = replay(spoiled, cfg, ReplayOptions(out=tmp_path / "out", progress=False), log=_quiet)
    assert run.summary["drops"].get("undecodable") == 1
    assert run.ticks == 200


def _write_config(tmp_path: Path, robot_yaml: Path, **changes) -> Path:
    doc = yaml.safe_load(robot_yaml.read_text())
    params = doc["fusion_node"]["ros__parameters"]
    params.update(changes)
    path = tmp_path / "robot.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_cli_compare_passes_and_fails_with_exit_codes(bags, clean_run, robot_yaml, tmp_path, capsys):
    base = ["--config", str(robot_yaml), "--backend", "torch"]
    same = cli_main(["replay", str(bags["clean"]), "--out", str(tmp_path / "same"),
                     "--compare", str(clean_run.out), *base])
    out = capsys.readouterr().out
    assert same == 0 and "compare: passed" in out
    other_weights = _write_config(tmp_path, robot_yaml, seed=7)
    changed = cli_main(["replay", str(bags["clean"]), "--out", str(tmp_path / "changed"),
                        "--compare", str(clean_run.out), "--config", str(other_weights), "--backend", "torch"])
    out = capsys.readouterr().out
    assert changed == 1
    assert "FAIL /mm_fusion/action" in out and "first past tolerance at tick" in out
    comparison = compare_bags(tmp_path / "changed", clean_run.out, tolerance=10.0, log=_quiet)
    assert comparison.passed                                            # everything is within 10
    loose = {d.topic: d for d in comparison.topics}
    assert 0 < loose["/mm_fusion/action"].max_abs <= 2.0


def test_cli_refuses_what_is_not_a_bag(robot_yaml, tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_text("not a bag")
    code = cli_main(["replay", str(junk), "--out", str(tmp_path / "out"), "--config", str(robot_yaml),
                     "--backend", "torch"])
    assert code == 2
    assert "junk.txt: not a rosbag2 bag" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_make_bag_then_replay(robot_yaml, tmp_path, capsys):
    bag = tmp_path / "bag"
    assert cli_main(["make-bag", str(bag), "--duration", "0.5", "--camera-size", "64x48", "--storage", "sqlite3",
                     "--faults", "duplicate", "--config", str(robot_yaml)]) == 0
    assert cli_main(["replay", str(bag), "--out", str(tmp_path / "out"), "--config", str(robot_yaml),
                     "--backend", "torch"]) == 0
    assert "50 ticks" in capsys.readouterr().out
    counts = Counter(topic for topic, _, _ in _messages(tmp_path / "out"))
    assert counts["/mm_fusion/action"] == 50


def test_cli_replay_plots_commands_masks_and_compute_time(bags, robot_yaml, tmp_path):
    png = tmp_path / "plots" / "replay.png"
    assert cli_main(["replay", str(bags["clean"]), "--out", str(tmp_path / "out"), "--config", str(robot_yaml),
                     "--backend", "torch", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(png.parent.glob("*.tmp*"))   # written under a temporary name, then renamed
