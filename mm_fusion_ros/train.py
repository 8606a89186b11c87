"""``mm-fusion train``: behaviour cloning of the streaming policy from bags.

The data are what replay feeds the engine (``mm_fusion_ros.dataset``); the
model is the same ``FusionNet`` the engines export. Training respects the
streaming model: a batch is a set of whole episodes, stepped through in
chunks of ``chunk_ticks`` ticks (truncated backpropagation through time) with
the recurrent state carried from chunk to chunk, detached, and the real dt of
every tick. Within a chunk the stateless parts (the encoders and the LIF layers,
whose membranes start at rest every tick, with their surrogate gradient) run on
all ticks at once (the audio windows cut from each episode's log-mel track
after one convolution over it); only the state's part of the CfC cells runs
tick by tick, and the fusion and the heads take all ticks at once again.

Modality dropout masks whole modalities for a chunk, as the runtime's mask
does when a sensor goes silent, so the policy learns to act without it.
Normalisation statistics (IMU, joint state, action) come from the training
episodes and are written into the model's buffers, so they are inside the
checkpoint and the exported engine; no call site normalises anything.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) each rank takes its share
of every epoch's batches and DistributedDataParallel averages gradients (gloo
on CPU, NCCL on CUDA); rank 0 validates and writes the checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .config import MODALITIES, ConfigError, RobotConfig, config_to_dict
from .dataset import DEFAULT_LABEL_TOPIC, DatasetError, Episode, load_episodes
from .model.kinematics import joints_to_tool_twist
from .model.network import ObjectLocator
from .sim.task_state import (PHASES, PRESS_ZONE_DM, TASK_STATE, UNITS_PER_M, buttons_in_sight, clicked_ticks,
                              task_phases, task_state, task_weight)

RESUME_SUFFIX = ".resume"


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, a broken resume file. The last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    strategy: str = ""                 # overrides model.fusion.strategy ("" keeps the config's)
    modalities: tuple[str, ...] = ()   # () keeps model.modalities; else the inputs the network may use
    epochs: int = 40
    seed: int = 0
    batch_episodes: int = 8            # episodes per batch (each stepped through whole)
    chunk_ticks: int = 40              # ticks per truncated-BPTT chunk (0.4 s at 100 Hz)
    lr: float = 5e-4                   # 2e-3 and above measured unstable (the loss stalls at the mean or diverges)
    lr_final: float = 0.1              # cosine decay over the epochs to this fraction of lr (1: constant)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    modality_dropout: float = 0.15     # probability per modality per chunk of masking it whole
    val_fraction: float = 0.1          # of the episodes, held out for validation (at least one)
    patience: int = 8                  # epochs without a better validation loss before stopping
    label_topic: str = DEFAULT_LABEL_TOPIC
    include_failures: bool = False     # also learn from episodes their recorder marked as failed
    keyframe_weight: float = 10.0      # extra loss weight on the ticks just after the expert's command jumps
    keyframe_ticks: int = 10           # how many ticks after the jump
    keyframe_jump: float = 0.3         # a jump: the standardised command's RMS change in one tick above this
    task_state_weight: float = 0.0     # loss weight of fused_state[:5] against the recording's task state (0: off)
    keypoint_target_weight: float = 0.0   # loss weight of the cued button located from the camera keypoints
    keypoint_target_ticks: int = 0     # only on this many ticks from the cue on, before the arm has gone far (0: all)
    camera_target_weight: float = 0.0  # loss weight of every button's position read off the camera keypoints
    camera_pretrain_steps: int = 0     # steps that train the camera on that target alone before cloning
    cue_target_weight: float = 0.0     # loss weight of which button the cue names, from the audio cell (CueRead)
    phase_target_weight: float = 0.0   # loss weight of the phase flags a head that reads the task switches on (PHASES)
    press_weight: float = 0.0          # extra loss weight on the ticks the tool is on the cued cap (press_weights)
    head_steps: int = 0                # after the epochs, refit a task-reading head alone this many steps (refit_head)
    threads: int = 0                   # torch intra-op threads (0: all cores)
    init: str = ""                     # start from this checkpoint's weights and normalisation (DAgger rounds)

    def validate(self) -> None:
        from .config import FusionConfig
        strategies = typing_args(FusionConfig, "strategy")
        if self.strategy and self.strategy not in strategies:
            raise ConfigError(f"--strategy must be one of {list(strategies)}, got {self.strategy!r}")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ConfigError(f"--modalities: unknown modality {m!r}; choose from {', '.join(MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"--modalities lists one twice: {list(self.modalities)}")
        checks = [(1 <= self.epochs <= 100000 or (self.epochs == 0 and self.init and self.head_steps > 0),
                   "--epochs must be in [1, 100000] (0 only to refit the head of an --init checkpoint: --head-steps)"),
                  (0 <= self.head_steps <= 1000000, "--head-steps must be in [0, 1000000]"),
                  (1 <= self.batch_episodes <= 1024, "--batch-episodes must be in [1, 1024]"),
                  (1 <= self.chunk_ticks <= 10000, "--chunk-ticks must be in [1, 10000]"),
                  (0 < self.lr < 1, "--lr must be in (0, 1)"),
                  (0 < self.lr_final <= 1, "--lr-final must be in (0, 1]"),
                  (0 <= self.modality_dropout < 1, "--modality-dropout must be in [0, 1)"),
                  (0 < self.val_fraction < 1, "--val-fraction must be in (0, 1)"),
                  (self.patience >= 1, "--patience must be >= 1"),
                  (self.keyframe_weight >= 0, "--keyframe-weight must be >= 0"),
                  (1 <= self.keyframe_ticks <= 1000, "--keyframe-ticks must be in [1, 1000]"),
                  (self.keyframe_jump > 0, "--keyframe-jump must be > 0"),
                  (self.task_state_weight >= 0, "--task-state-weight must be >= 0"),
                  (self.keypoint_target_weight >= 0, "--keypoint-target-weight must be >= 0"),
                  (self.keypoint_target_ticks >= 0, "--keypoint-target-ticks must be >= 0"),
                  (self.camera_target_weight >= 0, "--camera-target-weight must be >= 0"),
                  (self.cue_target_weight >= 0, "--cue-target-weight must be >= 0"),
                  (self.phase_target_weight >= 0, "--phase-target-weight must be >= 0"),
                  (self.press_weight >= 0, "--press-weight must be >= 0"),
                  (0 <= self.camera_pretrain_steps <= 1000000, "--camera-pretrain-steps must be in [0, 1000000]"),
                  (self.camera_pretrain_steps == 0 or self.camera_target_weight > 0,
                   "--camera-pretrain-steps needs --camera-target-weight above 0: cloning without that target "
                   "unlearns what the pretraining taught"),
                  (self.threads >= 0, "--threads must be >= 0"),
                  (not self.init or Path(self.init).is_file(), f"--init: no checkpoint at {self.init}")]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)


def typing_args(cls, name: str) -> tuple:
    import typing
    return typing.get_args(typing.get_type_hints(cls)[name])


def trained_config(cfg: RobotConfig, tc: TrainConfig) -> RobotConfig:
    """The robot config with what the training command overrides: the strategy, the modalities."""
    model = cfg.model
    if tc.strategy:
        model = dataclasses.replace(model, fusion=dataclasses.replace(model.fusion, strategy=tc.strategy))
    if tc.modalities:
        model = dataclasses.replace(model, modalities=tuple(m for m in MODALITIES if m in tc.modalities))
    model.validate("model")
    if tc.keypoint_target_weight > 0 and model.fusion.keypoint_queries == 0 and model.fusion.cue_objects == 0:
        raise ConfigError("--keypoint-target-weight trains what is read off the camera's keypoints: set "
                          "model.fusion.keypoint_queries or model.fusion.cue_objects above 0, or leave the weight at 0")
    if tc.cue_target_weight > 0 and model.fusion.cue_objects == 0:
        raise ConfigError("--cue-target-weight trains the cue read's belief: set model.fusion.cue_objects to the "
                          "cell's number of buttons, or leave the weight at 0")
    if tc.cue_target_weight > 0 and "audio" not in model.modalities:
        raise ConfigError("--cue-target-weight trains the audio cell: it needs audio among the modalities")
    if tc.camera_target_weight > 0 and "camera" not in model.modalities:
        raise ConfigError("--camera-target-weight trains the camera: it needs camera among the modalities")
    return dataclasses.replace(cfg, model=model)


def check_task_targets(model, tc: TrainConfig) -> None:
    """A head that reads the task, and the targets that train what it reads: refused before any work where
    they do not go together (``train``; eval compares configs through ``trained_config`` without them)."""
    if tc.head_steps > 0 and model.action.reads != "task":
        raise ConfigError("--head-steps refits a head that reads the task (model.action.reads task), whose inputs "
                          f"nothing else trains through it; this model's head reads {model.action.reads!r}")
    if (tc.phase_target_weight > 0) != (model.action.reads == "task"):
        raise ConfigError("--phase-target-weight trains the phase flags that only a head reading the task has: "
                          "set it above 0 with model.action.reads task, and only then")
    if model.action.reads == "task":
        # Cut off from the action's gradient, what the head reads learns from these targets or not at all.
        for name, weight, flag in (("camera", tc.camera_target_weight, "--camera-target-weight"),
                                   ("audio", tc.cue_target_weight, "--cue-target-weight")):
            if name in model.modalities and weight <= 0:
                raise ConfigError(f"model.action.reads task: the cue read learns from {name} only through {flag}; "
                                  "set it above 0")


def overrides_of(tc: TrainConfig) -> dict:
    """What eval must apply to its config to compare it with this checkpoint's model config."""
    out = {}
    if tc.strategy:
        out["model.fusion.strategy"] = tc.strategy
    if tc.modalities:
        out["model.modalities"] = [m for m in MODALITIES if m in tc.modalities]
    return out


def apply_overrides(cfg: RobotConfig, overrides: dict) -> RobotConfig:
    tc = TrainConfig(strategy=overrides.get("model.fusion.strategy", ""),
                     modalities=tuple(overrides.get("model.modalities", ())))
    return trained_config(cfg, tc)


# ---------------------------------------------------------------- data


def split_episodes(episodes: list[Episode], fraction: float) -> tuple[list[Episode], list[Episode]]:
    """(train, validation): every ``1 / fraction``-th episode by name is held out, at least one."""
    if len(episodes) < 2:
        raise DatasetError(f"{len(episodes)} episode(s): at least two are needed to hold one out for validation")
    ordered = sorted(episodes, key=lambda e: e.name)
    n_val = max(1, int(round(fraction * len(ordered))))
    every = len(ordered) / n_val
    val_idx = {min(len(ordered) - 1, int(i * every + every / 2)) for i in range(n_val)}
    return ([e for i, e in enumerate(ordered) if i not in val_idx], [e for i, e in enumerate(ordered) if i in val_idx])


def _silent(_msg: str) -> None:
    pass


def successful(episodes: list[Episode], include_failures: bool, log: Callable[[str], None]) -> list[Episode]:
    """The episodes to clone: those whose recorder (``mm-fusion record``'s JSON beside the bag) did not mark
    them failed. A demonstration that timed out teaches the policy to dither; a team's own bags, without
    that JSON, are all kept."""
    if include_failures:
        return episodes
    def marked_failed(e: Episode) -> bool:
        info = e.meta.get("episode", {})
        # A policy's episode (record --policy, DAgger) is labelled by the expert throughout: its failure
        # is the policy's, and the states that led there are what it has to learn to get out of.
        return info.get("driver") != "policy" and info.get("outcome") not in (None, "success")
    failed = [e for e in episodes if marked_failed(e)]
    if failed:
        reasons = sorted({str(e.meta["episode"].get("reason")) for e in failed})
        log(f"train: leaving out {len(failed)} episode(s) their recording marked failed ({', '.join(reasons)}): "
            f"{', '.join(e.name for e in failed[:8])}{' ...' if len(failed) > 8 else ''} "
            "(--include-failures keeps them)")
    return [e for e in episodes if not marked_failed(e)]


def keyframe_weights(episode: Episode, action_std: np.ndarray, tc: TrainConfig) -> np.ndarray:
    """Per-tick loss weights: 1, plus ``keyframe_weight`` on the ``keyframe_ticks`` ticks from each jump of
    the expert's command (the cue heard, the click felt, the intruder gone).

    Keyframe-focused imitation (Wen et al. 2021) against the copycat a cloned policy becomes: measured here,
    it started moving two ticks *after* the expert did, read from the arm's own motion, and so, in closed
    loop with nobody to start the motion, never started. A two-tick lag is nothing to an unweighted loss
    (the onset is 0.3 % of the ticks); weighted, the onset has to come from the sensors that announce it.
    """
    a = np.asarray(episode.arrays["action"], np.float64) / np.maximum(action_std, 1e-3)
    jump = np.zeros(len(a), bool)
    if len(a) > 1:
        jump[1:] = np.sqrt(np.mean(np.diff(a, axis=0) ** 2, axis=1)) > tc.keyframe_jump
    near = np.convolve(jump.astype(np.float64), np.ones(tc.keyframe_ticks))[:len(a)] > 0
    return (1.0 + tc.keyframe_weight * near).astype(np.float32)


def press_weights(episode: Episode, tc: TrainConfig) -> np.ndarray | None:
    """``press_weight`` on the ticks whose tool tip is within ``PRESS_ZONE_DM`` of the cued cap's resting top, or
    below it, after the cue (None where the recording has no task state, or the weight is 0).

    Why: the expert presses at 8 mm/s there, 0.3 s from the click to the end stop, and pushing faster against
    the detent's spring winds up the servo, which lurches into the stop when the detent gives; measured (README
    item 26), every overtravel of item 26's policy on its DAgger seeds came 0.03-0.08 s after the click, the
    policy pressing at 1-2 cm/s where its labels said 0.3; those ticks are a few % of an episode. Off by default:
    a fine-tune at 10 was no better on 20 episodes (14/20 against 17/20, README item 26)."""
    if tc.press_weight <= 0 or episode.task is None:
        return None
    pressing = (np.asarray(episode.task)[:, 4] < PRESS_ZONE_DM) & (np.asarray(episode.task_weight) > 0)
    return (tc.press_weight * pressing).astype(np.float32)


def to_tool_space(episodes: Sequence[Episode], dof: int) -> None:
    """The joint-velocity labels as the tool twists they give at the measured joints (``joints_to_tool_twist``),
    for a tool-space head (``model.action.space: tool``); ticks without joint states lose their label.
    The expert's null-space motion, which moves no tool, drops out: the head's own null-space pull stands
    for it. The cache keeps the joint labels, so joint- and tool-space runs share one."""
    js = MODALITIES.index("joint_state")
    for e in episodes:
        a = e.arrays
        q = torch.from_numpy(np.asarray(a["joint_state"], np.float64)[:, :dof])
        qdot = torch.from_numpy(np.asarray(a["action"], np.float64))
        present = np.asarray(a["mask"])[:, js] > 0.5
        arrays = dict(a)
        arrays["action"] = joints_to_tool_twist(q, qdot).numpy().astype(np.float32) * present[:, None]
        arrays["labelled"] = (np.asarray(a["labelled"]) * present).astype(np.asarray(a["labelled"]).dtype)
        e.arrays = arrays


def normalization(episodes: Sequence[Episode]) -> dict[str, np.ndarray]:
    """Mean and std of the IMU channels, the joint state and the labelled actions over the ticks
    where each was present."""
    def stats(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate(chunks).astype(np.float64)
        return x.mean(axis=0), x.std(axis=0)
    imu_i, js_i = MODALITIES.index("imu"), MODALITIES.index("joint_state")
    imu = [np.asarray(e.arrays["imu"])[np.asarray(e.arrays["mask"])[:, imu_i] > 0.5].reshape(-1, 6) for e in episodes]
    joints = [np.asarray(e.arrays["joint_state"])[np.asarray(e.arrays["mask"])[:, js_i] > 0.5] for e in episodes]
    actions = [np.asarray(e.arrays["action"])[np.asarray(e.arrays["labelled"]) > 0] for e in episodes]
    out = {}
    for name, chunks in (("imu", imu), ("joint_state", joints), ("action", actions)):
        chunks = [c for c in chunks if len(c)]
        if not chunks:
            raise DatasetError(f"no {name} data in the training episodes: cannot compute its normalisation")
        out[f"{name}_mean"], out[f"{name}_std"] = stats(chunks)
    return out


@dataclass
class Chunk:
    """Ticks [start, start + T) of B episodes, padded; ``valid`` is 0 on padding and unlabelled ticks, else the
    tick's loss weight (``keyframe_weights``).

    Camera frames and LiDAR scans are held once each (a 30 Hz frame serves three ticks, a 10 Hz scan
    ten) with a per-tick index, so their encoders run once per frame as live, not once per tick.
    """

    camera: torch.Tensor        # (U, H, W, 3) uint8: the chunk's distinct frames (row 0: none, zeros)
    camera_index: torch.Tensor  # (B*T,) int64 into camera
    audio_track: torch.Tensor   # (B, n_mels, L): each episode's log-mel frames that the chunk's windows cover
    audio_start: torch.Tensor   # (B*T,) int64: each tick's window start in its row of audio_track (-1: none)
    imu: torch.Tensor           # (B*T, window, 6)
    lidar: torch.Tensor         # (S, beams) distinct scans (row 0: none, zeros)
    lidar_index: torch.Tensor   # (B*T,)
    joint_state: torch.Tensor   # (B*T, 2 dof)
    mask: torch.Tensor          # (B, T, M)
    dt: torch.Tensor            # (B, T, 1)
    action: torch.Tensor        # (B, T, dof)
    valid: torch.Tensor         # (B, T)
    task: torch.Tensor          # (B, T, len(TASK_STATE)): what fused_state[:5] should say (sim.task_state)
    task_valid: torch.Tensor    # (B, T): 1 where the task state is known (after the cue, in a recording with a spec)
    task_age: torch.Tensor      # (B, T): ticks since it became known (0 at the cue's tick; -1: not known)
    objects: torch.Tensor       # (B, 2 N): every button's (x, y) in dm, in the spec's order (zeros: unknown)
    objects_valid: torch.Tensor  # (B,): 1 where the episode's recording says where its buttons are
    cue: torch.Tensor           # (B,) int64: which of them the cue names (-1: unknown)
    phases: torch.Tensor        # (B, T, len(PHASES)): the phase flags (sim.task_state.task_phases)
    phases_valid: torch.Tensor  # (B, T): 1 where they are known (a labelled tick of a recording with a spec)


def _distinct(ep_index: list[tuple[int, np.ndarray]], store_of: Callable[[int], np.ndarray],
              empty: np.ndarray, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows referenced by per-episode tick indices, and each tick's row (0: none)."""
    rows = [empty]
    out = np.zeros((B, T), np.int64)
    for b, index in ep_index:
        seen: dict[int, int] = {}
        for i, k in enumerate(index):
            if k < 0:
                continue
            if k not in seen:
                seen[k] = len(rows)
                rows.append(store_of(b)[k])
            out[b, i] = seen[k]
    return np.stack(rows), out.reshape(-1)


def make_chunk(episodes: Sequence[Episode], start: int, T: int, cfg) -> Chunk:
    m = cfg
    B = len(episodes)
    shape = (m.camera.height, m.camera.width, 3)
    F = m.audio.n_frames
    segments: list[np.ndarray | None] = [None] * B
    audio_start = np.full((B, T), -1, np.int64)
    imu = np.zeros((B, T, m.imu.window_samples, 6), np.float32)
    joints = np.zeros((B, T, 2 * m.action.dof), np.float32)
    mask = np.zeros((B, T, len(MODALITIES)), np.float32)
    dt = np.full((B, T, 1), 0.01, np.float32)
    action = np.zeros((B, T, np.asarray(episodes[0].arrays["action"]).shape[1]), np.float32)   # joints or a twist
    valid = np.zeros((B, T), np.float32)
    task = np.zeros((B, T, len(TASK_STATE)), np.float32)
    task_valid = np.zeros((B, T), np.float32)
    task_age = np.full((B, T), -1.0, np.float32)
    n_obj = next((len(e.objects) for e in episodes if e.objects is not None), 0)
    objects = np.zeros((B, n_obj), np.float32)
    objects_valid = np.zeros(B, np.float32)
    cue = np.full(B, -1, np.int64)
    phases = np.zeros((B, T, len(PHASES)), np.float32)
    phases_valid = np.zeros((B, T), np.float32)
    cam_index, lidar_index = [], []
    for b, ep in enumerate(episodes):
        lo, hi = start, min(start + T, ep.ticks)
        if hi <= lo:
            continue
        n = hi - lo
        a = ep.arrays
        cam_index.append((b, np.asarray(a["camera_index"][lo:hi])))
        lidar_index.append((b, np.asarray(a["lidar_index"][lo:hi])))
        # The frames the chunk's windows span, once: the encoder cuts the windows from them.
        ends = np.asarray(a["audio_index"][lo:hi])
        full = ends >= F - 1
        if full.any():
            first, last = int(ends[full].min()) - (F - 1), int(ends[full].max()) + 1
            segments[b] = np.asarray(a["audio_mel"][:, first:last])
            audio_start[b, :n] = np.where(full, ends - (F - 1) - first, -1)
        imu[b, :n] = a["imu"][lo:hi]
        joints[b, :n] = a["joint_state"][lo:hi]
        mask[b, :n] = a["mask"][lo:hi]
        dt[b, :n, 0] = a["dt"][lo:hi]
        action[b, :n] = a["action"][lo:hi]
        valid[b, :n] = a["labelled"][lo:hi]
        if ep.weight is not None:
            valid[b, :n] *= ep.weight[lo:hi]
        if ep.task is not None:
            task[b, :n] = ep.task[lo:hi]
            task_valid[b, :n] = ep.task_weight[lo:hi]
            known = np.flatnonzero(ep.task_weight > 0)
            if len(known):
                age = np.arange(lo, hi, dtype=np.float32) - known[0]
                task_age[b, :n] = np.where(age >= 0, age, -1.0)
        if ep.objects is not None:
            objects[b], objects_valid[b] = ep.objects, 1.0
            cue[b] = ep.cue
        if ep.phases is not None:
            phases[b, :n] = ep.phases[lo:hi]
            phases_valid[b, :n] = np.asarray(a["labelled"][lo:hi]) > 0
    cams, cam_rows = _distinct(cam_index, lambda b: episodes[b].arrays["camera_frames"], np.zeros(shape, np.uint8),
                               B, T)
    scans, scan_rows = _distinct(lidar_index, lambda b: episodes[b].arrays["lidar_scans"],
                                 np.zeros(m.lidar.beams, np.float32), B, T)
    length = max([F] + [seg.shape[1] for seg in segments if seg is not None])
    track = np.zeros((B, m.audio.n_mels, length), np.float32)
    for b, seg in enumerate(segments):
        if seg is not None:
            track[b, :, :seg.shape[1]] = seg
    flat = lambda x: torch.from_numpy(x.reshape(B * T, *x.shape[2:]))  # noqa: E731
    return Chunk(torch.from_numpy(cams), torch.from_numpy(cam_rows), torch.from_numpy(track),
                 torch.from_numpy(audio_start.reshape(-1)), flat(imu),
                 torch.from_numpy(scans.astype(np.float32)), torch.from_numpy(scan_rows), flat(joints),
                 torch.from_numpy(mask), torch.from_numpy(dt), torch.from_numpy(action), torch.from_numpy(valid),
                 torch.from_numpy(task), torch.from_numpy(task_valid), torch.from_numpy(task_age),
                 torch.from_numpy(objects),
                 torch.from_numpy(objects_valid), torch.from_numpy(cue), torch.from_numpy(phases),
                 torch.from_numpy(phases_valid))


class ObjectProbe(ObjectLocator):
    """Training only (``--camera-target-weight``): every button's (x, y) read linearly off the camera's keypoints.

    Why: cloning the expert alone never trained the camera (README "Where learning stands", item 13: with one
    button the tool went to the same spot wherever the button was), while the same CNN supervised to say
    where the buttons are placed them to 2.7 cm from its keypoints alone. The gradient of the expert's
    joint velocities reaches the CNN through the spike encoder's surrogate and the recurrence, weak and
    late; this target reaches it in one linear layer, on every frame, for every button whether or not it
    is the one the tone names (the pose targets of Levine et al. 2016's visuomotor pretraining). Not part
    of the policy: it is neither saved in the checkpoint nor exported. (With ``model.fusion.cue_objects`` the
    policy has its own locator, ``CueRead.objects``, and the target trains that one instead.)
    """


class SequenceModel(nn.Module):
    """One truncated-BPTT chunk through FusionNet: what DistributedDataParallel wraps."""

    def __init__(self, net, autocast_device: str | None = None, objects: ObjectLocator | None = None):
        super().__init__()
        self.net = net
        self.autocast_device = autocast_device
        self.objects = objects
        self.capture: list | None = None   # a list: each chunk's head inputs are appended (refit_head)

    def forward(self, c: Chunk, state: torch.Tensor) -> tuple:
        """(normalised actions (B, T, dof), fused states (B, T, fused_state_dim), the state after the chunk,
        the cued button located from the camera keypoints (B, T, 2), or None without keypoint queries or a
        cue read, which button the cue names (B, T, N logits), or None without a cue read, every button's
        position from the camera (B, T, 2 N), or None without an ObjectProbe or a cue read, the phase logits
        (B, T, len(PHASES)), or None unless the head reads the task)."""
        net = self.net
        B, T, M = c.mask.shape
        mask = c.mask * net.used.view(1, 1, M)
        episode = torch.arange(B, device=c.mask.device).repeat_interleave(T)
        with torch.autocast(self.autocast_device or "cpu", dtype=torch.bfloat16,
                            enabled=self.autocast_device == "cuda"):
            camera, keypoints, visibility = net.camera.encode_reads(c.camera)
            camera, keypoints = camera[c.camera_index], keypoints[c.camera_index]
            lidar = net.lidar(c.lidar)[c.lidar_index]
            audio = net.audio.track_tokens(c.audio_track, episode, c.audio_start)
            currents = net.stack_tokens(camera, audio, net.imu(c.imu), lidar, net.joint_state(c.joint_state))
            rates = net.lif(currents.float())
        # The recurrence in fp32 (dt = 1e-4 s would vanish in bf16), and only what depends on the
        # state runs tick by tick: the cells' input half, the fusion and the heads take every tick at once.
        drive = net.recur_input(rates.float().view(B, T, M, -1))
        joints = net.measured_joints(c.joint_state, mask.flatten(0, 1))
        pose = None if joints is None else net.action_head.arm_pose(joints)   # as FusionNet.forward: once
        cells, memory = state[:, :M], state[:, M] if net.memory else None
        if memory is not None:   # the cue read's memory: this frame's estimates at once, the gates tick by tick
            camera_slot = MODALITIES.index("camera")
            seen_now = net.cue_read.objects(keypoints.float()).view(B, T, -1)
            visible = visibility[c.camera_index].float().view(B, T, -1)
            tip, tip_present = net.tool_tip(c.joint_state, mask.flatten(0, 1), pose)
            tip, tip_present = tip.view(B, T, 3), tip_present.view(B, T, 1)
        states, memories = [], []
        for k in range(T):
            cells = net.recur_advance(drive[:, k], mask[:, k], c.dt[:, k], cells)
            states.append(cells)
            if memory is not None:
                memory = net.cue_read.remember(memory, seen_now[:, k], visible[:, k],
                                               mask[:, k, camera_slot:camera_slot + 1], tip[:, k], tip_present[:, k])
                memories.append(memory)
        states = torch.stack(states, dim=1).flatten(0, 1)
        state = cells if memory is None else torch.cat([cells, memory.unsqueeze(1)], dim=1)
        memories = torch.stack(memories, dim=1).flatten(0, 1) if memories else None
        fused, _, _ = net.fusion(states, mask.flatten(0, 1))
        fused, reads = net.read_camera(fused, keypoints.float(), mask.flatten(0, 1), states, c.joint_state, pose,
                                       memories)
        located, cue, objects = (x.view(B, T, -1) if x is not None else None for x in reads[:3])
        if objects is None and self.objects is not None:
            objects = self.objects(keypoints.float()).view(B, T, -1)
        head_in, phases = net.head_input(fused, reads, states, currents.float(), mask.flatten(0, 1))
        x = net.action_head.inputs(head_in, joints, pose)
        if self.capture is not None:
            self.capture.append(x.detach())
        return (net.action_head.act(x).view(B, T, -1), net.state_head(fused).view(B, T, -1),
                state, located, cue, objects, None if phases is None else phases.view(B, T, -1))


# ---------------------------------------------------------------- the loop


@dataclass
class History:
    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    ticks_per_s: list[float] = field(default_factory=list)
    train_task_cm: list[float] = field(default_factory=list)   # the task state's RMS error (task_rms_cm)
    val_task_cm: list[float] = field(default_factory=list)
    train_camera_cm: list[float] = field(default_factory=list)   # the camera target's RMS error (ObjectProbe)
    val_camera_cm: list[float] = field(default_factory=list)
    camera_pretrain_cm: list[float] = field(default_factory=list)   # validation, before and after pretraining
    train_cue_acc: list[float] = field(default_factory=list)   # ticks whose cue belief names the cued button
    val_cue_acc: list[float] = field(default_factory=list)


def epoch_lr(tc: TrainConfig, epoch: int) -> float:
    """Cosine from lr at the first epoch to lr * lr_final at the last."""
    if tc.epochs <= 1:
        return tc.lr
    return tc.lr * (tc.lr_final + (1.0 - tc.lr_final) * 0.5 * (1.0 + math.cos(math.pi * epoch / (tc.epochs - 1))))


def _dist() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _batches(episodes: list[Episode], B: int, rng: np.random.Generator, rank: int, world: int) -> list[list[Episode]]:
    order = rng.permutation(len(episodes))
    batches = [[episodes[i] for i in order[k:k + B]] for k in range(0, len(order), B)]
    per_rank = len(batches) // world if world > 1 else len(batches)
    return batches[rank * per_rank:(rank + 1) * per_rank] if world > 1 else batches


def _run_batch(model: nn.Module, net, batch: list[Episode], tc: TrainConfig, targets: tuple, rng, device,
               optimizer=None, world: int = 1, on_chunk: Callable | None = None) -> tuple[float, ...]:
    """Step a batch of episodes through in chunks; returns the actions' (sum of weighted squared errors,
    weighted tick count), the task state's (sum of squared errors, values), the camera target's (the same)
    and the cue target's (ticks whose belief names the cued button, ticks it was asked on), and the phase
    flags' (2, len(PHASES)) ticks said right and ticks, [negatives, positives] (zeros without a phase head)."""
    act_mean, act_std, phase_pos_weight = targets
    T = tc.chunk_ticks
    longest = max(e.ticks for e in batch)
    chunks = math.ceil(longest / T)
    if world > 1:   # every rank must run as many forward/backward passes as the others
        n = torch.tensor([chunks])
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        chunks = int(n)
    state = net.initial_state(len(batch)).to(device)
    train = optimizer is not None
    sse = count = task_sse = task_count = obj_sse = obj_count = cue_hits = cue_count = 0.0
    phase_hits = np.zeros((2, len(PHASES)))     # [negatives, positives] the phase flags said right
    phase_count = np.zeros((2, len(PHASES)))
    K = len(TASK_STATE)
    for k in range(chunks):
        c = make_chunk(batch, k * T, T, net.cfg)
        if train and tc.modality_dropout > 0:
            keep = (rng.random((len(batch), 1, len(MODALITIES))) >= tc.modality_dropout).astype(np.float32)
            c.mask = c.mask * torch.from_numpy(keep)
        c = Chunk(*(getattr(c, f.name).to(device) for f in dataclasses.fields(Chunk)))
        target = (c.action - act_mean) / act_std
        with torch.set_grad_enabled(train):
            pred, fused_state, state, located, cue, objects, phases = model(c, state)
            err = ((pred - target) ** 2).mean(dim=-1) * c.valid
            n = c.valid.sum()
            loss = err.sum() / torch.clamp(n, min=1.0)
            task_err = ((fused_state[..., :K] - c.task) ** 2).sum(dim=-1) * c.task_valid
            task_n = c.task_valid.sum() * K
            if tc.task_state_weight > 0:
                loss = loss + tc.task_state_weight * task_err.sum() / torch.clamp(task_n, min=1.0)
            if tc.keypoint_target_weight > 0:
                # The cued button's (x, y) from the camera's keypoints, where the camera was present. With this
                # weight on, the task error reported is this estimate's, not the fused state's.
                cam = c.mask[..., MODALITIES.index("camera")] * net.used[0, MODALITIES.index("camera")]
                w = c.task_valid * cam
                if tc.keypoint_target_ticks:
                    # Only while the arm has barely moved: later, where it heads says where the button is on the
                    # expert's path, a shortcut that closed loop is the policy's own guess (README item 15).
                    w = w * ((c.task_age >= 0) & (c.task_age < tc.keypoint_target_ticks)).float()
                task_err = ((located - c.task[..., :2]) ** 2).sum(dim=-1) * w
                task_n = w.sum() * 2
                loss = loss + tc.keypoint_target_weight * task_err.sum() / torch.clamp(task_n, min=1.0)
            if objects is not None and c.objects.shape[-1] == objects.shape[-1]:
                # (a cue read's locator without recordings that say where the buttons are: nothing to compare)
                # Every tick that has a frame, whether or not modality dropout masked the camera for the policy.
                w = (c.camera_index.view(objects.shape[:2]) > 0).float() * c.objects_valid.unsqueeze(1)
                obj_err = ((objects - c.objects.unsqueeze(1)) ** 2).sum(dim=-1) * w
                obj_n = w.sum() * objects.shape[-1]
                loss = loss + tc.camera_target_weight * obj_err.sum() / torch.clamp(obj_n, min=1.0)
                obj_sse += float(obj_err.detach().sum())
                obj_count += float(obj_n)
            if cue is not None:
                # Which button the tone names, from the audio cell's state alone, on every tick from the cue on
                # where the microphone was present: a classification the arm's motion cannot answer early on
                # and need not (CueRead).
                audio = c.mask[..., MODALITIES.index("audio")] * net.used[0, MODALITIES.index("audio")]
                known = (c.cue >= 0).float().unsqueeze(1)
                w = c.task_valid * audio * known
                named = torch.clamp(c.cue, min=0).unsqueeze(1).expand(-1, cue.shape[1])
                ce = nn.functional.cross_entropy(cue.flatten(0, 1), named.flatten(), reduction="none").view_as(w)
                if tc.cue_target_weight > 0:
                    loss = loss + tc.cue_target_weight * (ce * w).sum() / torch.clamp(w.sum(), min=1.0)
                cue_hits += float(((cue.argmax(dim=-1) == named).float() * w).sum())
                cue_count += float(w.sum())
            if phases is not None:
                # Each flag's positives weighted up to its negatives' share (the click is ~2 % of the ticks).
                w = c.phases_valid.unsqueeze(-1)
                bce = nn.functional.binary_cross_entropy_with_logits(phases, c.phases, reduction="none",
                                                                     pos_weight=phase_pos_weight)
                loss = loss + tc.phase_target_weight * (bce * w).sum() / torch.clamp(w.sum() * len(PHASES), min=1.0)
                said = ((phases.detach() > 0).float() == c.phases).float() * w
                for v in (0, 1):
                    on = (c.phases == v).float() * w
                    phase_hits[v] += (said * on).sum(dim=(0, 1)).cpu().numpy()
                    phase_count[v] += on.sum(dim=(0, 1)).cpu().numpy()
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({float(loss.detach())}) in chunk {k} (ticks {k * T}..{(k + 1) * T - 1}) "
                                f"of the batch of episodes {[e.name for e in batch]}")
        if train:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
        state = state.detach()
        sse += float(err.detach().sum())
        count += float(n)
        task_sse += float(task_err.detach().sum())
        task_count += float(task_n)
        if on_chunk is not None:
            on_chunk(len(batch) * T, float(loss.detach()))
    return sse, count, task_sse, task_count, obj_sse, obj_count, cue_hits, cue_count, phase_hits, phase_count


def phase_pos_weight(episodes: Sequence[Episode]) -> torch.Tensor:
    """(len(PHASES),) each flag's negatives per positive over the training ticks, in [1, 50]: its positives'
    weight in the phase target."""
    rows = [e.phases[np.asarray(e.arrays["labelled"]) > 0] for e in episodes if e.phases is not None]
    if not rows:
        return torch.ones(len(PHASES))
    p = np.clip(np.concatenate(rows).mean(axis=0), 1e-6, 1.0)
    return torch.tensor(np.clip((1.0 - p) / p, 1.0, 50.0), dtype=torch.float32)


def pct(hits: float, count: float) -> str:
    return f"{100 * hits / count:.0f} %" if count else "-"


def task_rms_cm(task_sse: float, task_count: float) -> float:
    """The task state's RMS error over its dims, in cm (nan where no tick had one)."""
    return math.sqrt(task_sse / task_count) * 100.0 / UNITS_PER_M if task_count else math.nan


def attach_task_state(episodes: Sequence[Episode], cfg: RobotConfig) -> int:
    """Give each episode whose recording carries the cell's episode spec its task state (sim.task_state)
    and its buttons' positions (the camera target); the others (a team's own bags) train on the actions
    alone. Returns how many have one."""
    js = MODALITIES.index("joint_state")
    dof = cfg.model.action.dof
    n = 0
    for e in episodes:
        spec = e.meta.get("episode", {}).get("spec")
        if not spec or dof != 7:
            e.task = e.task_weight = e.objects = e.phases = None
            e.cue = -1
            continue
        e.objects = np.asarray(spec["buttons"], np.float32).reshape(-1) * UNITS_PER_M
        e.cue = int(spec["target"])
        a = e.arrays
        e.objects_in_sight = objects_in_sight(e, spec, dof)
        e.task = task_state(spec, np.asarray(a["joint_state"])[:, :dof])
        e.task_weight = task_weight(a["action"], a["labelled"], np.asarray(a["mask"])[:, js])
        # Read off the tool-space labels (the expert's twist): None in joint space, where no head reads the task.
        e.phases = (task_phases(a["action"], e.task_weight, e.task[:, 4],
                                clicked_ticks(e.meta.get("episode", {}), np.asarray(a["t_ns"])))
                    if np.asarray(a["action"]).shape[1] == 6 else None)
        n += 1
    return n


def objects_in_sight(e: Episode, spec: dict, dof: int) -> np.ndarray:
    """(frames, N) whether each button is clear of the tool in each camera frame (``buttons_in_sight``, at the
    joints of the first tick that frame fed)."""
    index = np.asarray(e.arrays["camera_index"])
    frames = len(e.arrays["camera_frames"])
    fed, first = np.unique(index, return_index=True)   # each frame, and the first tick it fed
    at = np.zeros(frames, np.int64)
    keep = (fed >= 0) & (fed < frames)
    at[fed[keep]] = first[keep]
    joints = np.asarray(e.arrays["joint_state"])[at, :dof]
    return buttons_in_sight(np.asarray(spec["buttons"], np.float64), joints)


def buttons_per_cell(episodes: Sequence[Episode]) -> int:
    """How many buttons the recordings' cell has (the camera target's outputs); refuses recordings of cells
    with different numbers, naming an episode of each."""
    counts: dict[int, str] = {}
    for e in episodes:
        if e.objects is not None:
            counts.setdefault(len(e.objects) // 2, e.name)
    if len(counts) > 1:
        raise DatasetError("the recordings are of cells with different numbers of buttons ("
                           + ", ".join(f"{k} in {name}" for k, name in counts.items())
                           + "): the camera target needs one; train on one cell's recordings")
    return next(iter(counts))


PRETRAIN_BATCH = 64    # frames per camera pretraining step, each from a random tick of a random episode
PRETRAIN_LR = 1e-3


def pretrain_camera(net, probe: ObjectLocator, train_eps: Sequence[Episode], val_eps: Sequence[Episode], steps: int,
                    rng: np.random.Generator, device, show: bool, log: Callable[[str], None],
                    gate: nn.Module | None = None) -> tuple[float, float]:
    """Train the camera's layers and the probe alone to say where every button is, on frames drawn across
    all training episodes; returns the validation RMS error (cm) before and after. ``gate``: the cue memory's
    gate (``CueRead.gate``, from the pixel keypoints' visibility), trained beside them to say which buttons
    the frame shows (a logistic target), where the model has one.

    Why before cloning: during cloning a batch holds a few episodes' consecutive frames, a few scenes per
    step, and the actions' gradients dominate the clipped norm; measured, the camera target alone then
    moved the buttons' error from 8.8 to 8.7 cm in two epochs, while 500 steps of 64 frames from 64 scenes
    took it to 2.9 cm (README "Where learning stands", item 14).

    Only the buttons a frame shows are targets (``Episode.objects_in_sight``): measured (README item 25), on
    every frame the locator placed held-out buttons in sight to 1.53 cm (median, p90 3.13) after 1500 steps,
    on those alone to 0.45 cm (p90 1.05); the cue memory holds them through the frames that do not show them,
    and its gate, trained by the camera target alone through the memory, had not learned to close there
    (the memory 3.4 cm RMS after cloning).
    """
    from tqdm import tqdm

    def frames_of(eps: Sequence[Episode], picks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(eps[e].arrays["camera_frames"][k]) for e, k in picks])
        targets = np.stack([eps[e].objects for e, _ in picks])
        # Per coordinate, 1 where the frame shows that button: what a frame without it says is a guess.
        sight = np.stack([eps[e].objects_in_sight[k] for e, k in picks]).repeat(2, axis=-1).astype(np.float32)
        return (torch.from_numpy(images).to(device), torch.from_numpy(targets).to(device),
                torch.from_numpy(sight).to(device))

    def losses(images, targets, sight) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The squared errors of the buttons in sight, and the gate's logits and targets (per button)."""
        _, keypoints, visibility = net.camera.encode_reads(images)
        err = ((probe(keypoints) - targets) ** 2) * sight
        if gate is None:
            return err, None, None
        # Detached: the gate's target moving the colour filters cost the locator (4.5 cm RMS against 2.1, README
        # item 25); it learns to read the visibility the locator's filters give.
        return err, gate(visibility.detach()), sight[:, ::2]

    gate_hits = [0.0, 0.0]

    def rms_cm(picks) -> float:
        sse = n = 0.0
        gate_hits[:] = [0.0, 0.0]
        with torch.no_grad():
            for k in range(0, len(picks), 256):
                images, targets, sight = frames_of(val_eps, picks[k:k + 256])
                err, logits, shown = losses(images, targets, sight)
                sse += float(err.sum())
                n += float(sight.sum())
                if logits is not None:
                    gate_hits[0] += float(((logits > 0).float() == shown).sum())
                    gate_hits[1] += shown.numel()
        return task_rms_cm(sse, n)

    train_eps = [e for e in train_eps if e.objects is not None and len(e.arrays["camera_frames"])]
    val_eps = [e for e in val_eps if e.objects is not None and len(e.arrays["camera_frames"])]
    if not train_eps:
        raise DatasetError("--camera-pretrain-steps: no training episode has camera frames and the buttons' positions")
    val_picks = [(i, int(k)) for i, e in enumerate(val_eps)
                 for k in np.linspace(0, len(e.arrays["camera_frames"]) - 1, 20).astype(int)]
    before = rms_cm(val_picks) if val_picks else math.nan
    groups = [{"params": list(net.camera.parameters()) + list(probe.parameters())}]
    if gate is not None:
        # A logistic read of fixed features, from a bias of 3 (open): at the camera's rate it would take
        # thousands of steps to move at all.
        groups.append({"params": list(gate.parameters()), "lr": 10 * PRETRAIN_LR})
    optimizer = torch.optim.Adam(groups, lr=PRETRAIN_LR)
    net.train()
    with tqdm(total=steps, desc="camera", unit="step", disable=not show, file=sys.stderr) as bar:
        for _ in range(steps):
            eps = rng.integers(0, len(train_eps), PRETRAIN_BATCH)
            picks = [(int(e), int(rng.integers(0, len(train_eps[e].arrays["camera_frames"])))) for e in eps]
            images, targets, sight = frames_of(train_eps, picks)
            err, logits, shown = losses(images, targets, sight)
            loss = located = err.sum() / torch.clamp(sight.sum(), min=1.0)
            if logits is not None:
                loss = loss + nn.functional.binary_cross_entropy_with_logits(logits, shown)
            if not torch.isfinite(loss):
                raise TrainingError(f"camera pretraining: non-finite loss ({float(loss.detach())})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(cm=f"{math.sqrt(float(located.detach())) * 100.0 / UNITS_PER_M:.1f}")
    after = rms_cm(val_picks) if val_picks else math.nan
    said = f"; the memory's gate says which are in sight on {pct(*gate_hits)} of them" if gate is not None else ""
    log(f"train: camera pretrained for {steps} steps of {PRETRAIN_BATCH} frames: the buttons in sight to {after:.1f} cm RMS "
        f"on the validation episodes (from {before:.1f}){said}")
    return before, after


def start_task_heads_at_the_mean(net, episodes: Sequence[Episode]) -> None:
    """The heads that learn the task state start at its training-set mean (their biases), as the action head
    starts at the labels' mean: the cued button sits ~5 dm in front of the base, and AdamW at lr 5e-4 moves a
    bias ~5e-4 per step, so from zero a head spent its first tens of epochs learning that one number
    (measured: the keypoint estimate 20 cm RMS after 4 epochs, against 12 cm for the mean itself)."""
    rows = [e.task[e.task_weight > 0] for e in episodes if e.task is not None]
    rows = [r for r in rows if len(r)]
    if not rows:
        return
    mean = torch.as_tensor(np.concatenate(rows).mean(axis=0), dtype=torch.float32)
    with torch.no_grad():
        net.state_head.bias[:len(TASK_STATE)] = mean
        if net.keypoint_read is not None:
            net.keypoint_read.locate.bias.copy_(mean[:2])
        objects = [e.objects for e in episodes if e.objects is not None]
        if net.cue_read is not None and objects:   # every button's position: the cue read's locator
            net.cue_read.objects.head.bias.copy_(torch.as_tensor(np.mean(objects, axis=0)))


def train(bags: Sequence[str | Path], cfg: RobotConfig, tc: TrainConfig, out: str | Path, *,
          cache: str | Path | None = None, resume: bool = False, workers: int = 1, plot: str | Path | None = None,
          progress: bool | None = None, log: Callable[[str], None] = print) -> dict:
    """Train on ``bags``; writes the best checkpoint to ``out`` (+ ``out.resume`` while running); returns a report."""
    from tqdm import tqdm

    from .model import build_model, save_checkpoint

    tc.validate()
    cfg = trained_config(cfg, tc)
    check_task_targets(cfg.model, tc)
    out = Path(out)
    rank, world = _dist()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng([tc.seed, rank])
    cache = Path(cache) if cache else cfg.engine.artifact_path / "datasets"
    # Rank 0 builds the cache first; the others then find every bag in it.
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    episodes = load_episodes(bags, cfg, cache, tc.label_topic, workers=workers if rank == 0 else 1,
                             progress=progress if rank == 0 else False, log=log)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    episodes = successful(episodes, tc.include_failures, log if rank == 0 else _silent)
    if cfg.model.action.space == "tool":
        to_tool_space(episodes, cfg.model.action.dof)
    train_eps, val_eps = split_episodes(episodes, tc.val_fraction)
    if world > 1 and len(train_eps) < world * tc.batch_episodes:
        raise DatasetError(f"{len(train_eps)} training episodes cannot give {world} ranks a batch of "
                           f"{tc.batch_episodes} each; lower --batch-episodes")
    stats = normalization(train_eps)
    with_task = (attach_task_state(episodes, cfg)
                 if tc.task_state_weight > 0 or tc.keypoint_target_weight > 0 or tc.camera_target_weight > 0
                 or tc.cue_target_weight > 0 or tc.phase_target_weight > 0 else 0)
    if tc.phase_target_weight > 0 and not with_task:
        raise DatasetError("--phase-target-weight needs recordings of the simulated cell (its episode spec and "
                           "the expert's commands say which phase each tick is in); none of these bags carries one")
    if tc.camera_target_weight > 0 and not with_task:
        raise DatasetError("--camera-target-weight needs recordings that say where the buttons are (the "
                           "simulated cell's episode spec); none of these bags carries one")
    if tc.cue_target_weight > 0 and not with_task:
        raise DatasetError("--cue-target-weight needs recordings that say which button the cue names (the "
                           "simulated cell's episode spec); none of these bags carries one")
    buttons = buttons_per_cell(episodes) if cfg.model.fusion.cue_objects and with_task else 0
    if buttons and buttons != cfg.model.fusion.cue_objects:
        raise DatasetError(f"model.fusion.cue_objects is {cfg.model.fusion.cue_objects} but the recordings' cell has "
                           f"{buttons} buttons: set it to that")
    if with_task and cfg.model.fused_state_dim < len(TASK_STATE):
        raise TrainingError(f"model.fused_state_dim {cfg.model.fused_state_dim} cannot hold the task state's "
                            f"{len(TASK_STATE)} values ({', '.join(TASK_STATE)}); raise it or --task-state-weight 0")
    if with_task and tc.task_state_weight > 0:
        log(f"train: {with_task} of {len(episodes)} episodes carry the cell's task state: fused_state[:"
            f"{len(TASK_STATE)}] learns {', '.join(TASK_STATE)} (dm), weight {tc.task_state_weight}")
    if with_task and tc.keypoint_target_weight > 0:
        reader = "cue read" if cfg.model.fusion.cue_objects else "camera keypoint queries"
        log(f"train: {with_task} of {len(episodes)} episodes carry the cell's task state: the {reader} "
            f"learn{'s' if cfg.model.fusion.cue_objects else ''} to locate the cued button, weight {tc.keypoint_target_weight}")
    net = build_model(cfg.model, seed=tc.seed)
    if tc.init:
        # The earlier policy's function unchanged at the start, normalisation included: new statistics
        # would shift every input and output of a network trained on the old ones.
        from .model import config_mismatch, read_checkpoint
        from .config import model_config_from_dict
        blob = read_checkpoint(tc.init)
        diff = config_mismatch(model_config_from_dict(blob["model_config"]), cfg.model)
        if diff:
            raise TrainingError(f"--init: {tc.init} is another model: " + "; ".join(diff))
        if tc.head_steps > 0:
            # The head is refitted below: one of another shape (an older head) is left at its initial weights.
            own = net.state_dict()
            weights = {k: v for k, v in blob["state_dict"].items()
                       if not (k.startswith("action_head.") and (k not in own or own[k].shape != v.shape))}
            missing = [k for k in net.load_state_dict(weights, strict=False).missing_keys]
            if any(not k.startswith("action_head.") for k in missing):
                raise TrainingError(f"--init: {tc.init} lacks {', '.join(k for k in missing if not k.startswith('action_head.'))}")
        else:
            net.load_state_dict(blob["state_dict"])
        flat = lambda x: x.detach().numpy().reshape(-1).astype(np.float64)  # noqa: E731
        stats = {"imu_mean": flat(net.imu.mean), "imu_std": 1.0 / flat(net.imu.inv_std),
                 "joint_state_mean": flat(net.joint_state.mean), "joint_state_std": 1.0 / flat(net.joint_state.inv_std),
                 "action_mean": flat(net.action_head.mean), "action_std": flat(net.action_head.std)}
        log(f"train: starting from {tc.init} (its weights and normalisation)")
    else:
        net.set_normalization(stats["imu_mean"], stats["imu_std"], stats["joint_state_mean"], stats["joint_state_std"],
                              stats["action_mean"], stats["action_std"])
        if with_task:
            start_task_heads_at_the_mean(net, train_eps)
    probe = None   # the training-only ObjectProbe; a cue read has its own locator, which the camera target trains
    if net.cue_read is not None:
        if tc.camera_target_weight > 0:
            log(f"train: the cue read's locator learns where the {cfg.model.fusion.cue_objects} buttons are from the "
                f"camera's keypoints, weight {tc.camera_target_weight}")
        if tc.cue_target_weight > 0:
            log(f"train: the cue read's belief learns which button the tone names from the audio cell's state, "
                f"weight {tc.cue_target_weight}")
    elif tc.camera_target_weight > 0:
        torch.manual_seed(tc.seed + 1)   # the probe's own draw: the policy's weights do not depend on it
        buttons = buttons_per_cell(episodes)
        probe = ObjectProbe(net.camera.keypoints, buttons, net.camera.pixel_keypoints)
        with torch.no_grad():   # at the buttons' mean, as the task heads start at theirs
            probe.head.bias.copy_(torch.as_tensor(np.mean([e.objects for e in train_eps if e.objects is not None],
                                                          axis=0)))
        log(f"train: the camera learns where the {buttons} buttons are from its keypoints, "
            f"weight {tc.camera_target_weight}")
        probe = probe.to(device)
    locator = probe if probe is not None else net.cue_read.objects if net.cue_read is not None else None
    net = net.to(device)
    for e in episodes:
        e.weight = keyframe_weights(e, stats["action_std"], tc) if tc.keyframe_weight > 0 else None
        press = press_weights(e, tc)
        if press is not None:
            e.weight = (1.0 if e.weight is None else e.weight) + press
    targets = (net.action_head.mean.detach().clone(), net.action_head.std.detach().clone(),
               phase_pos_weight(train_eps).to(device))
    if tc.phase_target_weight > 0:
        log(f"train: the phase flags ({', '.join(PHASES)}) learn from the expert's commands, weight "
            f"{tc.phase_target_weight}; the action head reads them and the cue read, not the fused vector")
    params = list(net.parameters()) + (list(probe.parameters()) if probe is not None else [])
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    history, best, best_epoch, start_epoch, best_state = History(), math.inf, -1, 0, None
    resume_path = out.with_name(out.name + RESUME_SUFFIX)
    if resume:
        if not resume_path.is_file():
            raise TrainingError(f"--resume: no {resume_path} (nothing to resume: train without --resume)")
        blob = torch.load(resume_path, map_location=device, weights_only=True)
        if blob.get("train_config") != config_to_dict(tc) or blob.get("dataset") != sorted(e.key for e in episodes):
            raise TrainingError(f"--resume: {resume_path} was written for other options or other bags; "
                                "resume with the same command, or train afresh")
        net.load_state_dict(blob["state_dict"])
        if probe is not None:
            probe.load_state_dict(blob["object_probe"])
        optimizer.load_state_dict(blob["optimizer"])
        history = History(**blob["history"])
        best, best_epoch, start_epoch = blob["best"], blob["best_epoch"], blob["epoch"] + 1
        best_state = blob["best_state"]
        rng.bit_generator.state = blob["np_rng"]
        torch.set_rng_state(blob["torch_rng"])
        log(f"train: resuming after epoch {blob['epoch']} (best validation loss {best:.4f} at epoch {best_epoch})")
    model: nn.Module = SequenceModel(net, "cuda" if device.type == "cuda" else None, probe)
    if world > 1:
        # find_unused_parameters: the fused-state head is not part of the behaviour-cloning loss.
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    show = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    ticks_per_epoch = sum(e.ticks for e in train_eps)
    wall0 = time.perf_counter()
    log(f"train: {len(train_eps)} training / {len(val_eps)} validation episodes ({ticks_per_epoch} / "
        f"{sum(e.ticks for e in val_eps)} ticks), strategy {cfg.model.fusion.strategy}, modalities "
        f"{','.join(cfg.model.modalities)}, {world} rank(s) on {device}")
    if tc.camera_pretrain_steps and start_epoch == 0:
        # Every rank draws the same frames (the seed's own generator), so their weights stay identical.
        history.camera_pretrain_cm = list(pretrain_camera(net, locator, train_eps, val_eps, tc.camera_pretrain_steps,
                                                          np.random.default_rng([tc.seed, 7]), device, show, log,
                                                          gate=net.cue_read.gate if net.cue_read is not None else None))
    epoch = start_epoch - 1
    for epoch in range(start_epoch, tc.epochs):
        net.train()
        for group in optimizer.param_groups:   # a function of the epoch alone: --resume needs no state for it
            group["lr"] = epoch_lr(tc, epoch)
        t0 = time.perf_counter()
        sse = count = tsse = tcount = osse = ocount = chits = ccount = 0.0
        phits = pcount = vphits = vpcount = 0.0   # the phase flags' (this rank's) [negatives, positives] right
        seen = 0
        batches = _batches(train_eps, tc.batch_episodes, rng, rank, world)
        with tqdm(total=sum(math.ceil(max(e.ticks for e in b) / tc.chunk_ticks) for b in batches) * tc.chunk_ticks
                  * tc.batch_episodes, desc=f"epoch {epoch + 1}/{tc.epochs}", unit="tick", unit_scale=True,
                  disable=not show, file=sys.stderr) as bar:
            def on_chunk(ticks: int, loss: float) -> None:
                nonlocal seen
                seen += ticks
                bar.update(ticks)
                bar.set_postfix(loss=f"{loss:.4f}", ticks_s=f"{seen / max(time.perf_counter() - t0, 1e-9):.0f}")
            for batch in batches:
                out_ = _run_batch(model, net, batch, tc, targets, rng, device, optimizer, world, on_chunk)
                sse, count, tsse, tcount, osse, ocount, chits, ccount = (
                    a + b for a, b in zip((sse, count, tsse, tcount, osse, ocount, chits, ccount), out_[:8]))
                phits, pcount = phits + out_[8], pcount + out_[9]
        elapsed = time.perf_counter() - t0
        if world > 1:   # the epoch's loss over every rank's batches, not this rank's alone
            totals = torch.tensor([sse, count, tsse, tcount, osse, ocount, chits, ccount], dtype=torch.float64)
            torch.distributed.all_reduce(totals)
            sse, count, tsse, tcount, osse, ocount, chits, ccount = (float(x) for x in totals)
        train_loss = sse / max(count, 1.0)
        net.eval()
        vs = vn = vts = vtn = vos = von = vch = vcc = 0.0
        for k in range(0, len(val_eps), tc.batch_episodes):
            out_ = _run_batch(SequenceModel(net, objects=probe), net, val_eps[k:k + tc.batch_episodes], tc, targets,
                              rng, device)
            vs, vn, vts, vtn, vos, von, vch, vcc = (a + b for a, b in zip((vs, vn, vts, vtn, vos, von, vch, vcc), out_[:8]))
            vphits, vpcount = vphits + out_[8], vpcount + out_[9]
        val_loss = vs / max(vn, 1.0)
        history.train_task_cm.append(task_rms_cm(tsse, tcount))
        history.val_task_cm.append(task_rms_cm(vts, vtn))
        history.train_camera_cm.append(task_rms_cm(osse, ocount))
        history.val_camera_cm.append(task_rms_cm(vos, von))
        history.train_cue_acc.append(chits / ccount if ccount else math.nan)
        history.val_cue_acc.append(vch / vcc if vcc else math.nan)
        history.epoch.append(epoch + 1)
        history.train_loss.append(train_loss)
        history.val_loss.append(val_loss)
        history.ticks_per_s.append(seen * world / elapsed if elapsed > 0 else 0.0)
        improved = val_loss < best
        if improved:
            best, best_epoch = val_loss, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        if rank == 0:
            report = _report(cfg, tc, episodes, train_eps, val_eps, history, best, best_epoch, stats, wall0,
                             device, world, epoch + 1)
            best_net = build_model(cfg.model)
            best_net.load_state_dict(best_state)
            save_checkpoint(best_net, out, {"training": report})
            tmp = resume_path.with_name(resume_path.name + ".tmp")
            torch.save({"train_config": config_to_dict(tc), "dataset": sorted(e.key for e in episodes),
                        "state_dict": net.state_dict(), "optimizer": optimizer.state_dict(),
                        "history": dataclasses.asdict(history), "best": best, "best_epoch": best_epoch,
                        "best_state": best_state, "epoch": epoch,
                        "object_probe": probe.state_dict() if probe is not None else None, "np_rng": rng.bit_generator.state,
                        "torch_rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, resume_path)
            if plot:
                plot_history(history, best_epoch, plot, f"{cfg.model.fusion.strategy}: {','.join(cfg.model.modalities)}")
        # After the epoch's checkpoint is in place: an interruption from here on loses nothing of it.
        task = (f", task state {history.train_task_cm[-1]:.1f} / {history.val_task_cm[-1]:.1f} cm RMS"
                if vtn and (tc.task_state_weight > 0 or tc.keypoint_target_weight > 0) else "")
        if von:
            task += f", buttons from the camera {history.train_camera_cm[-1]:.1f} / {history.val_camera_cm[-1]:.1f} cm RMS"
        if vcc:
            task += (f", cue named {100 * history.train_cue_acc[-1]:.0f} / {100 * history.val_cue_acc[-1]:.0f} % of "
                     "the ticks")
        if np.sum(vpcount):
            task += ", phases right (negatives / positives, validation) " + ", ".join(
                f"{name} {pct(vphits[0, i], vpcount[0, i])} / {pct(vphits[1, i], vpcount[1, i])}"
                for i, name in enumerate(PHASES))
        log(f"train: epoch {epoch + 1}: train loss {train_loss:.4f}, validation loss {val_loss:.4f}"
            f"{' (best)' if improved else ''}{task}, {history.ticks_per_s[-1]:.0f} ticks/s")
        if epoch + 1 - best_epoch >= tc.patience:
            log(f"train: no better validation loss for {tc.patience} epochs: stopping (best epoch {best_epoch})")
            break
    report = _report(cfg, tc, episodes, train_eps, val_eps, history, best, best_epoch, stats, wall0, device, world,
                     epoch + 1)
    if tc.head_steps > 0 and rank == 0:
        head_net = build_model(cfg.model)
        head_net.load_state_dict(best_state if best_state is not None else net.state_dict())
        head_net = head_net.to(device)
        report["head_refit"] = refit_head(head_net, train_eps, val_eps, tc, device, show, log)
        save_checkpoint(head_net.cpu(), out, {"training": report})
    # This rank's final weights (not the best epoch's): under DDP every rank must hold the same.
    digest = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        digest.update(k.encode())
        digest.update(v.detach().cpu().contiguous().numpy().tobytes())
    report["final_weights_sha256"] = digest.hexdigest()
    if rank == 0:
        resume_path.unlink(missing_ok=True)   # complete: the checkpoint under its final name is the result
        log(f"train: wrote {out} (best validation loss {best:.4f} at epoch {best_epoch})")
    if world > 1:
        torch.distributed.barrier()
    return report


# The flags whose disagreement with the recording leaves a tick out of the head's refit (head_ticks): the events the
# expert reacts to the moment they happen. Not the intruder flag: its target is the expert holding still, which
# it does not while it presses or lets go, and where the flag (the LiDAR: the intruder is there) says hold, those
# ticks are what teaches the hold gate to finish the press (measured, README item 27: left out, the policy stood
# on a half-pressed cap until the intruder left, the spring pushing the tool back up).
TOLD_RIGHT = torch.tensor([p != "intruder_hold" for p in PHASES])


def head_ticks(net, episodes: Sequence[Episode], tc: TrainConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's inputs (K, F), ``ActionHead.inputs``; the standardised labels (K, 6)) on the labelled ticks of
    ``episodes``, stepped through as training does (chunks, the state carried), no modality dropout; without the
    ticks where the cue or click flag is on the wrong side of one half (where the recording says; ``TOLD_RIGHT``).

    Why those are left out: their label is for a phase the head was not told. The expert rises on the very tick
    the detent clicks; the clicked flag, read off the IMU, comes a tick or two later, and those ticks (a rise of
    6 cm/s where the flags say "pressing") pull the head's press towards a rise the deeper the cap goes, where
    the shallow clicks' rises happen; a slow press there fired the flag without a click (traced). Measured
    (README item 27): left out, seeds 1000-1039 went from 27 to 33 of 40 on the same network."""
    model = SequenceModel(net)
    model.capture = []
    xs, ys = [], []
    mean, std = net.action_head.mean, net.action_head.std
    net.eval()
    with torch.no_grad():
        for i in range(0, len(episodes), tc.batch_episodes):
            batch = episodes[i:i + tc.batch_episodes]
            state = net.initial_state(len(batch)).to(device)
            for k in range(math.ceil(max(e.ticks for e in batch) / tc.chunk_ticks)):
                c = make_chunk(batch, k * tc.chunk_ticks, tc.chunk_ticks, net.cfg)
                c = Chunk(*(getattr(c, f.name).to(device) for f in dataclasses.fields(Chunk)))
                model.capture.clear()
                _, _, state, *_ = model(c, state)
                keep = c.valid.reshape(-1) > 0
                told = net.cfg.fusion.cue_objects + 3
                flags = model.capture[0][:, told:told + len(PHASES)] > 0.5
                wrong = ((flags != (c.phases.reshape(-1, len(PHASES)) > 0.5)) & TOLD_RIGHT.to(flags.device)).any(dim=-1)
                keep = keep & ~(wrong & (c.phases_valid.reshape(-1) > 0))
                xs.append(model.capture[0][keep].float())
                ys.append(((c.action - mean) / std).reshape(-1, c.action.shape[-1])[keep])
    return torch.cat(xs), torch.cat(ys)


def refit_head(net, train_eps: Sequence[Episode], val_eps: Sequence[Episode], tc: TrainConfig, device, show: bool,
               log: Callable[[str], None]) -> dict:
    """Fit a task-reading head (``model.action.reads: task``) afresh on the trained network's own inputs to it:
    ``tc.head_steps`` Adam steps (lr 3e-3, cosine to 0) of 2048 labelled ticks drawn from all the training
    episodes, every tick weighing the same. Returns the validation loss before and after.

    Why a second fit: such a head's inputs are cut off from the action's gradient (``FusionNet.head_input``), so
    nothing else learns through it and it can be fitted on its own, on ticks drawn from the whole set rather
    than the 120 consecutive ticks of a few episodes a training step sees, and away from the clipped gradient
    norm it shares there with the camera's and the flags' targets. Measured (README item 27): the head trained
    with the rest left a validation loss of 0.88 and came down beside the cap in 46 of 200 episodes; the same
    head refitted so, 0.088. Why not the keyframe weights: they are for a head that must start from its own
    sensors (``keyframe_weights``); here the cue flag says when, and at weight 11 the few ticks where the
    clicked flag lags the expert's rise slowed the press with depth (offline, item 27: 0.24 cm/s at 6-12 mm
    deep with them, 0.48 without, the label 0.78)."""
    from tqdm import tqdm

    head = net.action_head
    x_train, y_train = head_ticks(net, train_eps, tc, device)
    x_val, y_val = head_ticks(net, val_eps, tc, device)
    torch.manual_seed(tc.seed + 3)
    head.reset_weights()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, tc.head_steps)
    rng = torch.Generator(device="cpu").manual_seed(tc.seed + 4)

    def loss_on(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((head.act(x) - y) ** 2).mean()) if len(y) else math.nan

    before, train_before = loss_on(x_val, y_val), loss_on(x_train, y_train)
    head.train()
    for _ in tqdm(range(tc.head_steps), desc="head refit", unit="step", disable=not show, file=sys.stderr):
        pick = torch.randint(0, len(y_train), (2048,), generator=rng).to(device)
        loss = ((head.act(x_train[pick]) - y_train[pick]) ** 2).mean()
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite loss ({float(loss)}) refitting the head")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    head.eval()
    after, train_after = loss_on(x_val, y_val), loss_on(x_train, y_train)
    log(f"train: head refitted alone on {len(y_train)} training ticks ({tc.head_steps} steps): validation loss "
        f"(unweighted) {before:.4f} -> {after:.4f}")
    return {"steps": tc.head_steps, "ticks": len(y_train), "val_loss_before": before, "val_loss_after": after,
            "train_loss_before": train_before, "train_loss_after": train_after}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _report(cfg, tc, episodes, train_eps, val_eps, history, best, best_epoch, stats, wall0, device, world, epochs):
    return {
        "train_config": config_to_dict(tc), "overrides": overrides_of(tc),
        "model_config": config_to_dict(cfg.model), "control_rate_hz": cfg.control_rate_hz,
        "dataset": [{"bag": e.meta["bag"], "key": e.key, "seed": e.meta.get("episode", {}).get("seed"),
                     "ticks": e.ticks, "split": "validation" if e in val_eps else "train"} for e in episodes],
        "train_seeds": sorted(s for s in (e.meta.get("episode", {}).get("seed") for e in episodes) if s is not None),
        "history": dataclasses.asdict(history), "best_val_loss": best, "best_epoch": best_epoch, "epochs_run": epochs,
        "normalization": {k: np.asarray(v).tolist() for k, v in stats.items()},
        "wall_s": round(time.perf_counter() - wall0, 1), "device": str(device), "world_size": world,
        "ticks_per_s_median": float(np.median(history.ticks_per_s)) if history.ticks_per_s else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1), "torch": str(torch.__version__),
    }


def plot_history(history: History, best_epoch: int, path: str | Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history.epoch, history.train_loss, label="train")
    ax.plot(history.epoch, history.val_loss, label="validation")
    if best_epoch > 0:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (standardised action MSE)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(loc="upper left")
    cm = [(name, values) for name, values in (("task, validation", history.val_task_cm),
                                              ("buttons from the camera, validation", history.val_camera_cm))
          if values and np.isfinite(values).any()]
    if cm:   # the auxiliary targets' errors on their own axis: centimetres, not standardised actions
        right = ax.twinx()
        for (name, values), style in zip(cm, ("--", "-.")):
            right.plot(history.epoch, values, style, color="black", label=name)
        right.set_ylabel("RMS error (cm)")
        right.legend(loc="center right", fontsize="small")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- CLI


def add_train_command(add: Callable) -> None:
    p = add("train", "train the policy from bags (behaviour cloning through the live aligner)")
    p.add_argument("bags", nargs="+", help="bag folders, or folders of bags (mm-fusion record's OUT_DIR)")
    p.add_argument("--out", required=True, help="the checkpoint to write (best validation loss)")
    p.add_argument("--strategy", default="", help="fusion strategy (default: the config's)")
    p.add_argument("--modalities", default="", help=f"comma-separated subset of {','.join(MODALITIES)}")
    d = TrainConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-episodes", type=int, default=d.batch_episodes)
    p.add_argument("--chunk-ticks", type=int, default=d.chunk_ticks, help="truncated-BPTT length in ticks")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-final", type=float, default=d.lr_final, help="cosine decay to this fraction of --lr")
    p.add_argument("--modality-dropout", type=float, default=d.modality_dropout)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--keyframe-weight", type=float, default=d.keyframe_weight,
                   help="extra loss weight after each jump of the expert's command (0: off)")
    p.add_argument("--keyframe-ticks", type=int, default=d.keyframe_ticks)
    p.add_argument("--init", metavar="CKPT", default="",
                   help="start from this checkpoint (weights and normalisation), e.g. the last DAgger round's policy")
    p.add_argument("--task-state-weight", type=float, default=d.task_state_weight,
                   help="loss weight of fused_state[:5] against the cell's task state (the cued button, the tool's "
                        "offset from it), where a recording carries the episode spec; 0: off")
    p.add_argument("--camera-target-weight", type=float, default=d.camera_target_weight,
                   help="loss weight of every button's position read linearly off the camera keypoints (a "
                        "training-only probe), where a recording carries the spec; 0: off")
    p.add_argument("--camera-pretrain-steps", type=int, default=d.camera_pretrain_steps,
                   help="steps of 64 frames that train the camera on --camera-target-weight's target alone before "
                        "cloning (0: none)")
    p.add_argument("--cue-target-weight", type=float, default=d.cue_target_weight,
                   help="loss weight of which button the tone names, classified from the audio cell's state by the "
                        "cue read (model.fusion.cue_objects > 0), where a recording carries the spec; 0: off")
    p.add_argument("--phase-target-weight", type=float, default=d.phase_target_weight,
                   help="loss weight of the phase flags (cue heard, holding for the intruder, clicked) from the "
                        "fused vector, read off the expert's commands in the cell's recordings; needs "
                        "model.action.reads task; 0: off")
    p.add_argument("--keypoint-target-ticks", type=int, default=d.keypoint_target_ticks,
                   help="the keypoint target only on this many ticks from the cue on (before the arm has gone far, "
                        "so it cannot be met from where the arm heads); 0: every tick")
    p.add_argument("--keypoint-target-weight", type=float, default=d.keypoint_target_weight,
                   help="loss weight of the cued button's position located from what the camera keypoint queries "
                        "read (model.fusion.keypoint_queries > 0), where a recording carries the spec; 0: off")
    p.add_argument("--keyframe-jump", type=float, default=d.keyframe_jump,
                   help="a jump: RMS change of the standardised command in one tick above this")
    p.add_argument("--press-weight", type=float, default=d.press_weight,
                   help="extra loss weight on the ticks the tool is on the cued cap, where the recording carries "
                        "the cell's episode spec (0: off)")
    p.add_argument("--head-steps", type=int, default=d.head_steps,
                   help="after the epochs, refit a task-reading head (model.action.reads task) alone for this many "
                        "steps on the trained network's inputs to it (0: off); with --init and --epochs 0, only that")
    p.add_argument("--label-topic", default=d.label_topic, help="the command topic to learn")
    p.add_argument("--include-failures", action="store_true",
                   help="also learn from episodes the recording marked as failed (left out by default)")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--workers", type=int, default=1, help="processes building the dataset cache")
    p.add_argument("--cache", default="", help="dataset cache folder (default: engine.artifact_dir/datasets)")
    p.add_argument("--plot", default="", help="loss curves PNG (default: OUT with .png)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")


def cmd_train(args, cfg: RobotConfig) -> int:
    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    tc = TrainConfig(strategy=args.strategy, modalities=modalities, epochs=args.epochs, seed=args.seed,
                     batch_episodes=args.batch_episodes, chunk_ticks=args.chunk_ticks, lr=args.lr,
                     lr_final=args.lr_final, modality_dropout=args.modality_dropout, patience=args.patience,
                     keyframe_weight=args.keyframe_weight, keyframe_ticks=args.keyframe_ticks,
                     keyframe_jump=args.keyframe_jump, task_state_weight=args.task_state_weight,
                     keypoint_target_weight=args.keypoint_target_weight,
                     keypoint_target_ticks=args.keypoint_target_ticks,
                     camera_target_weight=args.camera_target_weight,
                     cue_target_weight=args.cue_target_weight, phase_target_weight=args.phase_target_weight,
                     press_weight=args.press_weight, head_steps=args.head_steps, camera_pretrain_steps=args.camera_pretrain_steps,
                     label_topic=args.label_topic, include_failures=args.include_failures, threads=args.threads,
                     init=args.init)
    try:
        tc.validate()
        trained_config(cfg, tc)
    except ConfigError as exc:
        print(f"mm-fusion train: {exc}", file=sys.stderr)
        return 2
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    try:
        report = train(args.bags, cfg, tc, args.out, cache=args.cache or None, resume=args.resume,
                       workers=args.workers, plot=plot)
    except (DatasetError, TrainingError) as exc:
        print(f"mm-fusion train: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: report[k] for k in ("best_val_loss", "best_epoch", "epochs_run", "wall_s",
                                             "ticks_per_s_median", "peak_memory_mb")}))
    return 0
