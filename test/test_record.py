"""``mm-fusion record``: bags shaped like a real robot's, whole episodes only, resume, workers, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mm_fusion_ros.bag.reader import BagReader
from mm_fusion_ros.cli import main as cli_main
from mm_fusion_ros.config import MODALITIES, load_config
from mm_fusion_ros.sim.cell import Cell
from mm_fusion_ros.sim.expert import DartNoise
from mm_fusion_ros.sim.panda import JOINT_NAMES
from mm_fusion_ros.sim.record import LABEL_TOPIC, RecordError, RecordOptions, episode_name, record

from conftest import short_cell_config

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"


def _quiet(_msg: str) -> None:
    pass


def _messages(bag: Path) -> list[tuple[str, int, bytes]]:
    with BagReader(bag, log=_quiet) as reader:
        return [(m.topic, m.t_ns, bytes(m.data)) for m in reader.messages()]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("record") / "demos"
    record(out, SIM_YAML, RecordOptions(episodes=2, seed=0), progress=False, log=_quiet)
    return out


def test_bags_have_the_topics_and_types_the_config_subscribes_to(recorded):
    cfg = load_config(SIM_YAML).absolute()   # bags hold absolute names
    expected = {
        cfg.inputs.camera.topic: "sensor_msgs/msg/CompressedImage",
        cfg.inputs.audio.topic: "audio_common_msgs/msg/AudioDataStamped",
        cfg.inputs.audio.info_topic: "audio_common_msgs/msg/AudioInfo",
        cfg.inputs.lidar.topic: "sensor_msgs/msg/LaserScan",
        cfg.inputs.imu.topic: "sensor_msgs/msg/Imu",
        cfg.inputs.joint_state.topic: "sensor_msgs/msg/JointState",   # the config's, where fusion_node listens
        cfg.outputs.action_topic: "std_msgs/msg/Float64MultiArray",
        LABEL_TOPIC: "sensor_msgs/msg/JointState",
    }
    assert cfg.inputs.joint_state.topic == "/joint_states"
    for seed in (0, 1):
        with BagReader(recorded / episode_name(seed), log=_quiet) as bag:
            assert {t: i.msgtype for t, i in bag.topics.items()} == expected
            meta = json.loads((recorded / f"{episode_name(seed)}.json").read_text())
            duration = meta["duration_s"]
            assert bag.topics["/imu/data"].count == pytest.approx(200 * duration, abs=3)
            assert bag.topics[cfg.inputs.joint_state.topic].count == pytest.approx(100 * duration, abs=3)
            assert bag.topics[cfg.inputs.camera.topic].count == pytest.approx(30 * duration, abs=2)
            # Capture stamps before receive times, on the sim clock; joint names in the Panda's order.
            for m in bag.messages(topics=[cfg.inputs.imu.topic, cfg.inputs.joint_state.topic, cfg.inputs.lidar.topic]):
                msg = bag.decode(m)
                stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
                assert stamp < m.t_ns
                if m.topic == cfg.inputs.joint_state.topic:
                    assert list(msg.name) == list(JOINT_NAMES) and len(msg.position) == len(msg.velocity) == 7
                    assert list(cfg.model.action.names) == list(JOINT_NAMES)   # fusion_node matches them by name
            labels = [bag.decode(m) for m in bag.messages(topics=[LABEL_TOPIC])]
            assert len(labels) == bag.topics[cfg.outputs.action_topic].count
            assert max(np.abs(lbl.velocity).max() for lbl in labels) > 0.1     # the expert moved the arm


def test_episode_json_and_index(recorded):
    index = json.loads((recorded / "index.json").read_text())
    assert index["tool"] == "mm-fusion record" and [e["seed"] for e in index["episodes"]] == [0, 1]
    assert index["summary"]["episodes"] == 2
    lo, hi = index["summary"]["success_ci95"]
    assert 0 <= lo <= index["summary"]["success_rate"] <= hi <= 1
    for seed in (0, 1):
        meta = json.loads((recorded / f"{episode_name(seed)}.json").read_text())
        assert meta["seed"] == seed and meta["task"] == "press_cued_button"
        assert meta["outcome"] == "success" and meta["reason"] == "success"
        assert meta["spec"]["seed"] == seed and meta["bytes"] > 100_000
        with BagReader(recorded / meta["bag"], log=_quiet) as bag:
            assert sum(i.count for i in bag.topics.values()) == sum(meta["messages"].values())


def test_recorded_bag_replays_like_a_robot_bag(recorded, tmp_path):
    """The rest of the toolchain reads it: every input accepted, nothing dropped, inputs fresh."""
    from mm_fusion_ros.replay import ReplayOptions, replay

    cfg = load_config(SIM_YAML).absolute()   # bags hold absolute names
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend="torch"))
    result = replay(recorded / episode_name(0), cfg, ReplayOptions(out=tmp_path / "out", progress=False), log=_quiet)
    s = result.summary
    assert s["drops"] == {} and s["replay"]["bag_problems"] == [] and s["replay"]["missing_topics"] == []
    assert set(s["accepted"]) == set(MODALITIES)
    assert all(rate < 0.03 for rate in s["mask_rate"].values()), s["mask_rate"]   # only before the first scan


def test_same_seed_same_bag_and_workers_do_not_change_it(recorded, tmp_path):
    out = tmp_path / "parallel"
    record(out, SIM_YAML, RecordOptions(episodes=2, seed=0, workers=2), progress=False, log=_quiet)
    for seed in (0, 1):
        assert _messages(out / episode_name(seed)) == _messages(recorded / episode_name(seed))


def test_dart_noise_perturbs_the_executed_command_not_the_label(tmp_path):
    out = tmp_path / "noisy"
    record(out, SIM_YAML, RecordOptions(episodes=1, seed=3, noise=0.05), progress=False, log=_quiet)
    cfg = load_config(SIM_YAML).absolute()   # bags hold absolute names
    with BagReader(out / episode_name(3), log=_quiet) as bag:
        executed = np.array([bag.decode(m).data for m in bag.messages(topics=[cfg.outputs.action_topic])])
        labels = np.array([bag.decode(m).velocity for m in bag.messages(topics=[LABEL_TOPIC])])
    moving = np.abs(labels).max(axis=1) > 0.05
    diff = executed[moving] - labels[moving]
    assert 0.02 < diff.std() < 0.08                       # about the requested 0.05 rad/s
    assert json.loads((out / f"{episode_name(3)}.json").read_text())["noise"] == 0.05


def _listening(seed: int) -> bool:
    return DartNoise(np.random.default_rng([seed, 7]), 0.1, 0.5, 0.01).listening


def test_drifting_dart_noise_is_correlated_over_its_time_constant_and_recorded(tmp_path):
    loud = next(s for s in range(50) if _listening(s))
    quiet = next(s for s in range(50) if not _listening(s))
    cfg = load_config(SIM_YAML).absolute()
    for seed in (loud, quiet):
        out = tmp_path / f"drift{seed}"
        record(out, SIM_YAML, RecordOptions(episodes=1, seed=seed, noise=0.1, noise_tau=0.5), progress=False,
               log=_quiet)
        with BagReader(out / episode_name(seed), log=_quiet) as bag:
            executed = np.array([bag.decode(m).data for m in bag.messages(topics=[cfg.outputs.action_topic])])
            labels = np.array([bag.decode(m).velocity for m in bag.messages(topics=[LABEL_TOPIC])])
        diff = executed - labels
        on = np.abs(diff).max(axis=1) > 0           # the ticks the expert let the noise through
        if seed == quiet:                           # a still start: this episode's cue is heard unperturbed
            assert not on[:50].any() and on.any()
            continue
        assert on[:50].all()                        # listening for the cue: perturbed
        d = diff[:np.argmin(on) if not on.all() else len(on)]   # the first stretch of noise, whole
        assert len(d) > 60
        lag1 = np.mean([np.corrcoef(d[:-1, j], d[1:, j])[0, 1] for j in range(7)])
        assert lag1 > 0.9, lag1                     # a drift (exp(-0.01 / 0.5) = 0.98), not white noise
        assert 0.03 < d.std() < 0.2
        meta = json.loads((out / f"{episode_name(seed)}.json").read_text())
        assert (meta["noise"], meta["noise_tau"]) == (0.1, 0.5)
    # Half the episodes listen unperturbed, half perturbed.
    assert 0.3 < np.mean([_listening(s) for s in range(200)]) < 0.7


def test_interrupted_recording_leaves_whole_episodes_and_resume_finishes(tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    original = Cell.advance

    def dying_advance(self, until):
        calls["n"] += 1
        if calls["n"] == 900:          # well into the second episode
            raise KeyboardInterrupt
        return original(self, until)

    monkeypatch.setattr(Cell, "advance", dying_advance)
    with pytest.raises(KeyboardInterrupt):
        record(out, SIM_YAML, RecordOptions(episodes=3, seed=10), progress=False, log=_quiet)
    monkeypatch.setattr(Cell, "advance", original)
    names = sorted(p.name for p in out.iterdir())
    assert names == [episode_name(10), f"{episode_name(10)}.json", "index.json"]   # nothing half written
    first = (out / episode_name(10))
    mtime = first.stat().st_mtime_ns
    # A leftover of a crash in the middle of a rename, and a bag whose JSON never got written.
    (out / f".{episode_name(12)}.partial-12345").mkdir()
    (out / episode_name(11)).mkdir()
    logs: list[str] = []
    with pytest.raises(RecordError, match="--resume"):
        record(out, SIM_YAML, RecordOptions(episodes=3, seed=10), progress=False, log=logs.append)
    index = record(out, SIM_YAML, RecordOptions(episodes=3, seed=10, resume=True), progress=False,
                   log=logs.append)
    assert [e["seed"] for e in index["episodes"]] == [10, 11, 12]
    assert first.stat().st_mtime_ns == mtime                         # not recorded again
    assert any("1 of 3 episodes already recorded" in line for line in logs)
    assert any("removed 2 unfinished" in line for line in logs)
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_video_of_the_first_episode(tmp_path, capsys):
    import cv2
    video = tmp_path / "ep.mp4"
    assert cli_main(["record", str(tmp_path / "out"), "--episodes", "1", "--seed", "4", "--video", str(video)]) == 0
    assert f"episode 4 (success) rendered to {video}" in capsys.readouterr().out
    meta = json.loads((tmp_path / "out" / f"{episode_name(4)}.json").read_text())
    cap = cv2.VideoCapture(str(video))
    frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    assert ok and frame.shape == (360, 480 + 360, 3)
    assert frames == pytest.approx(30 * meta["duration_s"] + 30, abs=3)    # 30 fps, and a second on the end
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_options_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    for argv, message in [
        (["--episodes", "0"], "--episodes must be in"),
        (["--episodes", "2", "--noise", "-0.1"], "--noise must be in"),
        (["--episodes", "2", "--noise", "0.1", "--noise-tau", "-1"], "--noise-tau must be in"),
        (["--episodes", "2", "--workers", "0"], "--workers must be in"),
        (["--episodes", "2", "--video", "ep.avi"], "name it *.mp4"),
        (["--episodes", "2", "--policy", str(tmp_path / "none.pt")], "--policy: no checkpoint at"),
        (["--episodes", "2", "--expert-share", "0.5"], "--expert-share mixes the expert into a policy's"),
        (["--episodes", "2", "--gap-share", "0.5"], "--gap-share silences a sensor the policy reads: it needs --policy"),
        (["--episodes", "2", "--gap-share", "1.5"], "--gap-share must be in [0, 1]"),
    ]:
        assert cli_main(["record", str(out), *argv]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_config_the_cell_cannot_produce_is_refused(tmp_path, capsys):
    text = SIM_YAML.read_text().replace("      encoding: jpeg ", "      encoding: rgb8 ")
    bad = tmp_path / "sim.yaml"
    bad.write_text(text)
    assert cli_main(["record", str(tmp_path / "out"), "--episodes", "1", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "inputs.camera.type" in err and "camera.encoding" in err
    bad.write_text(SIM_YAML.read_text().replace("      targets: 3 ", "      targets: 0 "))
    assert cli_main(["record", str(tmp_path / "out"), "--episodes", "1", "--config", str(bad)]) == 2
    assert "scene.targets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_joint_states_are_recorded_on_the_configured_topic(tmp_path):
    """fusion_node listens on inputs.joint_state.topic; the recorder writes the arm's joint states there."""
    text = SIM_YAML.read_text()
    assert "        topic: joint_states " in text
    renamed = tmp_path / "sim.yaml"
    renamed.write_text(text.replace("        topic: joint_states ", "        topic: arm/joint_states ", 1))
    cfg = load_config(renamed).absolute()
    assert cfg.inputs.joint_state.topic == "/arm/joint_states"
    out = tmp_path / "out"
    record(out, renamed, RecordOptions(episodes=1, seed=5), progress=False, log=_quiet)
    with BagReader(out / episode_name(5), log=_quiet) as bag:
        assert bag.topics["/arm/joint_states"].msgtype == "sensor_msgs/msg/JointState"
        assert bag.topics["/arm/joint_states"].count > 0 and "/joint_states" not in bag.topics


# ---------------------------------------------------------------- DAgger: record --policy


@pytest.fixture(scope="module")
def short_cell(tmp_path_factory) -> Path:
    """3 s episodes: the cue and the start of the reach, which is all these tests need."""
    return short_cell_config(tmp_path_factory.mktemp("cell"), 3.0)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, monkeypatch_module) -> Path:
    from mm_fusion_ros.model import build_model, save_checkpoint
    monkeypatch_module.setenv("ROS_HOME", str(tmp_path_factory.mktemp("ros_home")))
    path = tmp_path_factory.mktemp("ckpt") / "policy.pt"
    save_checkpoint(build_model(load_config(SIM_YAML).model, seed=3), path)
    return path


def test_with_a_policy_the_policy_drives_as_in_eval_and_the_expert_labels(short_cell, untrained, tmp_path):
    """record --policy runs eval's loop: the same episode, tick for tick, as `mm-fusion eval` of that seed; the
    commands in the bag are the policy's, the labels the expert's at the states the policy reached; and a
    failed policy episode is kept for training (its states are the point)."""
    from mm_fusion_ros.dataset import load_episodes
    from mm_fusion_ros.evaluate import EvalOptions, evaluate
    from mm_fusion_ros.train import successful

    out = tmp_path / "dagger"
    record(out, short_cell, RecordOptions(episodes=1, seed=300, policy=str(untrained)), progress=False, log=_quiet)
    meta = json.loads((out / f"{episode_name(300)}.json").read_text())
    ev = evaluate(short_cell, untrained, EvalOptions(episodes=1, seed=300), progress=False, log=_quiet)["episodes"][0]
    assert meta["driver"] == "policy" and meta["expert_ticks"] == 0
    assert (meta["outcome"], meta["reason"], meta["duration_s"]) == (ev["outcome"], ev["reason"], ev["duration_s"])
    assert meta["stats"]["max_joint_speed"] == pytest.approx(ev["max_joint_speed"], abs=1e-4)
    cfg = load_config(short_cell).absolute()
    with BagReader(out / episode_name(300), log=_quiet) as bag:
        executed = np.array([bag.decode(m).data for m in bag.messages(topics=[cfg.outputs.action_topic])])
        labels = np.array([bag.decode(m).velocity for m in bag.messages(topics=[LABEL_TOPIC])])
    # The untrained policy moves from the first tick (a few hundredths of a rad/s: its tool twist starts at the
    # labels' scale, halved by an undecided intruder flag); the expert says "wait for the cue" (0) until it has
    # heard it (0.5 s + 0.4 s), then reaches for the button from wherever the policy took the arm.
    assert np.abs(executed[:50]).max() > 0.005 and np.abs(labels[:50]).max() == 0.0
    assert np.abs(labels[150:]).max() > 0.1
    assert np.abs(executed - labels).max() > 0.1
    episodes = load_episodes([out], cfg, tmp_path / "cache", progress=False, log=_quiet)
    assert meta["outcome"] != "success" and len(successful(episodes, False, _quiet)) == 1
    # Resuming that folder with another policy, or with the expert, would mix drivers: refused.
    from mm_fusion_ros.model import build_model, save_checkpoint
    other = tmp_path / "other.pt"
    save_checkpoint(build_model(load_config(SIM_YAML).model, seed=4), other)
    for policy in (str(other), ""):
        with pytest.raises(RecordError, match="another --policy"):
            record(out, short_cell, RecordOptions(episodes=2, seed=300, policy=policy, resume=True), progress=False,
                   log=_quiet)


def test_a_policy_for_another_model_is_refused_before_any_episode(short_cell, tmp_path, capsys):
    from mm_fusion_ros.model import build_model, save_checkpoint
    m = load_config(SIM_YAML).model
    other = tmp_path / "other.pt"
    save_checkpoint(build_model(dataclasses.replace(m, fused_state_dim=16), seed=3), other)
    out = tmp_path / "never"
    assert cli_main(["record", str(out), "--config", str(short_cell), "--episodes", "1", "--policy", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--policy:" in err and "fused_state_dim" in err and not out.exists()
    assert cli_main(["record", str(out), "--config", str(short_cell), "--episodes", "1", "--policy", str(other),
                     "--noise", "0.1"]) == 2
    assert "with --policy the policy drives" in capsys.readouterr().err


def test_a_sensor_gap_silences_the_sensor_for_the_policy_and_the_bag_alike(short_cell, untrained, tmp_path):
    """record --policy --gap-share: in a gap episode one required sensor says nothing for a while. The policy
    gets none of its readings (the watchdog holds the arm: zero commands) and the bag has none of them either,
    so training reads the silence the policy lived; eval with the same gap as --drop runs the same episode. The
    gap is the seed's alone: a share of 0 is the plain DAgger episode."""
    from mm_fusion_ros.evaluate import EvalOptions, evaluate
    from mm_fusion_ros.sim.record import GAP_DURATION_S, GAP_START_S, episode_gap

    cfg = load_config(short_cell).absolute()
    required = tuple(cfg.inputs.required)
    # A seed whose gap is the camera's and lies inside the 3 s episode with a second of hold in it.
    seed = next(s for s in range(400, 2000) if (g := episode_gap(s, 1.0, required)) is not None
                and g.modality == "camera" and g.at_s < 1.6 and g.duration_s > 1.2)
    gap = episode_gap(seed, 1.0, required)
    assert GAP_START_S[0] <= gap.at_s <= GAP_START_S[1] and GAP_DURATION_S[0] <= gap.duration_s <= GAP_DURATION_S[1]
    assert episode_gap(seed, 0.0, required) is None and episode_gap(seed, 1.0, required) == gap
    shares = [episode_gap(s, 0.5, required) is not None for s in range(2000, 2400)]
    assert 0.4 < np.mean(shares) < 0.6

    out = tmp_path / "gaps"
    record(out, short_cell, RecordOptions(episodes=1, seed=seed, policy=str(untrained), gap_share=1.0),
           progress=False, log=_quiet)
    meta = json.loads((out / f"{episode_name(seed)}.json").read_text())
    assert meta["gap"] == {"sensor": "camera", "at_s": gap.at_s, "duration_s": gap.duration_s}
    assert json.loads((out / "index.json").read_text())["summary"]["gap_episodes"] == 1
    # Resuming with another share would mix two recipes in one set: refused, naming both.
    with pytest.raises(RecordError, match="recorded with --gap-share 1, not 0.5"):
        record(out, short_cell, RecordOptions(episodes=2, seed=seed, policy=str(untrained), gap_share=0.5,
                                              resume=True), progress=False, log=_quiet)
    start = meta["clock_start_s"]
    with BagReader(out / episode_name(seed), log=_quiet) as bag:
        frames = [bag.decode(m) for m in bag.messages(topics=[cfg.inputs.camera.topic])]
        commands = [(m.t_ns, bag.decode(m).data) for m in bag.messages(topics=[cfg.outputs.action_topic])]
    captured = np.array([f.header.stamp.sec + 1e-9 * f.header.stamp.nanosec - start for f in frames])
    in_gap = (captured >= gap.at_s) & (captured < gap.at_s + gap.duration_s)
    assert not in_gap.any()
    assert (captured < gap.at_s).sum() > 20 and (captured >= gap.at_s + gap.duration_s).sum() > 0
    # Held: once the last frame is older than the camera's max_age, the arm is commanded nothing.
    held = [np.abs(c).max() for t, c in commands
            if gap.at_s + cfg.inputs.camera.max_age + 0.05 < t / 1e9 - start < gap.at_s + gap.duration_s]
    moving = [np.abs(c).max() for t, c in commands if t / 1e9 - start < gap.at_s]
    assert len(held) > 50 and max(held) == 0.0 and max(moving) > 0.005

    ev = evaluate(short_cell, untrained, EvalOptions(episodes=1, seed=seed, drops=(gap,)), progress=False,
                  log=_quiet)["episodes"][0]
    assert (meta["outcome"], meta["reason"], meta["duration_s"]) == (ev["outcome"], ev["reason"], ev["duration_s"])
    assert meta["stats"]["max_joint_speed"] == pytest.approx(ev["max_joint_speed"], abs=1e-4)
