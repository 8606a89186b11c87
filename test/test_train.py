"""Training data and training: no train/serve skew, the cache, normalisation inside the engine,
determinism, resume, modality subsets, torchrun, and what bad bags and bad options get."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mm_fusion_ros.bag.reader import BagReader
from mm_fusion_ros.bag.writer import BagWriter
from mm_fusion_ros.config import MODALITIES, ConfigError, load_config
from mm_fusion_ros.dataset import DatasetCache, DatasetError, build_episode, load_episodes
from mm_fusion_ros.model import build_model, load_checkpoint, read_checkpoint
from mm_fusion_ros.model.preprocess import LogMelFrames
from mm_fusion_ros.replay import ReplayOptions, replay
from mm_fusion_ros.runtime import Runtime
from mm_fusion_ros.sim.record import LABEL_TOPIC, RecordOptions, episode_name, record
from mm_fusion_ros.train import (SequenceModel, TrainConfig, TrainingError, epoch_lr, make_chunk, normalization,
                                 split_episodes, successful, train, trained_config)

REPO = Path(__file__).resolve().parents[1]
SIM_YAML = REPO / "config" / "sim.yaml"


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain_yaml(tmp_path_factory):
    from conftest import plain_policy_config
    return plain_policy_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def cfg(plain_yaml):
    return load_config(plain_yaml)


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demos") / "demos"
    record(out, SIM_YAML, RecordOptions(episodes=3, seed=0, noise=0.1), progress=False, log=_quiet)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def episodes(demos, cfg, cache):
    return load_episodes([demos], cfg, cache, progress=False, log=_quiet)


class RecordingEngine:
    """Wraps an engine and keeps a copy of every step's inputs (what replay feeds it)."""

    def __init__(self, real):
        self.real, self.inputs = real, []

    def step(self, inputs):
        self.inputs.append({k: v.copy() for k, v in inputs.items()})
        return self.real.step(inputs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_dataset_is_exactly_what_replay_feeds_the_engine(demos, cfg, episodes, tmp_path):
    from mm_fusion_ros.engine import create_engine
    from mm_fusion_ros.runtime import load_model

    bag = demos / episode_name(0)
    engine = RecordingEngine(create_engine(cfg, load_model(cfg), "torch", log=_quiet))
    runtime = Runtime(cfg.absolute(), engine=engine, log=_quiet)
    replay(bag, cfg, ReplayOptions(out=tmp_path / "out", progress=False), runtime=runtime, log=_quiet)
    fed = engine.inputs
    ep = next(e for e in episodes if e.name == episode_name(0))
    assert ep.ticks == len(fed) > 500
    m = cfg.model
    ticks = np.arange(ep.ticks)
    a = ep.arrays
    np.testing.assert_array_equal(ep.camera(ticks, (m.camera.height, m.camera.width, 3)),
                                  np.stack([x["camera"][0] for x in fed]))
    np.testing.assert_array_equal(ep.lidar(ticks, m.lidar.beams), np.stack([x["lidar"][0] for x in fed]))
    for name in ("imu", "joint_state", "mask"):
        np.testing.assert_array_equal(a[name], np.stack([x[name][0] for x in fed]), err_msg=name)
    np.testing.assert_array_equal(a["dt"], np.array([x["dt"][0, 0] for x in fed]))
    # Audio: the dataset holds log-mel frames; they are the frames of the very windows replay fed.
    audio_i = MODALITIES.index("audio")
    used = np.flatnonzero(a["mask"][:, audio_i] > 0.5)
    assert len(used) > 0.9 * ep.ticks
    logmel = LogMelFrames(m.audio).eval()
    pick = used[:: max(1, len(used) // 40)]
    with torch.inference_mode():
        expected = logmel(torch.from_numpy(np.stack([fed[i]["audio"][0] for i in pick]))).numpy()
    np.testing.assert_allclose(ep.audio_windows(pick, m.audio.n_frames), expected, rtol=0, atol=2e-4)
    assert ep.meta["audio_inexact_ticks"] == 0
    # Every labelled tick carries the expert's command stamped at or before it.
    assert a["labelled"].mean() > 0.99 and np.abs(a["action"]).max() > 0.05


@pytest.mark.parametrize("keypoint_queries,source,cue_objects,memory,task", [
    (0, "fused", 0, False, False), (2, "fused", 0, False, False), (2, "audio", 0, False, False),
    (0, "fused", 3, False, False), (0, "fused", 3, True, False), (0, "fused", 3, True, True)])
def test_a_training_chunk_computes_what_the_streaming_step_computes_tick_by_tick(episodes, cfg, keypoint_queries,
                                                                                 source, cue_objects, memory, task):
    """Training's shortcuts (audio windows cut from one convolution over the track, the cells' input
    half and the fusion over all ticks at once, the cue read's memory gated tick by tick from estimates
    made at once) change nothing: the same predictions and state as the step's own parts fed each tick's
    tensors, the way replay feeds them. ``task``: a tool-space head that reads the task (the cue read and
    the phase flags), whose phase logits training supervises."""
    from mm_fusion_ros.sim.panda import READY_Q
    action = cfg.model.action if not task else dataclasses.replace(
        cfg.model.action, space="tool", reads="task", rest=tuple(float(x) for x in READY_Q))
    m = dataclasses.replace(cfg.model, fusion=dataclasses.replace(cfg.model.fusion, keypoint_queries=keypoint_queries,
                                                                  keypoint_query_source=source,
                                                                  cue_objects=cue_objects, cue_memory=memory),
                            camera=dataclasses.replace(cfg.model.camera, pixel_keypoints=3 if memory else 0),
                            action=action)
    # The two paths round differently (batched and single-frame convolutions differ by ~3e-8), and a
    # current within that of a spike onset fires once more in one of them (seed 3 with the 12x12 camera
    # keypoints: one count, 8e-5 on one action). Seed 0's currents sit clear of every onset.
    net = build_model(m, seed=0)
    batch, start, T = episodes[:2], 0, 90        # from before the first full audio window into the task
    chunk = make_chunk(batch, start, T, m)
    assert (chunk.audio_start < 0).any() and (chunk.audio_start >= 0).any()
    with torch.no_grad():
        pred, fused_state, state, _, _, _, phases = SequenceModel(net)(chunk, net.initial_state(len(batch)))
        assert (phases is not None) == task
        ref_state = net.initial_state(len(batch))
        for k in range(T):
            ticks = np.array([start + k])
            step = [torch.from_numpy(np.concatenate([f(ep) for ep in batch])) for f in (
                lambda ep: ep.camera(ticks, (m.camera.height, m.camera.width, 3)),
                lambda ep: ep.audio_windows(ticks, m.audio.n_frames),
                lambda ep: np.asarray(ep.arrays["imu"][ticks]),
                lambda ep: ep.lidar(ticks, m.lidar.beams),
                lambda ep: np.asarray(ep.arrays["joint_state"][ticks]))]
            cam, frames, imu, lidar, joints = step
            camera, keypoints, visibility = net.camera.encode_reads(cam)
            currents = net.stack_tokens(camera, net.audio.token(frames), net.imu(imu), net.lidar(lidar),
                                        net.joint_state(joints))
            mask = chunk.mask[:, k] * net.used
            M = mask.shape[1]
            cells = net.recur(net.lif(currents), mask, chunk.dt[:, k], ref_state[:, :M])
            held = net.remember(ref_state[:, M], keypoints, visibility, mask, joints) if memory else None
            ref_state = cells if held is None else torch.cat([cells, held.unsqueeze(1)], dim=1)
            fused, _, _ = net.fusion(cells, mask)
            fused, reads = net.read_camera(fused, keypoints, mask, cells, joints, None, held)
            head_in, logits = net.head_input(fused, reads, cells, currents, mask)
            torch.testing.assert_close(pred[:, k], net.action_head.normalized(head_in, net.measured_joints(joints, mask)),
                                       rtol=1e-4, atol=1e-5)
            if task:
                torch.testing.assert_close(phases[:, k], logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(fused_state[:, k], net.state_head(fused), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state, ref_state, rtol=1e-4, atol=1e-5)


def test_the_cache_is_keyed_by_bag_and_config_and_never_rebuilt(demos, cfg, cache, episodes, monkeypatch):
    import mm_fusion_ros.dataset as dataset

    def refuse(*a, **k):
        raise AssertionError("rebuilt a cached bag")
    monkeypatch.setattr(dataset, "build_episode", refuse)
    again = load_episodes([demos], cfg, cache, progress=False, log=_quiet)
    assert [e.key for e in again] == [e.key for e in episodes]
    other = dataclasses.replace(cfg, control_rate_hz=50.0)
    c = DatasetCache(cache)
    bag = demos / episode_name(0)
    assert c.key(bag, other, LABEL_TOPIC) != c.key(bag, cfg, LABEL_TOPIC)
    assert isinstance(again[0].arrays["imu"], np.memmap)


def _copy_without(src: Path, dst: Path, drop: str, rename: dict[str, list[str]] | None = None) -> Path:
    from mm_fusion_ros.bag.typestore import make_typestore
    ts = make_typestore()
    with BagReader(src, log=_quiet) as reader, BagWriter(dst, ts) as out:
        for name, info in reader.topics.items():
            if name != drop:
                out.add_topic(name, info.msgtype)
        for m in reader.messages():
            if m.topic == drop:
                continue
            if rename and m.topic in rename:
                msg = reader.decode(m)
                msg = dataclasses.replace(msg, name=rename[m.topic])
                out.write(m.topic, m.t_ns, msg)
            else:
                out.write_raw(m.topic, m.t_ns, m.data)
    return dst


def test_a_bag_without_the_label_topic_is_refused_naming_bag_and_topic(demos, cfg, tmp_path):
    bag = _copy_without(demos / episode_name(1), tmp_path / "no_label", LABEL_TOPIC)
    with pytest.raises(DatasetError, match=rf"no_label: no label topic {LABEL_TOPIC}"):
        build_episode(bag, cfg)


def test_joint_names_that_do_not_match_the_config_are_refused(demos, cfg, tmp_path):
    bag = _copy_without(demos / episode_name(1), tmp_path / "renamed", "",
                        rename={"/joint_states": [f"arm_j{i}" for i in range(1, 8)]})
    with pytest.raises(DatasetError, match=r"renamed: joint state topic /joint_states names joints .*arm_j1"):
        build_episode(bag, cfg)


def test_one_episode_cannot_be_split_for_validation(episodes):
    with pytest.raises(DatasetError, match="at least two"):
        split_episodes(episodes[:1], 0.1)
    train_eps, val_eps = split_episodes(episodes, 0.1)
    assert len(val_eps) == 1 and len(train_eps) == 2 and not set(e.key for e in val_eps) & set(e.key for e in train_eps)


def test_bad_options_are_refused_before_any_work(cfg):
    with pytest.raises(ConfigError, match="--strategy"):
        TrainConfig(strategy="deep").validate()
    with pytest.raises(ConfigError, match="unknown modality 'radar'"):
        TrainConfig(modalities=("camera", "radar")).validate()
    with pytest.raises(ConfigError, match="--epochs"):
        TrainConfig(epochs=0).validate()


QUICK = dict(epochs=1, batch_episodes=2, chunk_ticks=50, val_fraction=0.34, threads=2)


@pytest.fixture(scope="module")
def trained(demos, cfg, cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "policy.pt"
    report = train([demos], cfg, TrainConfig(**QUICK), out, cache=cache, plot=out.with_suffix(".png"),
                   progress=False, log=_quiet)
    return out, report


def test_checkpoint_holds_config_weights_normalisation_training_and_dataset(trained, episodes, cfg):
    out, report = trained
    blob = read_checkpoint(out)
    t = blob["training"]
    assert t["train_config"]["epochs"] == 1 and t["best_epoch"] == 1
    assert sorted(d["key"] for d in t["dataset"]) == sorted(e.key for e in episodes)
    assert t["train_seeds"] == [0, 1, 2]
    assert out.with_suffix(".png").stat().st_size > 1000
    assert not out.with_name(out.name + ".resume").exists()   # complete: no resume state left behind
    model = load_checkpoint(out)
    train_eps, _ = split_episodes(episodes, QUICK["val_fraction"])
    stats = normalization(train_eps)
    np.testing.assert_allclose(model.action_head.mean.numpy()[0], stats["action_mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(1.0 / model.joint_state.inv_std.numpy()[0], np.maximum(stats["joint_state_std"], 1e-3),
                               rtol=1e-4)
    # The Runtime loads it unchanged from the config's checkpoint parameter.
    rt = Runtime(dataclasses.replace(cfg, checkpoint=str(out), engine=dataclasses.replace(cfg.engine, backend="torch")),
                 log=_quiet)
    assert rt.engine is not None


def test_normalisation_is_inside_the_exported_engine(trained, cfg, tmp_path, make_inputs):
    from mm_fusion_ros.engine import create_engine
    out, _ = trained
    model = load_checkpoint(out)
    c = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, artifact_dir=str(tmp_path)))
    ort = create_engine(c, model, "onnxruntime", log=_quiet)
    ref = create_engine(c, model, "torch", log=_quiet)
    inputs = make_inputs(model.cfg, 3, 1, as_torch=False)
    a, b = ort.step(inputs), ref.step(inputs)
    np.testing.assert_allclose(a["action"], b["action"], rtol=1e-4, atol=1e-4)
    # An untrained model with identity statistics gives another action for the same inputs.
    plain = create_engine(c, build_model(model.cfg), "torch", log=_quiet).step(inputs)
    assert not np.allclose(plain["action"], b["action"], atol=1e-3)


def test_training_is_deterministic_for_a_seed_on_cpu(demos, cfg, cache, trained, tmp_path):
    out, _ = trained
    again = tmp_path / "again.pt"
    train([demos], cfg, TrainConfig(**QUICK), again, cache=cache, progress=False, log=_quiet)
    a, b = read_checkpoint(out)["state_dict"], read_checkpoint(again)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "other.pt"
    train([demos], cfg, TrainConfig(**{**QUICK, "seed": 1}), other, cache=cache, progress=False, log=_quiet)
    c = read_checkpoint(other)["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_nan_loss_stops_training_naming_the_chunk_and_keeps_the_last_checkpoint(demos, cfg, cache, trained, tmp_path,
                                                                               monkeypatch):
    import mm_fusion_ros.train as train_mod
    out = tmp_path / "policy.pt"
    out.write_bytes(trained[0].read_bytes())   # the last good checkpoint of an earlier run
    before = out.read_bytes()
    real = train_mod.make_chunk

    def poisoned(episodes, start, T, model_cfg):
        c = real(episodes, start, T, model_cfg)
        if start >= 2 * T:
            c.action[:] = float("nan")
        return c
    monkeypatch.setattr(train_mod, "make_chunk", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* chunk 2 \(ticks 100\.\.149\) of the batch of episodes"):
        train([demos], cfg, TrainConfig(**QUICK), out, cache=cache, progress=False, log=_quiet)
    assert out.read_bytes() == before


def test_an_interrupted_training_resumes_to_the_same_result(demos, cfg, cache, tmp_path):
    two = dict(QUICK, epochs=2, patience=5)
    straight = tmp_path / "straight.pt"
    done = train([demos], cfg, TrainConfig(**two), straight, cache=cache, progress=False, log=_quiet)
    out = tmp_path / "interrupted.pt"

    def stop_after_first_epoch(msg: str) -> None:
        if msg.startswith("train: epoch 1:"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train([demos], cfg, TrainConfig(**two), out, cache=cache, progress=False, log=stop_after_first_epoch)
    # The last complete checkpoint is under its final name, and the run can go on from it.
    assert read_checkpoint(out)["training"]["epochs_run"] == 1
    assert out.with_name(out.name + ".resume").is_file()
    with pytest.raises(TrainingError, match="other options or other bags"):
        train([demos], cfg, TrainConfig(**dict(two, lr=1e-4)), out, cache=cache, resume=True, progress=False,
              log=_quiet)
    resumed = train([demos], cfg, TrainConfig(**two), out, cache=cache, resume=True, progress=False, log=_quiet)
    assert resumed["final_weights_sha256"] == done["final_weights_sha256"]
    assert resumed["history"]["val_loss"] == done["history"]["val_loss"]
    with pytest.raises(TrainingError, match="--resume: no"):
        train([demos], cfg, TrainConfig(**two), tmp_path / "never.pt", cache=cache, resume=True, progress=False,
              log=_quiet)


def test_modalities_option_masks_the_others_inside_the_network(demos, cfg, cache, tmp_path, make_inputs):
    out = tmp_path / "camera_joints.pt"
    tc = TrainConfig(**QUICK, modalities=("camera", "joint_state"))
    train([demos], cfg, tc, out, cache=cache, progress=False, log=_quiet)
    model = load_checkpoint(out)
    assert model.cfg.modalities == ("camera", "joint_state")
    assert read_checkpoint(out)["training"]["overrides"] == {"model.modalities": ["camera", "joint_state"]}
    inputs = make_inputs(model.cfg, 1, 1)
    changed = dict(inputs, lidar=inputs["lidar"] * 0.1, imu=inputs["imu"] * 5.0)
    with torch.no_grad():
        a, b = model(*inputs.values()), model(*changed.values())
    torch.testing.assert_close(a[0], b[0])
    # And the config the other modalities' checkpoint was trained for is refused by the runtime.
    from mm_fusion_ros.runtime import load_model
    with pytest.raises(ConfigError, match=r"model.modalities"):
        load_model(dataclasses.replace(cfg, checkpoint=str(out)))
    assert trained_config(cfg, tc).model.modalities == ("camera", "joint_state")


def test_torchrun_two_ranks_on_cpu_end_with_identical_weights(demos, cfg, cache, tmp_path, plain_yaml):
    script = tmp_path / "ddp_train.py"
    script.write_text(f"""
import os, sys, torch
sys.path.insert(0, {str(REPO)!r})
from mm_fusion_ros.config import load_config
from mm_fusion_ros.train import TrainConfig, train
torch.set_num_threads(1)
report = train([{str(demos)!r}], load_config({str(plain_yaml)!r}),
               TrainConfig(epochs=1, batch_episodes=1, chunk_ticks=50, val_fraction=0.34, threads=1),
               {str(tmp_path / "ddp.pt")!r}, cache={str(cache)!r}, progress=False, log=lambda m: None)
open(os.path.join({str(tmp_path)!r}, "rank" + os.environ["RANK"] + ".sha"), "w").write(report["final_weights_sha256"])
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                           str(_free_port()), str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = (tmp_path / "rank0.sha").read_text(), (tmp_path / "rank1.sha").read_text()
    assert a == b
    # Trained (not the initial weights), and one checkpoint, from rank 0.
    assert (tmp_path / "ddp.pt").is_file()
    assert json.dumps(read_checkpoint(tmp_path / "ddp.pt")["training"]["world_size"]) == "2"


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_learning_rate_decays_by_a_cosine_from_lr_to_its_final_fraction():
    tc = TrainConfig(epochs=11, lr=1e-3, lr_final=0.1)
    rates = [epoch_lr(tc, e) for e in range(tc.epochs)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert rates[5] == pytest.approx(0.55e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert epoch_lr(dataclasses.replace(tc, lr_final=1.0), 7) == pytest.approx(1e-3)


def test_episodes_their_recording_marked_failed_are_left_out_and_named(episodes):
    failed = dataclasses.replace(episodes[0], name="episode_000099",
                                 meta={**episodes[0].meta, "episode": {"seed": 99, "outcome": "failure",
                                                                       "reason": "timeout"}})
    foreign = dataclasses.replace(episodes[1], name="robot_bag", meta={"bag": "robot_bag"})   # no recorder JSON
    said = []
    kept = successful([*episodes, failed, foreign], False, said.append)
    assert [e.name for e in kept] == [e.name for e in episodes] + ["robot_bag"]
    assert len(said) == 1 and "episode_000099" in said[0] and "timeout" in said[0]
    assert len(successful([*episodes, failed], True, said.append)) == len(episodes) + 1


def test_keyframe_weights_mark_the_ticks_after_each_jump_of_the_command():
    from mm_fusion_ros.dataset import Episode
    from mm_fusion_ros.train import keyframe_weights
    action = np.zeros((300, 7), np.float32)
    action[100:] = 0.5                                          # the cue: the expert starts
    action[100:200, 0] += 0.001 * np.arange(100)                 # then changes smoothly: no jump
    action[250:] = 0.0                                          # and stops at once
    ep = Episode("e", "k", {"action": action}, {})
    tc = TrainConfig(keyframe_weight=10.0, keyframe_ticks=5, keyframe_jump=0.3)
    w = keyframe_weights(ep, np.full(7, 0.25), tc)
    assert set(np.flatnonzero(w > 1)) == set(range(100, 105)) | set(range(250, 255))
    assert np.all(w[w > 1] == 11.0) and np.all(w[w <= 1] == 1.0)


def test_the_task_state_says_where_the_cued_button_is_from_the_cue_on(episodes, cfg):
    """fused_state's supervision: the recorded spec's cued button, and the tool's offset from it computed
    from the aligned joint positions. Checked against the cell itself: the MuJoCo tool tip for those
    joints, and, at the end of a successful demonstration, the tool back above the button it pressed."""
    import mujoco

    from mm_fusion_ros.sim.cell import Cell
    from mm_fusion_ros.sim.config import load_cell_config
    from mm_fusion_ros.sim.task_state import UNITS_PER_M, tool_tips
    from mm_fusion_ros.train import attach_task_state

    assert attach_task_state(episodes, cfg) == len(episodes)
    cell = Cell(load_cell_config(SIM_YAML), render=False)
    js = MODALITIES.index("joint_state")
    for e in episodes:
        spec = e.meta["episode"]["spec"]
        assert spec == cell.reset(spec["seed"]).as_dict()
        a = e.arrays
        moving = np.flatnonzero(np.abs(a["action"]).max(axis=1) > 1e-6)
        assert np.all(e.task_weight[:moving[0]] == 0) and e.task_weight[moving[0]] == 1
        assert e.task_weight[moving[0]:].mean() > 0.99
        bx, by = spec["buttons"][spec["target"]]
        np.testing.assert_allclose(e.task[:, :2], np.tile([bx, by], (e.ticks, 1)) * UNITS_PER_M, atol=1e-5)
        # The FK over the recorded joints is MuJoCo's tool tip for them.
        q = np.asarray(a["joint_state"])[::200, :7]
        for row, tip in zip(q, tool_tips(q)):
            cell.data.qpos[:7] = row                     # the arm's joints come first in the cell's MJCF
            mujoco.mj_kinematics(cell.model, cell.data)
            np.testing.assert_allclose(tip, cell.tcp()[0], atol=1e-4)
        if e.meta["episode"]["outcome"] == "success":
            last = np.flatnonzero(np.asarray(a["mask"])[:, js] > 0.5)[-1]
            assert np.hypot(*e.task[last, 2:4]) / UNITS_PER_M < 0.01     # within 1 cm of the cued button
    # A team's bag without the recorder's spec trains on the actions alone.
    foreign = dataclasses.replace(episodes[0], meta={"bag": "robot_bag"})
    assert attach_task_state([foreign], cfg) == 0 and foreign.task is None


def test_training_reports_the_task_state_error_and_can_leave_it_out(trained, demos, cfg, cache, tmp_path):
    _, off = trained                      # the default: actions alone, no task-state error to report
    assert off["train_config"]["task_state_weight"] == 0.0 and all(np.isnan(off["history"]["val_task_cm"]))
    on = train([demos], cfg, TrainConfig(**QUICK, task_state_weight=1.0), tmp_path / "task.pt", cache=cache,
               progress=False, log=_quiet)
    cm = on["history"]["val_task_cm"]
    assert all(np.isfinite(cm)) and 0 < cm[0] < 100     # centimetres: the button is somewhere on the table
    # The same actions loss, measured on the same ticks, moved by the extra objective.
    assert on["history"]["val_loss"] != off["history"]["val_loss"]
    with pytest.raises(ConfigError, match="--task-state-weight"):
        TrainConfig(task_state_weight=-1).validate()


def test_init_starts_from_a_checkpoint_weights_and_normalisation_kept(trained, demos, cfg, cache, tmp_path):
    """A DAgger round continues the last policy: its weights and its normalisation, not the new data's
    statistics (which would shift every input of a network trained on the old ones)."""
    start, _ = trained
    out = tmp_path / "continued.pt"
    # Another split (one training episode, not two): other statistics, which must not replace the checkpoint's.
    train([demos], cfg, TrainConfig(**{**QUICK, "lr": 1e-12, "val_fraction": 0.67}, init=str(start)), out,
          cache=cache, progress=False, log=_quiet)
    a, b = read_checkpoint(start)["state_dict"], read_checkpoint(out)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert read_checkpoint(out)["training"]["normalization"]["imu_mean"] == pytest.approx(
        read_checkpoint(start)["training"]["normalization"]["imu_mean"], abs=1e-6)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, fused_state_dim=16))
    with pytest.raises(TrainingError, match="--init: .* is another model: model.fused_state_dim"):
        train([demos], other, TrainConfig(**QUICK, init=str(start)), tmp_path / "x.pt", cache=cache,
              progress=False, log=_quiet)
    with pytest.raises(ConfigError, match="--init: no checkpoint"):
        TrainConfig(init=str(tmp_path / "none.pt")).validate()


def test_the_camera_target_is_every_button_and_trains_the_camera_alone(episodes, cfg):
    """--camera-target-weight: each chunk carries its episodes' buttons (the recorded spec, in dm), and the
    probe's loss reaches the camera's convolutions, which behaviour cloning alone barely trained."""
    from mm_fusion_ros.sim.task_state import UNITS_PER_M
    from mm_fusion_ros.train import ObjectProbe, attach_task_state, buttons_per_cell

    attach_task_state(episodes, cfg)
    assert buttons_per_cell(episodes) == 3
    chunk = make_chunk(episodes[:2], 100, 20, cfg.model)
    for b, e in enumerate(episodes[:2]):
        buttons = np.asarray(e.meta["episode"]["spec"]["buttons"], np.float32)
        np.testing.assert_allclose(chunk.objects[b].numpy(), buttons.reshape(-1) * UNITS_PER_M, atol=1e-5)
    assert chunk.objects_valid.tolist() == [1.0, 1.0]
    net = build_model(cfg.model, seed=0)
    probe = ObjectProbe(net.camera.keypoints, chunk.objects.shape[1] // 2)
    *_, objects, _ = SequenceModel(net, objects=probe)(chunk, net.initial_state(2))
    assert objects.shape == (2, 20, chunk.objects.shape[1])
    ((objects - chunk.objects.unsqueeze(1)) ** 2).mean().backward()
    first_conv = net.camera.features[0].weight.grad
    assert first_conv is not None and float(first_conv.abs().sum()) > 0
    assert net.action_head.mlp[0].weight.grad is None    # the probe reads the camera, not the policy's head
    # Recordings of cells with other numbers of buttons cannot share one probe.
    three = dataclasses.replace(episodes[0])
    two = dataclasses.replace(episodes[1], name="two_buttons", meta={"episode": {"spec": {
        **episodes[1].meta["episode"]["spec"], "buttons": episodes[1].meta["episode"]["spec"]["buttons"][:2]}}})
    attach_task_state([three, two], cfg)   # the task state alone has no use for the count
    with pytest.raises(DatasetError, match="different numbers of buttons .*two_buttons"):
        buttons_per_cell([three, two])
    # Without a camera there is nothing for it to train.
    with pytest.raises(ConfigError, match="--camera-target-weight .* camera"):
        trained_config(cfg, TrainConfig(camera_target_weight=1.0, modalities=("audio", "imu", "lidar", "joint_state")))


def test_training_with_the_camera_target_reports_where_the_camera_puts_the_buttons(trained, demos, cfg, cache,
                                                                                   tmp_path):
    _, off = trained
    assert all(np.isnan(off["history"]["val_camera_cm"]))
    # The training-only probe is the camera target's without a cue read (which has its own locator).
    plain = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, fusion=dataclasses.replace(cfg.model.fusion, cue_objects=0)))
    on = train([demos], plain, TrainConfig(**QUICK, camera_target_weight=1.0), tmp_path / "cam.pt", cache=cache,
               progress=False, log=_quiet)
    cm = on["history"]["val_camera_cm"]
    assert all(np.isfinite(cm)) and 0 < cm[0] < 100
    # The probe is training's own: the checkpoint is the policy, loadable as any other.
    assert not any("object" in k for k in read_checkpoint(tmp_path / "cam.pt")["state_dict"])


def test_a_button_is_in_sight_unless_the_tool_is_over_it_and_low():
    """``buttons_in_sight``: a button under the tip, the tip low, is hidden (the hand covers it from the overhead
    camera), and so is one 10 cm aside (the fingers reach that far); the same button with the tip high, and a
    button 20 cm aside, are in sight."""
    from mm_fusion_ros.sim.panda import READY_Q
    from mm_fusion_ros.sim.task_state import IN_SIGHT_HEIGHT_M, buttons_in_sight, tool_tips
    tip = tool_tips(READY_Q[None])[0]
    assert tip[2] > IN_SIGHT_HEIGHT_M
    assert buttons_in_sight(np.array([tip[:2], tip[:2] + [0.0, 0.10]]), READY_Q[None]).all()   # the tip high
    q = np.array(READY_Q, dtype=np.float64)
    while tool_tips(q[None])[0, 2] > IN_SIGHT_HEIGHT_M - 0.02:   # shoulder and elbow forward: the tip goes down
        q[1] += 0.01
        q[3] += 0.005
    low = tool_tips(q[None])[0]
    seen = buttons_in_sight(np.array([low[:2], low[:2] + [0.0, 0.20], low[:2] + [0.03, 0.0], low[:2] + [0.0, 0.10]]),
                            q[None])[0]
    np.testing.assert_array_equal(seen, [False, True, False, False])


def test_camera_pretraining_ignores_frames_that_do_not_show_the_button(episodes, cfg):
    """The pretraining target is each button where its frame shows it: with every frame marked out of sight the
    camera learns nothing (and says so: no error to measure). That it learns from the frames that show them is
    the next test's (``test_camera_pretraining_teaches_the_camera_where_the_buttons_are``)."""
    from mm_fusion_ros.train import ObjectProbe, attach_task_state, pretrain_camera
    attach_task_state(episodes, cfg)
    assert all(e.objects_in_sight.shape == (len(e.arrays["camera_frames"]), len(e.objects) // 2) for e in episodes)
    net = build_model(cfg.model, seed=0)
    probe = ObjectProbe(net.camera.keypoints, 3)
    start = {k: v.detach().clone() for k, v in net.camera.named_parameters()}
    hidden = [dataclasses.replace(e, objects_in_sight=np.zeros_like(e.objects_in_sight)) for e in episodes]
    before, after = pretrain_camera(net, probe, hidden, hidden, 5, np.random.default_rng(0), "cpu", False,
                                    lambda _: None)
    assert np.isnan(before) and np.isnan(after)
    for k, v in net.camera.named_parameters():
        torch.testing.assert_close(v.detach(), start[k])


def test_camera_pretraining_teaches_the_memorys_gate_which_buttons_a_frame_shows(episodes, cfg):
    """With a cue memory, pretraining also fits its gate to the frames' buttons in sight: on frames marked as
    showing none, the gate (open at the start) closes."""
    from conftest import with_strategy
    from mm_fusion_ros.train import attach_task_state, pretrain_camera
    attach_task_state(episodes, cfg)
    net = build_model(with_strategy(cfg.model, "hybrid+cue+tool+memory"), seed=0)
    gate = net.cue_read.gate
    hidden = [dataclasses.replace(e, objects_in_sight=np.zeros_like(e.objects_in_sight)) for e in episodes]
    frames = torch.from_numpy(np.asarray(episodes[0].arrays["camera_frames"][:16]))

    def opening() -> float:
        with torch.no_grad():
            return float(torch.sigmoid(gate(net.camera.encode_reads(frames)[2])).mean())

    assert opening() > 0.9
    logged = []
    pretrain_camera(net, net.cue_read.objects, hidden, hidden, 200, np.random.default_rng(0), "cpu", False,
                    logged.append, gate=gate)
    assert opening() < 0.5
    assert "the memory's gate says which are in sight on" in logged[-1]


def test_camera_pretraining_teaches_the_camera_where_the_buttons_are(episodes, cfg):
    """--camera-pretrain-steps: the camera and the probe alone, on frames from every episode. Measured on
    the frames it trained on (three recorded scenes cannot show generalisation to a fourth): the error
    falls well below the buttons' mean, where the probe starts; the policy's other layers do not move."""
    from mm_fusion_ros.train import ObjectProbe, attach_task_state, pretrain_camera

    attach_task_state(episodes, cfg)
    net = build_model(cfg.model, seed=0)
    probe = ObjectProbe(net.camera.keypoints, len(episodes[0].objects) // 2)
    with torch.no_grad():
        probe.head.bias.copy_(torch.as_tensor(np.mean([e.objects for e in episodes], axis=0)))
    heads = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("camera.")}
    before, after = pretrain_camera(net, probe, episodes, episodes, 150, np.random.default_rng(0), "cpu", False,
                                    _quiet)
    assert before > 1.0 and after < 0.5 * before, (before, after)
    for k, v in net.state_dict().items():
        if k in heads:
            torch.testing.assert_close(v, heads[k], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="--camera-pretrain-steps needs --camera-target-weight"):
        TrainConfig(camera_pretrain_steps=10).validate()


def test_chunks_say_how_long_ago_the_cue_was_for_the_early_keypoint_target(episodes, cfg):
    """--keypoint-target-ticks N keeps the keypoint target to the N ticks from the cue on: each chunk carries
    every tick's age since the task state became known (0 at the expert's first command, -1 before)."""
    from mm_fusion_ros.train import attach_task_state

    attach_task_state(episodes, cfg)
    e = episodes[0]
    onset = int(np.flatnonzero(e.task_weight > 0)[0])
    chunk = make_chunk([e], onset - 5, 20, cfg.model)
    np.testing.assert_array_equal(chunk.task_age[0].numpy(), np.r_[[-1] * 5, np.arange(15)].astype(np.float32))
    later = make_chunk([e], onset + 100, 10, cfg.model)
    np.testing.assert_array_equal(later.task_age[0].numpy(), np.arange(100, 110, dtype=np.float32))
    with pytest.raises(ConfigError, match="--keypoint-target-ticks"):
        TrainConfig(keypoint_target_ticks=-1).validate()


def test_the_cue_target_is_the_named_button_and_trains_the_audio_path_alone(episodes, cfg):
    """--cue-target-weight (model.fusion.cue_objects): each chunk carries which button its episode's tone names
    (the recorded spec), and the cross-entropy on the cue read's belief reaches the microphone's encoder and
    cell but neither the camera nor the joint states: which button cannot be learned from the arm's motion."""
    from mm_fusion_ros.train import attach_task_state

    attach_task_state(episodes, cfg)
    chunk = make_chunk(episodes[:2], 200, 40, cfg.model)
    assert bool((chunk.mask[..., MODALITIES.index("audio")] > 0).all())
    assert chunk.cue.tolist() == [int(e.meta["episode"]["spec"]["target"]) for e in episodes[:2]]
    m = dataclasses.replace(cfg.model, fusion=dataclasses.replace(cfg.model.fusion, cue_objects=3))
    net = build_model(m, seed=0).train()   # the LIF layers' surrogate gradient is training's
    _, _, _, located, cue, objects, _ = SequenceModel(net)(chunk, net.initial_state(2))
    assert cue.shape == (2, 40, 3) and located.shape == (2, 40, 2) and objects.shape == (2, 40, 6)
    named = chunk.cue.unsqueeze(1).expand(-1, 40)
    torch.nn.functional.cross_entropy(cue.flatten(0, 1), named.flatten()).backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    assert float(grads["cue_read.cue.weight"].abs().sum()) > 0
    assert any(g is not None and float(g.abs().sum()) > 0 for k, g in grads.items() if k.startswith("audio."))
    for prefix in ("camera.", "joint_state.", "cue_read.objects.", "action_head."):
        assert all(g is None or float(g.abs().sum()) == 0 for k, g in grads.items() if k.startswith(prefix)), prefix
    # Refused before any work: a weight without the read, the read without audio, a cell of another size.
    without = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, fusion=dataclasses.replace(cfg.model.fusion, cue_objects=0)))
    with pytest.raises(ConfigError, match="--cue-target-weight .*cue_objects"):
        trained_config(without, TrainConfig(cue_target_weight=1.0))
    cued = dataclasses.replace(cfg, model=m)
    with pytest.raises(ConfigError, match="--cue-target-weight .*audio"):
        trained_config(cued, TrainConfig(cue_target_weight=1.0, modalities=("camera", "imu", "lidar", "joint_state")))
    with pytest.raises(ConfigError, match="cue_objects: cannot be set together with .*keypoint_queries"):
        dataclasses.replace(m.fusion, keypoint_queries=2).validate("model.fusion", m.encoder.hidden)


def test_training_the_cue_read_reports_how_often_the_belief_names_the_cued_button(demos, cfg, cache, tmp_path):
    m = dataclasses.replace(cfg.model, fusion=dataclasses.replace(cfg.model.fusion, cue_objects=3))
    cued = dataclasses.replace(cfg, model=m)
    report = train([demos], cued, TrainConfig(**QUICK, cue_target_weight=1.0, camera_target_weight=1.0),
                   tmp_path / "cue.pt", cache=cache, progress=False, log=_quiet)
    for key in ("train_cue_acc", "val_cue_acc"):
        acc = report["history"][key]
        assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0, (key, acc)
    assert np.isfinite(report["history"]["val_camera_cm"]).all()
    # The locator is the policy's own now: in the checkpoint, and loaded with it.
    state = read_checkpoint(tmp_path / "cue.pt")["state_dict"]
    assert "cue_read.objects.head.weight" in state and "cue_read.cue.weight" in state
    two = dataclasses.replace(cfg, model=dataclasses.replace(m, fusion=dataclasses.replace(m.fusion, cue_objects=2)))
    with pytest.raises(DatasetError, match="cue_objects is 2 but the recordings' cell has 3 buttons"):
        train([demos], two, TrainConfig(**QUICK, cue_target_weight=1.0), tmp_path / "two.pt", cache=cache,
              progress=False, log=_quiet)


def test_tool_space_labels_are_the_twists_the_experts_joint_velocities_give():
    """``to_tool_space``: each labelled tick's joint velocities become J(q) qdot at that tick's measured joints,
    in the tool-space head's units; ticks without joint states lose their label; the cached arrays (which a
    joint-space run shares) are not written to."""
    from mm_fusion_ros.dataset import Episode
    from mm_fusion_ros.model.kinematics import tool_twist_to_joints
    from mm_fusion_ros.sim.panda import READY_Q
    from mm_fusion_ros.train import to_tool_space
    rng = np.random.default_rng(0)
    T = 20
    q = READY_Q + rng.normal(0, 0.2, (T, 7))
    twist = rng.normal(0, 0.05, (T, 6))
    # Joint velocities that give exactly these twists (almost no damping) plus a null-space motion.
    qdot = tool_twist_to_joints(torch.tensor(q), torch.tensor(twist), torch.tensor(READY_Q + 0.5)[None], 1.0,
                                1e-5).numpy()
    mask = np.ones((T, len(MODALITIES)), np.float32)
    mask[5, MODALITIES.index("joint_state")] = 0.0
    arrays = {"joint_state": np.concatenate([q, np.zeros_like(q)], axis=1).astype(np.float32),
              "action": qdot.astype(np.float32), "labelled": np.ones(T, np.float32), "mask": mask}
    cached = {k: v.copy() for k, v in arrays.items()}
    e = Episode("e", "k", arrays, {})
    to_tool_space([e], 7)
    assert e.arrays["action"].shape == (T, 6)
    keep = np.arange(T) != 5
    np.testing.assert_allclose(e.arrays["action"][keep], twist[keep], atol=2e-4)   # float32 joints
    assert e.arrays["labelled"][5] == 0 and e.arrays["labelled"][keep].all()
    for k in cached:
        np.testing.assert_array_equal(arrays[k], cached[k])


def test_the_phase_flags_are_read_off_the_experts_twist():
    """``task_phases``: heard from the cue on; holding where the command is exactly still after the cue; clicked
    from the first rise within a centimetre of the cap after the cue, and not for a rise far above it."""
    from mm_fusion_ros.sim.task_state import PHASES, task_phases
    T = 12
    twist = np.zeros((T, 6))
    heard = np.zeros(T)
    heard[3:] = 1
    height = np.full(T, 0.5)            # dm: 5 cm above the cap
    twist[3:5, 2] = 0.06                # rising far above the cap: the approach, not a release
    twist[5:7, 0] = 0.1                 # moving sideways; ticks 7-8 are still: the intruder
    twist[9, 2] = -0.008                # pressing, at the cap
    height[9:] = 0.0
    twist[10:, 2] = 0.06                # rising from the cap: clicked
    flags = task_phases(twist, heard, height)
    assert flags.shape == (T, len(PHASES))
    np.testing.assert_array_equal(flags[:, PHASES.index("cue_heard")], heard)
    np.testing.assert_array_equal(np.flatnonzero(flags[:, PHASES.index("intruder_hold")]), [7, 8])
    np.testing.assert_array_equal(np.flatnonzero(flags[:, PHASES.index("clicked")]), [10, 11])
    # Before the cue nothing holds for an intruder and nothing has clicked, whatever the command.
    assert not task_phases(np.zeros((4, 6)), np.zeros(4), np.zeros(4))[:, 1:].any()


def test_the_press_weighs_the_ticks_on_the_cued_cap_after_the_cue():
    """--press-weight: the extra weight lands on the ticks whose tip is within the press zone of the cap (or
    below its resting top: pressing) once the cue is heard, nowhere else; off, or without a task state, none."""
    from types import SimpleNamespace
    from mm_fusion_ros.sim.task_state import PRESS_ZONE_DM
    from mm_fusion_ros.train import press_weights
    height = np.array([0.5, 0.2, PRESS_ZONE_DM + 0.01, PRESS_ZONE_DM - 0.01, 0.0, -0.05, 0.03])   # dm above the cap
    task = np.zeros((len(height), 5), np.float32)
    task[:, 4] = height
    heard = np.array([1, 1, 1, 1, 1, 1, 0], np.float32)   # the last tick: before the cue (a start low over a cap)
    e = SimpleNamespace(task=task, task_weight=heard)
    np.testing.assert_array_equal(press_weights(e, TrainConfig(press_weight=5.0)), [0, 0, 0, 5, 5, 5, 0])
    assert press_weights(e, TrainConfig()) is None
    assert press_weights(SimpleNamespace(task=None, task_weight=None), TrainConfig(press_weight=5.0)) is None
    with pytest.raises(ConfigError, match="--press-weight"):
        TrainConfig(press_weight=-1.0).validate()


def test_the_click_flag_comes_from_the_recorded_click_where_there_is_one():
    """Where ``mm-fusion record`` wrote when the detent clicked, the clicked flag is on from the first tick that
    can have felt it, whatever the expert's twist says (a policy-driven episode's relabelled rise near the cap is
    no click); a recording that says the button never clicked has no positive; one that does not say falls back
    to the twist."""
    from mm_fusion_ros.sim.task_state import CLICK_FELT_S, PHASES, clicked_ticks, task_phases
    start = 100.0
    t_ns = np.round((start + 0.01 * np.arange(1, 21)) * 1e9).astype(np.int64)   # ticks at 10 ms .. 200 ms
    at = 0.1013                                                                     # clicked 101.3 ms in
    flags = clicked_ticks({"clock_start_s": start, "stats": {"target_clicked_at": at}}, t_ns)
    first = int(np.argmax(flags))
    assert flags[first:].all() and not flags[:first].any()
    assert t_ns[first] >= (start + at + CLICK_FELT_S) * 1e9 > t_ns[first - 1]
    assert not clicked_ticks({"clock_start_s": start, "stats": {"target_clicked_at": None}}, t_ns).any()
    assert clicked_ticks({"seed": 3}, t_ns) is None
    # A rise from the cap in the labels (the expert going back to the point above the button) is no click.
    T = len(t_ns)
    twist, heard, height = np.zeros((T, 6)), np.ones(T), np.zeros(T)
    twist[2:6, 2] = 0.06
    c = PHASES.index("clicked")
    assert task_phases(twist, heard, height)[2:, c].all()
    np.testing.assert_array_equal(task_phases(twist, heard, height, flags)[:, c], flags)


def _task_model(cfg):
    from mm_fusion_ros.sim.panda import READY_Q
    m = cfg.model
    return dataclasses.replace(m, fusion=dataclasses.replace(m.fusion, cue_objects=3),
                               action=dataclasses.replace(m.action, space="tool", reads="task",
                                                          rest=tuple(float(x) for x in READY_Q)))


def test_a_head_that_reads_the_task_learns_from_the_action_alone_and_its_reads_from_their_targets(episodes, cfg):
    """action.reads task: the action's loss trains the head and nothing else (nothing it could learn the arm's
    own motion from); the phase target trains the phase head and the encoders behind the fused vector, not the
    action head."""
    net = build_model(_task_model(cfg), seed=0).train()
    chunk = make_chunk(episodes[:2], 0, 40, net.cfg)
    pred, _, _, _, _, _, phases = SequenceModel(net)(chunk, net.initial_state(2))
    pred.square().sum().backward()
    moved = {k for k, p in net.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert moved and all(k.startswith("action_head.") for k in moved), moved
    net.zero_grad(set_to_none=True)
    pred, _, _, _, _, _, phases = SequenceModel(net)(chunk, net.initial_state(2))
    torch.nn.functional.binary_cross_entropy_with_logits(phases, torch.ones_like(phases)).backward()
    moved = {k for k, p in net.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0}
    assert "phase_head.weight" in moved and any(k.startswith("imu.") for k in moved)
    # Each flag reads its own sensor (PhaseHead): nothing of the camera or the joints, which see the arm's motion.
    assert not any(k.startswith(("camera.", "joint_state.")) for k in moved), moved
    assert not any(k.startswith("action_head.") for k in moved)
    # Nor does it reach where the camera places the buttons, or which one the belief names.
    assert not any(k.startswith("cue_read.") for k in moved), moved


def test_the_intruder_flag_stops_the_tool_where_the_hold_gate_says_and_scales_its_twist_below_that(cfg):
    """action.reads task: the head's twist is (1 - p g) x what it would say, p the intruder flag's probability and
    g the hold gate's (learned from the actions: the expert finishes a press for the intruder); at p = g = 1 the
    tool stands still exactly (what is left is the null-space pull, which moves no tool), at g = 0 the flag
    changes nothing."""
    from mm_fusion_ros.model.kinematics import panda_tool_jacobian
    from mm_fusion_ros.sim.panda import READY_Q
    from mm_fusion_ros.sim.task_state import PHASES
    net = build_model(_task_model(cfg), seed=0).eval()
    head = net.action_head
    read = net.cfg.fusion.cue_objects + 3
    torch.manual_seed(1)
    x = torch.rand(4, read + len(PHASES))
    q = torch.tensor(READY_Q, dtype=torch.float32).repeat(4, 1) + 0.1 * torch.randn(4, 7)
    hold = read + PHASES.index("intruder_hold")
    assert head.hold_feature == hold
    with torch.no_grad():
        head.hold_gate.bias.fill_(50.0)    # the gate sure: the flag alone decides
        for p in (0.0, 0.25, 1.0):
            x[:, hold] = p
            twist = head.mean + head.std * head.normalized(x, q)
            head.hold_feature = None   # what the same head says of the same input, ungated
            free = head.mean + head.std * head.normalized(x, q)
            head.hold_feature = hold
            assert float(free.abs().max()) > 1e-3
            torch.testing.assert_close(twist, (1 - p) * free, atol=1e-6, rtol=1e-5)
        qdot = head(x, q).double()
        tip_speed = panda_tool_jacobian(q.double())[0][:, :3] @ qdot.unsqueeze(-1)
        assert float(tip_speed.abs().max()) < 1e-6
        head.hold_gate.bias.fill_(-50.0)   # where the gate learned that the expert goes on (a press)
        x[:, hold] = 1.0
        twist = head.mean + head.std * head.normalized(x, q)
        head.hold_feature = None
        torch.testing.assert_close(twist, head.mean + head.std * head.normalized(x, q), atol=1e-6, rtol=1e-5)
        head.hold_feature = hold


def test_the_task_head_reads_the_offset_at_two_scales_and_the_tool_rotation_not_where_the_tip_is(cfg):
    """task_inputs: the task features, the tool's rotation, the offset squashed at FINE_M and the height in cm;
    moving the tip (the same rotation, the same task features) changes nothing the head reads."""
    from mm_fusion_ros.model.kinematics import tool_pose_features
    from mm_fusion_ros.model.network import CM_PER_UNIT, FINE_M, task_inputs
    from mm_fusion_ros.sim.panda import READY_Q
    from mm_fusion_ros.sim.task_state import PHASES
    net = build_model(_task_model(cfg), seed=0).eval()
    read = net.cfg.fusion.cue_objects + 3
    task = torch.rand(3, read + len(PHASES))
    task[:, :2] = torch.tensor([[0.01, -0.01], [0.2, 0.0], [-3.0, 1.5]])   # dm: 1 mm, 2 cm, 30 cm off
    tool = tool_pose_features(torch.tensor(READY_Q, dtype=torch.float32).repeat(3, 1), 10.0)
    moved = tool.clone()
    moved[:, :3] += torch.tensor([0.5, -0.3, 0.2])
    x = task_inputs(task, tool)
    torch.testing.assert_close(x, task_inputs(task, moved))
    assert x.shape[1] == net.action_head.mlp[0].in_features
    fine = x[:, -3:]
    torch.testing.assert_close(fine[:, :2], torch.tanh(task[:, :2] / (FINE_M * 10.0)))
    torch.testing.assert_close(fine[:, 2], task[:, 2] * CM_PER_UNIT)
    assert float(fine[0, 0]) == pytest.approx(math.tanh(0.05), rel=1e-5)   # 1 mm resolved
    assert float(fine[2, 0]) < -0.999                                     # 30 cm saturated: the dm copy says it


def test_a_head_that_reads_the_task_is_refused_without_what_it_reads_or_the_targets_that_train_it(cfg):
    m = _task_model(cfg)
    with pytest.raises(ConfigError, match="model.action.reads: task reads the cue read .*space tool"):
        dataclasses.replace(m, action=dataclasses.replace(m.action, space="joint")).validate("model")
    with pytest.raises(ConfigError, match="model.action.reads: task .*cue_objects above 0"):
        dataclasses.replace(m, fusion=dataclasses.replace(m.fusion, cue_objects=0)).validate("model")
    from mm_fusion_ros.train import check_task_targets
    task = dataclasses.replace(cfg, model=m)

    def check(c, tc):
        check_task_targets(trained_config(c, tc).model, tc)
    targets = dict(camera_target_weight=1.0, cue_target_weight=1.0)
    with pytest.raises(ConfigError, match="--phase-target-weight .*model.action.reads task"):
        check(task, TrainConfig(**targets))
    with pytest.raises(ConfigError, match="--phase-target-weight .*model.action.reads task"):
        check(cfg, TrainConfig(phase_target_weight=1.0))
    with pytest.raises(ConfigError, match="learns from camera only through --camera-target-weight"):
        check(task, TrainConfig(phase_target_weight=1.0, cue_target_weight=1.0))
    with pytest.raises(ConfigError, match="learns from audio only through --cue-target-weight"):
        check(task, TrainConfig(phase_target_weight=1.0, camera_target_weight=1.0))
    # Without the microphone there is no belief to train, and nothing to ask for.
    check(task, TrainConfig(phase_target_weight=1.0, camera_target_weight=1.0,
                            modalities=("camera", "imu", "lidar", "joint_state")))
    with pytest.raises(ConfigError, match="--phase-target-weight must be >= 0"):
        TrainConfig(phase_target_weight=-1.0).validate()


def test_training_a_head_that_reads_the_task_reports_its_phase_flags_and_refits_the_head(demos, cfg, cache, tmp_path):
    log: list[str] = []
    task_cfg = dataclasses.replace(cfg, model=_task_model(cfg))
    targets = dict(camera_target_weight=1.0, cue_target_weight=1.0, phase_target_weight=1.0)
    report = train([demos], task_cfg, TrainConfig(**QUICK, **targets, head_steps=150), tmp_path / "task.pt",
                   cache=cache, progress=False, log=log.append)
    epoch = next(line for line in log if line.startswith("train: epoch 1:"))
    assert "phases right" in epoch and "clicked" in epoch, epoch
    net = load_checkpoint(tmp_path / "task.pt")
    assert net.phase_head is not None and net.cfg.action.reads == "task"
    # The head refitted alone on the trained network's inputs to it fits them better than the head the epochs
    # left (the same ticks, unweighted; three episodes are too few for the validation one to say more).
    refit = report["head_refit"]
    assert refit["steps"] == 150 and refit["ticks"] > 0
    assert refit["train_loss_after"] < 0.5 * refit["train_loss_before"], refit
    # --epochs 0 --init: the refit alone, from that checkpoint; the rest of the network is the checkpoint's. With
    # the same seed it gives the same head (the refit starts the head afresh from the seed), with another seed
    # another head and nothing else changed.
    a = read_checkpoint(tmp_path / "task.pt")["state_dict"]
    for seed in (0, 1):
        again = train([demos], task_cfg, TrainConfig(**{**QUICK, "epochs": 0, "seed": seed}, **targets, head_steps=150,
                                                      init=str(tmp_path / "task.pt")),
                      tmp_path / f"refit{seed}.pt", cache=cache, progress=False, log=log.append)
        assert again["head_refit"]["train_loss_after"] < 0.5 * again["head_refit"]["train_loss_before"]
        b = read_checkpoint(tmp_path / f"refit{seed}.pt")["state_dict"]
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        if seed == 0:
            assert not changed, changed
        else:
            assert changed and all(k.startswith("action_head.") for k in changed), changed


def test_head_steps_are_refused_for_a_head_that_reads_the_fused_vector_and_epochs_0_needs_init(cfg):
    from mm_fusion_ros.train import check_task_targets
    with pytest.raises(ConfigError, match="--head-steps refits a head that reads the task"):
        check_task_targets(trained_config(cfg, TrainConfig(head_steps=10)).model, TrainConfig(head_steps=10))
    with pytest.raises(ConfigError, match="--epochs .*0 only to refit"):
        TrainConfig(epochs=0, head_steps=10).validate()
    with pytest.raises(ConfigError, match="--head-steps must be in"):
        TrainConfig(head_steps=-1).validate()


def test_the_head_refit_leaves_out_the_ticks_whose_flags_say_another_phase_than_the_recording(episodes, cfg):
    """head_ticks: a tick where the cue or click flag is on the wrong side of one half is not fitted (its label is
    for a phase the head was not told), every other labelled tick is, whatever the intruder flag says (its target
    is the expert holding still, which it does not while it presses: the hold gate learns that from those)."""
    from mm_fusion_ros.sim.task_state import PHASES
    from mm_fusion_ros.train import attach_task_state, head_ticks, to_tool_space
    task_cfg = dataclasses.replace(cfg, model=_task_model(cfg))
    eps = [dataclasses.replace(e) for e in episodes[:2]]
    to_tool_space(eps, task_cfg.model.action.dof)
    assert attach_task_state(eps, task_cfg) == 2
    net = build_model(task_cfg.model, seed=0)
    tc = TrainConfig(**QUICK)
    with torch.no_grad():   # flags fixed by their biases: the cue heard, the intruder there, no click
        net.phase_head.weight.zero_()
        net.phase_head.bias.copy_(torch.tensor([50.0, 50.0, -50.0]))
    x, y = head_ticks(net, eps, tc, torch.device("cpu"))
    said = np.array([1.0, 1.0, 0.0])
    expected = 0
    for e in eps:
        labelled = np.asarray(e.arrays["labelled"]) > 0
        right = (np.asarray(e.phases)[:, [0, 2]] == said[[0, 2]]).all(axis=1)
        expected += int((labelled & right).sum())
        assert (np.asarray(e.phases)[labelled & right, 1] == 0).any()   # kept though the intruder flag is wrong
    assert 0 < len(y) == expected < sum(int((np.asarray(e.arrays["labelled"]) > 0).sum()) for e in eps)
    assert x.shape == (len(y), net.action_head.mlp[0].in_features) and y.shape == (len(y), 6)
    told = net.cfg.fusion.cue_objects + 3
    np.testing.assert_allclose(x[:, told:told + len(PHASES)].numpy(), np.tile(said, (len(y), 1)), atol=1e-6)
