"""The cell's task state at each tick, from a recording's episode spec: what training supervises the
first dims of ``fused_state`` with.

Behaviour cloning alone gives the network one signal, the expert's joint velocities, in which where the
cued button is and where the tool is are tangled with the arm's Jacobian; measured (README "Where
learning stands", item 8) the cloned policy reached for the right button and ended 6-7.5 cm beside
it. Asking the fused state to say, in metres, where the cued button is and how far the tool is from
it (an auxiliary task, as in Levine et al. 2016's pose prediction) puts that into the representation
that the action head reads, and gives a figure in centimetres of how well the policy localises.

Known only after the cue (before it, which button is meant is not in any sensor): ``task_weight``
is 0 until the expert's first command, which waits for the cue.
"""

from __future__ import annotations

import numpy as np

from .panda import TIP_RADIUS, TOOL_LENGTH, forward_kinematics
from .scene import CAP_HEIGHT, HOUSING_HEIGHT

TASK_STATE = ("target_x", "target_y", "offset_x", "offset_y", "tool_height")
# Which phase of the task a tick is in, as the expert's command shows it (``task_phases``): what a head that
# reads the task (``model.action.reads: task``) switches on, each from the sensor that can tell.
PHASES = ("cue_heard",       # the microphone: the first cue has played (the expert moves from then on)
          "intruder_hold",   # the LiDAR: the expert holds still for the intruder
          "clicked")         # the IMU: the detent has clicked, the press is over (the expert rises)
# The sensor each flag is read from, alone (its cell, or for the intruder its input now: ``model.network.PhaseHead``).
PHASE_SOURCES = ("audio", "lidar", "imu")
CLICK_RISE = 0.02      # m/s: the expert rises at 0.06 once the detent clicks, and never rises while pressing
CLICK_ZONE_DM = 0.1    # the click is within 1 cm of the cap's resting top
PRESS_ZONE_DM = 0.06   # the expert presses slowly from 6 mm above the cap's top (sim.expert.PRESS_ZONE)
UNITS_PER_M = 10.0   # decimetres: values of order one for a loss beside the standardised actions


def task_state(spec: dict, joint_positions: np.ndarray) -> np.ndarray:
    """(T, 5) in decimetres: the cued button's (x, y) in the base frame, its offset from the tool tip
    (button minus tool, x and y), and the tool tip's height above the button's resting top."""
    bx, by = spec["buttons"][int(spec["target"])]
    q = np.asarray(joint_positions, np.float64)
    tips = tool_tips(q)
    out = np.empty((len(q), len(TASK_STATE)), np.float32)
    out[:, 0], out[:, 1] = bx, by
    out[:, 2], out[:, 3] = bx - tips[:, 0], by - tips[:, 1]
    out[:, 4] = tips[:, 2] - (HOUSING_HEIGHT + CAP_HEIGHT)
    return out * UNITS_PER_M


def tool_tips(q: np.ndarray) -> np.ndarray:
    """(T, 3) tool tips (the tip sphere's surface below its centre: the cell's ``tcp`` site, what touches the
    button) for (T, 7) joint positions."""
    return forward_kinematics(q, TOOL_LENGTH + TIP_RADIUS)[:, :3, 3]


# A button is in the overhead camera's sight unless the hand is over it: measured (README item 23), the cued cap
# shows no pixel of its colour once the tool is within 1.2-2.5 cm of it laterally and below z = 0.11 m, and the
# hand's fingers, 10 cm across, hide or cut into caps further off. A locator fitted on the frames without the arm
# placed held-out buttons to 0.2 cm (median) where the tip was more than 16 cm aside or above 30 cm, with a p90 of
# 0.4-0.6 cm there, and 2-17 cm (p90) anywhere nearer and lower (README item 26). A frame is taken as showing a
# button where either holds.
IN_SIGHT_LATERAL_M = 0.16
IN_SIGHT_HEIGHT_M = 0.30


def buttons_in_sight(buttons_xy_m: np.ndarray, joint_positions: np.ndarray) -> np.ndarray:
    """(F, N) whether each of the N buttons (N, 2; base frame, m) is clear of the tool at each of F joint
    vectors (F, 7): laterally more than ``IN_SIGHT_LATERAL_M`` from the tip, or the tip above
    ``IN_SIGHT_HEIGHT_M``."""
    tips = tool_tips(np.asarray(joint_positions, np.float64))
    lateral = np.linalg.norm(tips[:, None, :2] - np.asarray(buttons_xy_m, np.float64)[None], axis=-1)
    return (lateral > IN_SIGHT_LATERAL_M) | (tips[:, None, 2] > IN_SIGHT_HEIGHT_M)


def task_phases(twist: np.ndarray, heard: np.ndarray, tool_height_dm: np.ndarray,
                clicked: np.ndarray | None = None) -> np.ndarray:
    """(T, len(PHASES)) 0/1 from the expert's tool-twist labels (T, 6; v first, m/s), ``task_weight`` (the cue
    heard) and the task state's tool height (dm): ``intruder_hold`` where the command is exactly still after
    the cue (the expert's only stop after it); ``clicked`` where the recording says when the detent clicked
    (``clicked``, (T,) bool: ``clicked_ticks``), else from the first tick after the cue that rises from within
    ``CLICK_ZONE_DM`` of the cap (the expert's release; the episode ends soon after, when the button has sprung
    back).

    Why the recorded click first: in an episode a policy drove (DAgger), the expert following it may label a
    rise near the cap that is no release (it was taking the tool back to the point above the button), and
    the flags read off those labels were right on 21 % of the validation positives, from 98 % (README item 25)."""
    twist = np.asarray(twist, np.float64)
    heard = np.asarray(heard) > 0
    out = np.zeros((len(twist), len(PHASES)), np.float32)
    out[:, 0] = heard
    out[:, 1] = heard & (np.abs(twist) < 1e-6).all(axis=1)
    if clicked is not None:
        out[:, 2] = np.asarray(clicked, bool)
        return out
    rising = heard & (twist[:, 2] > CLICK_RISE) & (np.asarray(tool_height_dm) < CLICK_ZONE_DM)
    if rising.any():
        out[int(np.argmax(rising)):, 2] = 1.0
    return out


CLICK_FELT_S = 0.005   # s: a tick this long after the snap holds the IMU samples that show it (200 Hz, 0.5-2 ms late)


def clicked_ticks(episode: dict, t_ns: np.ndarray) -> np.ndarray | None:
    """(T,) whether the cued button's detent had clicked by each tick (at ``t_ns``, the sim clock), from what
    ``mm-fusion record`` wrote beside the bag (its ``clock_start_s`` and ``stats.target_clicked_at``); None
    where the recording does not say (older recordings, a team's own bags)."""
    stats = episode.get("stats") or {}
    start = episode.get("clock_start_s")
    if start is None or "target_clicked_at" not in stats:
        return None
    at = stats["target_clicked_at"]
    t_ns = np.asarray(t_ns, np.int64)
    if at is None:   # never clicked
        return np.zeros(len(t_ns), bool)
    return t_ns >= int(round((float(start) + float(at) + CLICK_FELT_S) * 1e9))


def task_weight(action: np.ndarray, labelled: np.ndarray, joints_present: np.ndarray) -> np.ndarray:
    """(T,) 1 from the expert's first non-zero command on (the cue heard), where the joints were measured."""
    moving = (np.abs(np.asarray(action)) > 1e-6).any(axis=1) & (np.asarray(labelled) > 0)
    w = np.zeros(len(moving), np.float32)
    if moving.any():
        w[int(np.argmax(moving)):] = 1.0
    return w * (np.asarray(joints_present) > 0.5)
