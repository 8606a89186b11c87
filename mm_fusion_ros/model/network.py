"""The whole fusion network as one streaming step.

``FusionNet.forward`` is a pure function of tensors::

    (camera, audio, imu, lidar, joint_state, mask, dt, state, audio_frames)
        -> (action, fused_state, new_state, attention, contribution, new_audio_frames)

The state between ticks is explicit input and output: ``state`` is one CfC
hidden vector per modality, ``audio_frames`` the log-mel frames of the audio
window (a cache of arithmetic, see ``AudioEncoder``: the step computes only the
newest frames). Nothing is kept in module buffers between calls, so an
exported ONNX/TensorRT engine is stateless and the runtime owns the state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..config import MODALITIES, ActionConfig, ModelConfig, config_to_dict, model_config_from_dict
from ..sim.task_state import IN_SIGHT_HEIGHT_M, IN_SIGHT_LATERAL_M, PHASE_SOURCES, PHASES, UNITS_PER_M
from .fusion import make_fusion
from .kinematics import TOOL_FEATURES, PandaPose, panda_tool_pose, tool_pose_features, tool_twist_to_joints
from .liquid import CfCCells
from .preprocess import AudioEncoder, CameraEncoder, ImuEncoder, JointStateEncoder, LidarEncoder
from .spiking import LeakyIntegrateFire

INPUT_NAMES = ("camera", "audio", "imu", "lidar", "joint_state", "mask", "dt", "state", "audio_frames")
OUTPUT_NAMES = ("action", "fused_state", "new_state", "attention", "contribution", "new_audio_frames")
# /2: five modalities (joint states), normalisation statistics in the weights, training metadata.
CHECKPOINT_FORMAT = "mm_fusion_ros.checkpoint/2"
# The cue memory weighs each frame by its gate to this power (``CueRead.remember``), and by whether the hand is
# clear of the button (``hand_clear``, soft over this many metres).
MEMORY_SHARPNESS = 4
HAND_CLEAR_SOFT_M = 0.01


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def describe(self) -> str:
        return f"{self.name}{list(self.shape)}:{self.dtype}"


def state_slots(cfg: ModelConfig) -> int:
    """Rows of the explicit state: one CfC hidden vector per modality, and the cue read's memory of where the
    buttons are (``model.fusion.cue_memory``) in one more."""
    return len(MODALITIES) + (1 if cfg.fusion.cue_memory else 0)


def input_specs(cfg: ModelConfig, batch: int = 1) -> tuple[TensorSpec, ...]:
    m = len(MODALITIES)
    return (
        TensorSpec("camera", (batch, cfg.camera.height, cfg.camera.width, 3), "uint8"),
        TensorSpec("audio", (batch, cfg.audio.window_samples), "float32"),
        TensorSpec("imu", (batch, cfg.imu.window_samples, 6), "float32"),
        TensorSpec("lidar", (batch, cfg.lidar.beams), "float32"),
        TensorSpec("joint_state", (batch, 2 * cfg.action.dof), "float32"),
        TensorSpec("mask", (batch, m), "float32"),
        TensorSpec("dt", (batch, 1), "float32"),
        TensorSpec("state", (batch, state_slots(cfg), cfg.encoder.hidden), "float32"),
        TensorSpec("audio_frames", (batch, cfg.audio.n_mels, cfg.audio.n_frames), "float32"),
    )


def output_specs(cfg: ModelConfig, batch: int = 1) -> tuple[TensorSpec, ...]:
    m = len(MODALITIES)
    return (
        TensorSpec("action", (batch, cfg.action.dof), "float32"),
        TensorSpec("fused_state", (batch, cfg.fused_state_dim), "float32"),
        TensorSpec("new_state", (batch, state_slots(cfg), cfg.encoder.hidden), "float32"),
        TensorSpec("attention", (batch, m, m), "float32"),
        TensorSpec("contribution", (batch, m), "float32"),
        TensorSpec("new_audio_frames", (batch, cfg.audio.n_mels, cfg.audio.n_frames), "float32"),
    )


# action.reads task: what the head reads beside the task features. Of the tool's pose, its rotation alone (9; the
# tip's height is in the cue read); then the cue read's offset squashed at FINE_M and the tip's height, in cm.
TASK_TOOL_FEATURES = TOOL_FEATURES - 3
FINE_FEATURES = 3
FINE_M = 0.02
CM_PER_UNIT = 100.0 / UNITS_PER_M


def task_inputs(task: torch.Tensor, tool: torch.Tensor) -> torch.Tensor:
    """The task-reading head's input: ``task`` (B, F), ``head_input``'s features (the cue read first: offset (x, y)
    and the tip's height, in ``UNITS_PER_M``), and ``tool`` (B, 12), ``tool_pose_features``.

    Why not the tip's position: the expert's law acts on the button's offset from the tip, the same wherever the
    button is, while on the expert's paths the tip's position also predicts the command (the average path to the
    average button) and a head that reads it blends the two. Why the lengths again at centimetre scale: the law
    switches at centimetres (the descent from 1.5 cm off the button's axis, the press 6 mm above the cap at
    8 mm/s), which in decimetres are differences of 0.06-0.15 that a tanh layer starting at weights of ~0.2
    barely resolves. Measured (README item 27) on item 26's policy's inputs to its head (validation, keyframe-
    weighted loss): its head as trained 0.88, the same head refitted alone 0.088, refitted with these inputs
    and a second hidden layer 0.073, which presses nearer the expert's 8 mm/s; closed loop the refitted heads
    brought the tip over the cap in 40 of 40 episodes, where item 26's came down beside it in 46 of 200."""
    offset, height = task[:, :2], task[:, 2:3]
    fine = torch.cat([torch.tanh(offset / (FINE_M * UNITS_PER_M)), height * CM_PER_UNIT], dim=-1)
    return torch.cat([task, tool[:, 3:], fine], dim=-1)


class ActionHead(nn.Module):
    """Fused vector -> the action: a standardised output, de-standardised and clamped to [lower, upper].

    ``mean``/``std`` are the training labels' statistics (robomimic's way: computed from the training
    set, saved with the weights, applied inside the engine); training fits ``normalized`` to the
    standardised labels, so small commands (a 1 cm/s press) weigh as much as fast approaches.

    ``action.space: tool``: the output is the tool tip's twist (6), read with the tool's pose (from the
    measured joints) beside the fused vector, and turned into joint velocities by damped least squares on
    the Panda's kinematics (``tool_twist_to_joints``); scaled down as a whole where a joint would exceed its
    range, as the expert does, so the direction of the tool's motion is kept. Why: measured (README "Where
    learning stands", item 21), a joint-space head took the policy to within 0.7 cm of the cued button and
    no further; a 1 cm/s press is then a combination of seven joint velocities that depends on every joint,
    which the head had to learn from a few hundred episodes. In tool space it is one number.

    ``action.reads: task``: the head reads ``task_features`` values (``FusionNet.head_input``: the cue read and
    the phase flags) instead of the fused vector (``task_inputs``), and the intruder flag (feature
    ``hold_feature``, a probability p) times the hold gate g scales the tool's twist by (1 - p g): where both are
    sure, the tool stands still exactly.
    Why: the expert's stop is a switch (zero while the intruder is near, whatever else the task wants), which
    an MLP fitting every other phase too only approximates (measured, README item 24: with the flags right on
    93 % of the hold ticks, 6 of 20 episodes ended in a protective-stop violation).
    """

    def __init__(self, dim: int, cfg: ActionConfig, task_features: int = 0, hold_feature: int | None = None):
        super().__init__()
        self.tool = cfg.space == "tool"
        self.hold_feature = hold_feature if cfg.reads == "task" else None
        width = 6 if self.tool else cfg.dof
        self.task = cfg.reads == "task"
        if self.task:
            # The task features, the tool's rotation (not where the tip is: TASK_TOOL_FEATURES) and the lengths
            # again at the press's scale (task_inputs); two hidden layers.
            self.mlp = nn.Sequential(nn.Linear(task_features + TASK_TOOL_FEATURES + FINE_FEATURES, dim), nn.Tanh(),
                                     nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, width))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim + (TOOL_FEATURES if self.tool else 0), dim), nn.Tanh(),
                                     nn.Linear(dim, width))
        # task: whether the intruder flag stops the tool here (a sigmoid of the same inputs, learned from the
        # actions): the expert holds still for the intruder except while it presses or lets go of the button,
        # which it finishes at a creep (sim.expert), because a servo stopped on a clicked button goes on pushing
        # it into its end stop. Starting sure (sigmoid(4) = 0.98): the flag stops the tool until taught otherwise.
        self.hold_gate = None
        if self.task and self.hold_feature is not None:
            self.hold_gate = nn.Linear(task_features + TASK_TOOL_FEATURES + FINE_FEATURES, 1)
            self.start_hold_gate()
        lower = torch.tensor(cfg.lower, dtype=torch.float32).unsqueeze(0)
        upper = torch.tensor(cfg.upper, dtype=torch.float32).unsqueeze(0)
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("upper", upper, persistent=False)
        if self.tool:
            self.null_gain, self.damping = cfg.null_gain, cfg.damping
            self.register_buffer("rest", torch.tensor(cfg.rest, dtype=torch.float32).unsqueeze(0), persistent=False)
            # Until trained: still, 5 cm/s (0.2 rad/s) per unit.
            self.register_buffer("mean", torch.zeros(1, 6))
            self.register_buffer("std", torch.tensor([[0.05] * 3 + [0.2] * 3]))
        else:
            # Until trained: centred in the range, a quarter of its span per unit.
            self.register_buffer("mean", 0.5 * (lower + upper))
            self.register_buffer("std", 0.25 * (upper - lower))

    def start_hold_gate(self) -> None:
        with torch.no_grad():
            self.hold_gate.weight.zero_()
            self.hold_gate.bias.fill_(4.0)

    def reset_weights(self) -> None:
        """Every weight as a new head's would start (``train.refit_head`` fits afresh from here)."""
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
        if self.hold_gate is not None:
            self.start_hold_gate()

    def normalized(self, fused: torch.Tensor, joints: torch.Tensor | None = None,
                   pose: PandaPose | None = None) -> torch.Tensor:
        """The standardised output of what the head reads (``fused``: the fused vector, or ``head_input``'s
        task features); ``joints`` (B, dof), the measured positions, in tool space only, and ``pose``, their
        ``arm_pose`` where the caller has it."""
        return self.act(self.inputs(fused, joints, pose))

    def inputs(self, fused: torch.Tensor, joints: torch.Tensor | None = None,
               pose: PandaPose | None = None) -> torch.Tensor:
        """What the MLP reads (``normalized``'s arguments): a function of the head's input alone, no weights."""
        if self.task:
            return task_inputs(fused, tool_pose_features(joints, UNITS_PER_M, pose))
        return torch.cat([fused, tool_pose_features(joints, UNITS_PER_M, pose)], dim=-1) if self.tool else fused

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised output for ``inputs``' values: all of the head that has weights (``mm-fusion train``
        refits it alone on them, ``train.refit_head``)."""
        out = self.mlp(x)
        if self.hold_feature is None:
            return out
        # Standardised, (1 - p) x the twist is (1 - p) x out - p x mean / std: exactly still at p = 1.
        hold = x[:, self.hold_feature:self.hold_feature + 1]
        if self.hold_gate is not None:
            hold = hold * torch.sigmoid(self.hold_gate(x))
        return (1.0 - hold) * out - hold * (self.mean / self.std)

    def arm_pose(self, joints: torch.Tensor) -> PandaPose:
        """The kinematics a tool-space head works from, in float64: the null-space projector solves with
        J J^T almost undamped, where float32's rounding (torch and ONNX Runtime round differently) reached
        5e-4 rad/s (measured)."""
        return panda_tool_pose(joints.double())

    def forward(self, fused: torch.Tensor, joints: torch.Tensor | None = None,
                pose: PandaPose | None = None) -> torch.Tensor:
        if self.tool and pose is None:
            pose = self.arm_pose(joints)
        out = self.mean + self.std * self.normalized(fused, joints, pose)
        if self.tool:
            out = tool_twist_to_joints(joints.double(), out.double(), self.rest.double(), self.null_gain,
                                       self.damping, pose).to(fused.dtype)
            over = torch.maximum(out / self.upper, out / self.lower).amax(dim=-1, keepdim=True)
            out = out / torch.clamp(over, min=1.0)
        return torch.clamp(out, min=self.lower, max=self.upper)


class KeypointRead(nn.Module):
    """Queries over the camera's keypoints, asked by the fused state or by the audio cell's state
    (``keypoint_query_source``): each query's softmax over the keypoint channels picks image positions,
    which are projected back into the fused vector.

    Why: the cell's cue names a colour and only the camera sees where that colour is, so the action
    needs "the position of the keypoint the tone names", a product of the audio memory and one of
    the camera's channels. Through the modality tokens alone (spike counts, a 64-wide head) the
    policy learned where buttons are but not which one the tone names (README "Where learning
    stands", items 11-12: the nearest button was the cued one in 9-10 of 20 episodes). A query is
    that product in one step, and it reads the keypoint at the spatial softmax's resolution rather
    than through the LIF layer's spike counts (the attention-over-features of FiLM-style task
    conditioning, Perez et al. 2018, turned the other way round: the task picks among features).
    """

    def __init__(self, dim: int, channels: int, queries: int, source: str = "fused"):
        super().__init__()
        self.queries, self.channels, self.source = queries, channels, source
        self.query = nn.Linear(dim, queries * channels)
        self.out = nn.Linear(2 * queries, dim)
        # Training only (``mm-fusion train --keypoint-target-weight``): the cued button's (x, y) in the base
        # frame from what the queries read, an estimate that can come from the camera alone.
        self.locate = nn.Linear(2 * queries, 2)

    def read(self, asking: torch.Tensor, keypoints: torch.Tensor) -> torch.Tensor:
        """(B, queries * 2): the image positions the queries computed from ``asking`` (the fused state, or the
        audio cell's state) pick, each a softmax over the keypoint channels."""
        picks = torch.softmax(self.query(asking).view(-1, self.queries, self.channels), dim=-1)
        return torch.matmul(picks, keypoints).flatten(1)


class ObjectLocator(nn.Module):
    """Every object's (x, y) (dm, base frame) read linearly off the camera's keypoints (B, C, 2) -> (B, 2 N):
    all of them, or the last ``pixel`` (the pixel keypoints, ``model.camera.pixel_keypoints``) where set.

    Why only those where there are some: beside the CNN's keypoints, which fit the training scenes within
    a few hundred steps (and place held-out buttons to 1.7 cm), a linear read learned to lean on them and
    placed visible buttons no better with the pixel keypoints than without (1.69 cm against 1.67, 1000
    pretraining steps); reading the pixel keypoints alone it placed them to 1.0 cm in 1500 (README item 23)."""

    def __init__(self, keypoints: int, objects: int, pixel: int = 0):
        super().__init__()
        self.first = keypoints - pixel if pixel else 0
        self.head = nn.Linear(2 * (keypoints - self.first), 2 * objects)
        # Reading pixel keypoints, the weights must reach the camera's scale (3.3 dm of table per unit of
        # image coordinate), out of reach of lr 1e-3 in a few thousand steps: the head acts as ``gain`` x its
        # weights (initialised that much smaller), as CameraEncoder's pixel filter does.
        self.gain = 10.0 if pixel else 1.0
        if pixel:
            with torch.no_grad():
                self.head.weight.div_(self.gain)

    def forward(self, keypoints: torch.Tensor) -> torch.Tensor:
        out = self.head(keypoints[..., self.first:, :].flatten(-2))
        if self.gain == 1.0:
            return out
        # Only the weights are scaled (the bias starts at the buttons' mean, start_task_heads_at_the_mean).
        return out + (self.gain - 1.0) * (out - self.head.bias)


class PhaseHead(nn.Module):
    """Each phase flag's logit (``sim.task_state.PHASES``) read linearly off the one sensor that can tell
    (``PHASE_SOURCES``): off its cell's state where the flag is a memory (the cue has played, the detent has
    clicked), off this tick's input current (its encoder's token) where it is a fact of now (``NOW``: the
    intruder in the field). (B, M, D) cells and currents -> (B, len(PHASES)).

    Why not off the fused vector: the flags' targets come from the expert's command (still for the intruder),
    and the fused vector carries the arm's own motion (IMU, joint velocities), so a head on it learned "the arm
    is still, so hold": measured (README item 25), closed loop the intruder flag rose to 0.98 as the arm slowed
    above the button, 2.5 s into the episode, and stayed there with no intruder near, the arm held by it.
    Why the LiDAR's token and not its cell: read off the cell, the flag was right on none of the held ticks
    after 6 epochs (README item 25)."""

    NOW = ("intruder_hold",)

    def __init__(self, dim: int):
        super().__init__()
        m = len(MODALITIES)
        source = [MODALITIES.index(s) + (m if p in self.NOW else 0) for p, s in zip(PHASES, PHASE_SOURCES)]
        self.register_buffer("source", torch.tensor(source), persistent=False)
        self.register_buffer("sensor", torch.tensor([MODALITIES.index(s) for s in PHASE_SOURCES]), persistent=False)
        self.weight = nn.Parameter(torch.randn(len(PHASES), dim) / dim ** 0.5)
        self.bias = nn.Parameter(torch.zeros(len(PHASES)))

    def forward(self, cells: torch.Tensor, currents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` (B, M): a masked sensor's held state and stale input say nothing, and its flag is its bias."""
        read = torch.cat([cells, currents], dim=1).index_select(1, self.source)
        present = mask.index_select(1, self.sensor).unsqueeze(-1) > 0.5
        return (torch.where(present, read, torch.zeros_like(read)) * self.weight).sum(dim=-1) + self.bias


def hand_clear(tip: torch.Tensor, buttons_m: torch.Tensor) -> torch.Tensor:
    """(B, N) in [0, 1]: whether the hand is clear of each button in the overhead camera's view, the soft form of
    ``sim.task_state.buttons_in_sight`` (the tool tip more than ``IN_SIGHT_LATERAL_M`` aside of it, or higher
    than ``IN_SIGHT_HEIGHT_M``; 1 cm soft). ``tip`` (B, 3) and ``buttons_m`` (B, N, 2) in metres."""
    tip = tip.to(buttons_m.dtype)
    lateral = torch.linalg.vector_norm(buttons_m - tip[:, None, :2], dim=-1)
    over = torch.sigmoid((IN_SIGHT_LATERAL_M - lateral) / HAND_CLEAR_SOFT_M)
    low = torch.sigmoid((IN_SIGHT_HEIGHT_M - tip[:, 2:3]) / HAND_CLEAR_SOFT_M)
    return 1.0 - over * low


class CameraReads(NamedTuple):
    """What training supervises of the camera reads (None where the model has no such read), and the cue
    read's values themselves."""

    located: torch.Tensor | None   # (B, 2) the cued object's (x, y), dm
    cue: torch.Tensor | None       # (B, N) logits: which object the cue names
    objects: torch.Tensor | None   # (B, 2 N) every object's (x, y), dm
    read: torch.Tensor | None = None   # (B, 3 + N) the cue read: offset from the tool (2), tool height, belief (N)


class CueRead(nn.Module):
    """The button a tone names, as a product of two reads each with one source (``model.fusion.cue_objects``).

    The camera's keypoints give every button's (x, y) (``ObjectLocator``), the audio cell's state alone a
    belief over which of them the cue names (a softmax), and their product the named button's position;
    its offset from the tool tip (the Panda's published kinematics over the measured joints) and the tool's
    height enter the fused vector, with the belief.

    Why: every target that asked the network where the cued button is could be met from where the arm was
    heading on the expert's path (README "Where learning stands", items 15-16: the estimate nearest the
    cued button in 29 of 30 episodes with the expert's help, 6 of 20 without). Here neither factor can see
    the arm's motion: the positions are a function of one frame, indexed by colour, and which colour a
    function of the microphone's cell, trained as a classification (``mm-fusion train
    --cue-target-weight``). The offset from the tool is what the expert's IK acts on.
    """

    def __init__(self, dim: int, keypoints: int, objects: int, memory_from: int = 0, pixel: int = 0,
                 detach: bool = False):
        super().__init__()
        self.n = objects
        # action.reads task: the read enters the fused vector cut off from its gradient, so that the camera's
        # locator (and the belief) learn from their own targets alone (``FusionNet.head_input``).
        self.detach = detach
        self.objects = ObjectLocator(keypoints, objects, pixel)
        self.cue = nn.Linear(dim, objects)
        self.out = nn.Linear(objects + 3, dim)
        # cue_memory: how much each frame counts for each button's held estimate, from the pixel keypoints'
        # visibility (``CameraEncoder.encode_reads``). Starting open (sigmoid(3) = 0.95): at first every frame
        # counts, and pretraining closes a gate where its frame does not show the button.
        self.gate = None
        if memory_from:
            self.gate = nn.Linear(memory_from, objects)
            with torch.no_grad():
                self.gate.bias.fill_(3.0)

    def remember(self, memory: torch.Tensor, objects: torch.Tensor, visibility: torch.Tensor,
                 camera_present: torch.Tensor, tip: torch.Tensor | None = None,
                 tip_present: torch.Tensor | None = None) -> torch.Tensor:
        """The memory slot (B, D) after one frame: ``[:2 N]`` every button's held (x, y), ``[2 N]`` whether
        anything has been seen since the reset, ``[2 N + 1:3 N + 1]`` each button's weight so far.

        Each held estimate is the running mean of the frames' estimates, each frame weighted by its gate (how
        sure the gate is that the frame shows that button) to the ``MEMORY_SHARPNESS``-th power: the buttons
        do not move within an episode, so every frame that shows one says the same thing, and averaging them
        takes out the locator's per-frame scatter. The first frame after a reset replaces the estimates whatever
        its gate (and counts with its own weight, so that one which hid a button is soon outweighed); a masked
        camera moves nothing.

        Why a mean and not a gated step towards each frame (the memory before, an exponential average): the
        tool hovers over the cued cap for a hundred ticks or more, and a gate only mostly shut on those frames
        let the estimate follow them, to where the hidden colour's soft-argmax lands. Measured offline
        (``bench/cue_memory.py``, README item 26) on the validation episodes, with the camera and gate of item
        26's policy: while the tool was near the cued button and low, the exponential average held it 11.2 cm
        off (median), this mean 0.28 cm (p90 0.55). Why the power: a frame the gate is 10 % sure of still pulls
        the mean, over as many ticks as the tool hovers; with the gate itself (power 1) and no hand clearance
        (below) the same mean held it 0.96 cm off (p90 2.42).

        ``tip`` (B, 3; m, base frame), the tool tip at the measured joints where ``tip_present`` (B, 1): a frame
        counts for a button only while the hand is clear of it (``hand_clear``), whatever the gate says. Why: the
        gate reads the colour's visibility, which a cap partly under the fingers still shows; on a checkpoint
        with three pixel keypoints (README item 26) it stayed open (0.91, median) on frames where the hand hid
        the cued cap, whose estimates were 7.7 cm off. The hand's position is known from the joints. On item
        26's policy and the expert's episodes the power and the clearance each do the same work: either alone
        holds the button 0.28 cm off (p90 0.55), neither 0.96 cm; both are kept, the clearance for the states a
        policy reaches that the gate was not trained on. Without the joints (masked, or a model without them)
        the gate alone decides."""
        n, n2 = self.n, 2 * self.n
        held, seen, total = memory[:, :n2], memory[:, n2:n2 + 1], memory[:, n2 + 1:n2 + 1 + n]
        present = camera_present > 0.5
        weight = torch.sigmoid(self.gate(visibility)) ** MEMORY_SHARPNESS
        if tip is not None:
            clear = hand_clear(tip, held.view(-1, n, 2) / UNITS_PER_M)
            if tip_present is not None:
                clear = torch.where(tip_present > 0.5, clear, torch.ones_like(clear))
            # Before anything is held the distance is to nowhere: the first frame is taken whole below anyway.
            weight = weight * torch.where(seen > 0.5, clear, torch.ones_like(clear))
        # A masked frame may hold anything, NaN included: select, do not multiply.
        weight = torch.where(present, weight, torch.zeros_like(weight))
        total = total + weight
        # The first frame is taken whole; with its own weight, so a frame that hid the button is soon outweighed.
        step = torch.where(seen > 0.5, weight / torch.clamp(total, min=1e-12), torch.ones_like(weight))
        step = step.repeat_interleave(2, dim=-1)
        moved = torch.where(present, objects - held, torch.zeros_like(held))
        held = held + step * moved
        seen = torch.where(present, torch.ones_like(seen), seen)
        return torch.cat([held, seen, total, memory[:, n2 + 1 + n:]], dim=-1)

    def forward(self, fused: torch.Tensor, keypoints: torch.Tensor, audio_state: torch.Tensor,
                joint_positions: torch.Tensor, present: torch.Tensor,
                tip: torch.Tensor | None = None, objects: torch.Tensor | None = None) -> tuple[torch.Tensor, CameraReads]:
        """``tip``: the tool tip (m) at ``joint_positions`` where the caller has it (any value where
        ``present`` is off: nothing is read then). ``objects``: the buttons' (x, y) to read (the memory's),
        where not this frame's."""
        if objects is None:
            objects = self.objects(keypoints)
        logits = self.cue(audio_state)
        belief = torch.softmax(logits, dim=-1)
        located = torch.matmul(belief.unsqueeze(1), objects.view(-1, self.n, 2)).squeeze(1)
        # A masked sensor's data may be anything, NaN included, and NaN * 0 is NaN: select, do not multiply.
        keep = present > 0.5
        if tip is None:
            tip = panda_tool_pose(torch.where(keep, joint_positions, torch.zeros_like(joint_positions))).tip
        tip = tip.to(fused.dtype) * UNITS_PER_M
        read = torch.cat([located - tip[:, :2], tip[:, 2:3], belief], dim=-1)
        read = torch.where(keep, read, torch.zeros_like(read))
        return fused + self.out(read.detach() if self.detach else read), CameraReads(located, logits, objects, read)


class FusionNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.encoder.hidden
        enc = cfg.encoder
        self.camera = CameraEncoder(cfg.camera, dim)
        self.audio = AudioEncoder(cfg.audio, dim)
        self.imu = ImuEncoder(cfg.imu, dim)
        self.lidar = LidarEncoder(cfg.lidar, dim)
        self.joint_state = JointStateEncoder(cfg.action.dof, dim, cfg.joint_velocity)
        self.lif = LeakyIntegrateFire(enc.beta, enc.threshold, enc.num_spike_steps)
        # Each token is standardised and then scaled into the LIF layer's working range before it becomes
        # a current: between the first onset (one spike in num_spike_steps, ~0.06 x threshold for the
        # defaults) and the threshold (a spike every step). Unscaled encoder outputs sit mostly below the
        # first onset, where a neuron never fires and its surrogate gradient all but vanishes: measured,
        # 70-80 % of the camera's and audio's neurons silent at initialisation and all of them after
        # training, so the policy could not learn to use those sensors. Per-modality gain and offset,
        # learned, starting at half the threshold.
        self.current_gain = nn.Parameter(torch.full((len(MODALITIES), dim), 0.5 * enc.threshold))
        self.current_offset = nn.Parameter(torch.full((len(MODALITIES), dim), 0.5 * enc.threshold))
        self.cells = CfCCells(len(MODALITIES), dim, dim, enc.cfc_mode, enc.backbone_units, enc.backbone_layers)
        self.fusion = make_fusion(cfg.fusion.strategy, dim, len(MODALITIES), cfg.fusion.heads,
                                  cfg.fusion.rank)
        # action.reads task: which phase of the task it is (PHASES), each from its own sensor (PhaseHead), trained by
        # its own target (``mm-fusion train --phase-target-weight``) and read by the action head (``head_input``).
        self.phase_head = PhaseHead(dim) if cfg.action.reads == "task" else None
        read = cfg.fusion.cue_objects + 3      # head_input: the cue read, then the phase flags
        self.action_head = ActionHead(dim, cfg.action, read + len(PHASES), read + PHASES.index("intruder_hold"))
        used = torch.tensor([1.0 if m in cfg.modalities else 0.0 for m in MODALITIES]).unsqueeze(0)
        self.register_buffer("used", used, persistent=False)
        self.state_head = nn.Linear(dim, cfg.fused_state_dim)
        self.keypoint_read = KeypointRead(dim, self.camera.keypoints, cfg.fusion.keypoint_queries,
                                          cfg.fusion.keypoint_query_source) \
            if cfg.fusion.keypoint_queries > 0 else None
        self.cue_read = CueRead(dim, self.camera.keypoints, cfg.fusion.cue_objects,
                                memory_from=cfg.camera.pixel_keypoints if cfg.fusion.cue_memory else 0,
                                pixel=cfg.camera.pixel_keypoints, detach=cfg.action.reads == "task") \
            if cfg.fusion.cue_objects > 0 else None
        self.memory = cfg.fusion.cue_memory

    def initial_state(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, state_slots(self.cfg), self.cfg.encoder.hidden)

    def forward(self, camera, audio, imu, lidar, joint_state, mask, dt, state, audio_frames):
        mask = mask * self.used
        audio_token, frames = self.audio(audio, audio_frames)
        camera_token, keypoints, visibility = self.camera.encode_reads(camera)
        currents = self.stack_tokens(camera_token, audio_token, self.imu(imu), self.lidar(lidar),
                                     self.joint_state(joint_state))
        rates = self.lif(currents)  # every modality's LIF layer at once
        m = len(MODALITIES)
        new_state = self.recur(rates, mask, dt, state[:, :m])
        fused, attention, contribution = self.fusion(new_state, mask)
        joints = self.measured_joints(joint_state, mask)
        pose = None if joints is None else self.action_head.arm_pose(joints)   # once a tick, for both
        memory = None
        if self.memory:
            memory = self.remember(state[:, m], keypoints, visibility, mask, joint_state, pose)
            new_state = torch.cat([new_state, memory.unsqueeze(1)], dim=1)
        fused, reads = self.read_camera(fused, keypoints, mask, new_state, joint_state, pose, memory)
        head_in = self.head_input(fused, reads, new_state[:, :m], currents, mask)[0]
        return (self.action_head(head_in, joints, pose), self.state_head(fused), new_state, attention, contribution,
                frames)

    def head_input(self, fused: torch.Tensor, reads: CameraReads, cells: torch.Tensor, currents: torch.Tensor,
                   mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the action head reads, and the phase logits (B, len(PHASES)) training supervises (None unless
        ``action.reads`` is task); ``cells`` and ``currents``: the modalities' new cell states and this tick's
        input currents (B, M, D), which the flags read (``PhaseHead``), and ``mask`` (B, M) which are present.

        task: the cue read (the named button's offset from the tool, the tool's height, the belief) and the
        phase flags' probabilities, both cut off from the action's gradient. Why: every input the head could
        read that the action's loss also shaped was learned as the arm's own motion (the IMU, the joint
        velocities, the motors' hum), which in a demonstration predicts the next command and closed loop is
        the policy's own guess: measured (README "Where learning stands", items 19-24), each policy stopped
        short of the button, the closer the better its validation loss. Read from supervised quantities
        alone, the head has nothing of the arm's motion to copy: each perception (camera: where the buttons
        are; microphone: which is named and whether it has been; IMU: the click; LiDAR: the intruder) is
        trained by its own target, and the head learns the control law from them."""
        if self.phase_head is None:
            return fused, None
        logits = self.phase_head(cells, currents, mask)
        return torch.cat([reads.read.detach(), torch.sigmoid(logits).detach()], dim=-1), logits

    def remember(self, memory: torch.Tensor, keypoints: torch.Tensor, visibility: torch.Tensor,
                 mask: torch.Tensor, joint_state: torch.Tensor | None = None,
                 pose: PandaPose | None = None) -> torch.Tensor:
        """The cue read's memory slot (B, D) after this frame (``CueRead.remember``); with ``joint_state`` (the raw
        (B, 2 dof) input), only while the hand is clear of each button (``tool_tip``)."""
        camera = MODALITIES.index("camera")
        tip, tip_present = self.tool_tip(joint_state, mask, pose) if joint_state is not None else (None, None)
        return self.cue_read.remember(memory, self.cue_read.objects(keypoints), visibility,
                                      mask[:, camera:camera + 1], tip, tip_present)

    def tool_tip(self, joint_state: torch.Tensor, mask: torch.Tensor,
                 pose: PandaPose | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tip (B, 3) in metres, (B, 1) 1 where the joint states are present): the tool tip at the measured joints
        (``pose``'s where the tool-space head computed it); where they are masked the tip is a placeholder."""
        i = MODALITIES.index("joint_state")
        present = mask[:, i:i + 1]
        if pose is not None:
            return pose.tip, present
        q = joint_state[:, :self.cfg.action.dof]
        return panda_tool_pose(torch.where(present > 0.5, q, torch.zeros_like(q))).tip, present

    def measured_joints(self, joint_state: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The joint positions a tool-space head acts at (None in joint space); zeros while the joint states are
        masked (their data may then be anything, NaN included), when the watchdog holds the command anyway."""
        if not self.action_head.tool:
            return None
        i = MODALITIES.index("joint_state")
        q = joint_state[:, :self.cfg.action.dof]
        return torch.where(mask[:, i:i + 1] > 0.5, q, torch.zeros_like(q))

    def read_camera(self, fused: torch.Tensor, keypoints: torch.Tensor, mask: torch.Tensor, state: torch.Tensor,
                    joint_state: torch.Tensor, pose: PandaPose | None = None,
                    memory: torch.Tensor | None = None) -> tuple[torch.Tensor, CameraReads]:
        """The fused vector plus what is read off the camera's keypoints (``KeypointRead`` or ``CueRead``),
        and what training supervises of it. ``joint_state``: the raw (B, 2 dof) input, positions first;
        ``pose``: the tool-space head's ``arm_pose`` of ``measured_joints``, where there is one (the cue read
        uses its tip rather than running the kinematics again)."""
        if self.cue_read is None:
            fused, located = self.read_keypoints_located(fused, keypoints, mask, state)
            return fused, CameraReads(located, None, None)
        present = torch.ones_like(mask[:, :1])
        for name in ("camera", "audio", "joint_state"):   # nothing is read while any of its sources is masked
            i = MODALITIES.index(name)
            present = present * mask[:, i:i + 1]
        audio = state[:, MODALITIES.index("audio")]
        held = None if memory is None else memory[:, :2 * self.cue_read.n]
        return self.cue_read(fused, keypoints, audio, joint_state[:, :self.cfg.action.dof], present,
                             None if pose is None else pose.tip, held)

    def read_keypoints(self, fused: torch.Tensor, keypoints: torch.Tensor, mask: torch.Tensor,
                       state: torch.Tensor) -> torch.Tensor:
        """The fused vector plus what its queries read off this frame's camera keypoints (``KeypointRead``);
        unchanged without queries, and nothing read while the camera is masked. ``state``: the cells' new
        state (B, M, D), whose audio slot asks where ``keypoint_query_source`` is audio."""
        return self.read_keypoints_located(fused, keypoints, mask, state)[0]

    def read_keypoints_located(self, fused, keypoints, mask, state) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``read_keypoints`` and, for training, the cued button's position located from the read (or None).

        Why the audio's own state can ask: measured (README "Where learning stands", item 15), queries from
        the fused state located the cued button in 29 of 30 episodes driven partly by the expert and in 6 of
        20 driven by the policy alone, chance: they had learned it from where the arm was heading (the joint
        states in the fused vector), which closed loop is the policy's own guess."""
        if self.keypoint_read is None:
            return fused, None
        camera = MODALITIES.index("camera")
        present = mask[:, camera:camera + 1]
        if self.keypoint_read.source == "audio":
            # Masked, the audio cell holds its last state, which must no more reach the outputs than the
            # state of any masked modality: nothing is read then either.
            audio = MODALITIES.index("audio")
            asking, present = state[:, audio], present * mask[:, audio:audio + 1]
        else:
            asking = fused
        read = self.keypoint_read.read(asking, keypoints) * present
        return fused + self.keypoint_read.out(read), self.keypoint_read.locate(read)

    # The step in its stateless and recurrent parts: training runs the encoders and the LIF layers
    # (whose membranes start at rest every tick) over every tick of a chunk at once and only
    # ``recur``, the fusion and the heads tick by tick (truncated BPTT): the same arithmetic.

    def stack_tokens(self, camera, audio, imu, lidar, joint_state) -> torch.Tensor:
        """Per-modality encoder outputs (B, D) each -> (B, M, D) input currents of the LIF layers, in
        MODALITIES order (the one place that order meets the network)."""
        tokens = torch.stack([camera, audio, imu, lidar, joint_state], dim=1)
        normed = nn.functional.layer_norm(tokens, (tokens.shape[-1],))
        return normed * self.current_gain + self.current_offset

    def recur(self, rates, mask, dt, state) -> torch.Tensor:
        """Spike rates (B, M, D) -> the CfC cells' new state, advanced by the real dt (B, 1)."""
        return self.recur_advance(self.recur_input(rates), mask, dt, state)

    def recur_input(self, rates) -> torch.Tensor:
        """The part of ``recur`` that does not depend on the state (any leading shape before (M, D))."""
        return self.cells.input_part(rates)

    def recur_advance(self, drive, mask, dt, state) -> torch.Tensor:
        """The rest of ``recur``, given ``recur_input(rates)``."""
        updated = self.cells.advance(drive, state, dt)
        # A masked modality keeps its previous state: stale or missing data must not
        # drive the recurrent memory, and the cell resumes where it was when data returns.
        return torch.where(mask.unsqueeze(-1) > 0.5, updated, state)

    def set_normalization(self, imu_mean, imu_std, joint_mean, joint_std, action_mean, action_std) -> None:
        """Install the training set's statistics (numpy or tensors; std floored so a constant channel is 0)."""
        def t(x):
            return torch.as_tensor(np.asarray(x, dtype=np.float32))
        with torch.no_grad():
            self.imu.mean.copy_(t(imu_mean).view(1, 6, 1))
            self.imu.inv_std.copy_(1.0 / torch.clamp(t(imu_std), min=1e-3).view(1, 6, 1))
            self.joint_state.mean.copy_(t(joint_mean).view(1, -1))
            self.joint_state.inv_std.copy_(1.0 / torch.clamp(t(joint_std), min=1e-3).view(1, -1))
            self.action_head.mean.copy_(t(action_mean).view(1, -1))
            self.action_head.std.copy_(torch.clamp(t(action_std), min=1e-3).view(1, -1))


def build_model(cfg: ModelConfig, seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet(cfg).eval()


def save_checkpoint(model: FusionNet, path: str | Path, extra: dict | None = None) -> None:
    """Weights plus the ModelConfig that made them (and ``extra``: training config, dataset hashes,
    normalisation, history), written under a temporary name and renamed when complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "model_config": config_to_dict(model.cfg),
                "state_dict": model.state_dict(), **(extra or {})}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (weights_only: a checkpoint cannot run code when loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a torch file at all
        raise ValueError(f"{path}: not an mm_fusion_ros checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else None
        raise ValueError(f"{path}: not an mm_fusion_ros checkpoint of format {CHECKPOINT_FORMAT}"
                         + (f" (it is {found}: retrain it)" if found else ""))
    return blob


def load_checkpoint(path: str | Path) -> FusionNet:
    blob = read_checkpoint(path)
    model = FusionNet(model_config_from_dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def config_mismatch(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Dotted keys whose values differ between two model configs."""
    out: list[str] = []

    def walk(x, y, key):
        if isinstance(x, dict):
            for k in x:
                walk(x[k], y.get(k), f"{key}.{k}")
        elif x != y:
            out.append(f"{key}: {x!r} != {y!r}")
    walk(config_to_dict(a), config_to_dict(b), "model")
    return out
