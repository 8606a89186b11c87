"""The scripted expert: privileged simulator state in, joint velocities out, through damped least squares.

It knows what no policy may (which button the cue named, where the buttons are,
the detent's state, where the intruder is) and behaves as a careful operator
would teach the task:

1. listen: hold still until the first cue has played (a policy can know the target no sooner);
2. approach: move the tool 5 cm above the cued button, tool pointing down;
3. descend, then press slowly until the detent clicks;
4. release: rise back above the button (the button springs back: success);
5. throughout, stop while the intruder is in (or within a margin of) the LiDAR's protective field;
   a press already under way is finished, and the button let go, below the field's speed limit
   (stopping with the tip on a clicked button would leave the servo pushing it into its stop).

Velocities come from damped least-squares inverse kinematics on MuJoCo's tool
Jacobian, ``qdot = J^T (J J^T + lambda^2 I)^-1 [v; w]``, plus a null-space pull
towards the ready pose so the elbow stays where a person expects it.

``noise`` (DART-style): the command the cell executes is perturbed, while the
clean command is what gets recorded as the label, so a cloned policy sees
states slightly off the expert's path and how to get back. Only while the
expert is moving freely (``perturbable``): noise while it holds still for the
intruder, or during the last millimetres of a press, would not show a recovery,
only fail the episode (a protective-stop violation, an overtravel). And while it
listens for the cue: see ``perturbable``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cell import Cell
from .panda import READY_Q

R_DOWN = np.diag([1.0, -1.0, -1.0])   # tool frame at the ready pose: tool z pointing at the table
ABOVE_M = 0.05
APPROACH_SPEED = 0.25   # m/s
DESCEND_SPEED = 0.04
APPROACH_DONE_M = 0.015   # m from the point above the button: the descent starts
DESCEND_ABORT_M = 0.025   # m off the button's axis: a descent not yet pressing goes back to the approach
APPROACH_NOISE_M = 0.03   # DART noise only while farther than this from the point above the button
PRESS_SPEED = 0.008     # m/s once the tip is within PRESS_ZONE of the cap: 0.3 s from the click to the end stop
PRESS_ZONE = 0.006
RISE_SPEED = 0.06
FIELD_MARGIN = 0.08     # m: stop slightly before the intruder enters the field
CREEP_SPEED = 0.02      # m/s: a press finished while the intruder is near (the field allows 0.03)
LISTEN_MARGIN_S = 0.1


@dataclass
class ExpertParams:
    kp: float = 4.0            # 1/s, position error -> tool speed
    kr: float = 3.0            # 1/s, orientation error -> tool angular speed
    damping: float = 0.05      # lambda of the damped least squares
    k_null: float = 0.5        # 1/s, pull towards the ready pose in the null space
    max_joint_speed: float = 1.0   # rad/s: the policy's action range, so every label is one it can output


class Expert:
    def __init__(self, cell: Cell, params: ExpertParams | None = None):
        self.cell = cell
        self.p = params or ExpertParams()
        self.phase = "listen"

    def reset(self) -> None:
        self.phase = "listen"

    @property
    def perturbable(self) -> bool:
        """Whether DART noise may be added to the command now (free motion, or waiting for the cue; no intruder
        near). Noise while it waits for the cue matters most for cloning: the arm then moves (the motors hum,
        the IMU shakes) while the label says "hold still", so a cloned policy cannot learn "move because the
        arm moves" (measured: trained without it, open loop it tracked the expert, closed loop it never left
        the start pose). Listening is perturbed in a share of the episodes only (``DartNoise.listening``)."""
        if self._intruder_near() or self.phase not in ("listen", "approach", "descend", "hold"):
            return False
        p, _ = self.cell.tcp()
        top = self.cell.button_top(self.cell.spec.target)
        if self.phase == "descend":
            return p[2] - top[2] > 2 * PRESS_ZONE
        if self.phase == "approach":
            # Not in the last centimetres: a drift holds the tool off the point the descent waits for
            # (measured, with 4 mm: 9 of 20 episodes timed out).
            return np.linalg.norm(np.array([top[0], top[1], top[2] + ABOVE_M]) - p) > APPROACH_NOISE_M
        return True

    def _intruder_near(self) -> bool:
        ic = self.cell.cfg.intruder
        x, y = self.cell.intruder_xy()
        return abs(y) < ic.field_y + FIELD_MARGIN and ic.field_x[0] - FIELD_MARGIN <= x <= ic.field_x[1] + FIELD_MARGIN

    def act(self) -> np.ndarray:
        """The clean joint velocity command for the cell's current state."""
        qdot = self._plan()
        if self._intruder_near():
            p, _ = self.cell.tcp()
            pressing = self.phase == "release" or (
                self.phase == "descend" and p[2] - self.cell.button_top(self.cell.spec.target)[2] < PRESS_ZONE)
            if not pressing:
                return np.zeros(7)
            speed = np.linalg.norm(self.cell.tcp_jacobian()[:3] @ qdot)
            if speed > CREEP_SPEED:
                qdot = qdot * (CREEP_SPEED / speed)
        return qdot

    def _plan(self) -> np.ndarray:
        cell, spec = self.cell, self.cell.spec
        a = cell.cfg.audio
        if self.phase == "listen":
            if cell.elapsed < a.cue_start_s + a.cue_s + LISTEN_MARGIN_S:
                return np.zeros(7)
            self.phase = "approach"
        p, _ = cell.tcp()
        top = cell.button_top(spec.target)
        above = np.array([top[0], top[1], top[2] + ABOVE_M])
        feed = np.zeros(3)
        lateral = float(np.linalg.norm(top[:2] - p[:2]))
        if self.phase in ("approach", "descend") and cell.clicked(spec.target):
            # A policy driving (DAgger) may click the button from any phase the expert following it is in:
            # what the expert does once the detent has clicked is let go, whichever way the tool got there.
            self.phase = "release"
        if self.phase == "approach":
            goal = above
            # Descend from within APPROACH_DONE_M, still moving (the descent corrects the rest sideways),
            # rather than stopping at the point above first: a clone learns "the arm is still, so stay
            # still" at every stop it is shown (measured: it hovered above the cued button until timeout).
            # Also from anywhere lower over the button: a policy (DAgger) may come down over it without
            # passing that point, and the label there must be the descent, not a climb back to the point.
            if np.linalg.norm(above - p) < APPROACH_DONE_M or (
                    lateral < APPROACH_DONE_M and p[2] < above[2] + APPROACH_DONE_M):
                self.phase = "descend"
        elif self.phase == "descend" and lateral > DESCEND_ABORT_M and p[2] - top[2] > PRESS_ZONE:
            # Off to the side before pressing (a policy's drift): back up to the point above, rather than
            # come down beside the cap onto its housing.
            self.phase = "approach"
            goal = above
        if self.phase == "descend":
            gap = p[2] - top[2]
            speed = PRESS_SPEED if gap < PRESS_ZONE else DESCEND_SPEED
            goal = np.array([top[0], top[1], p[2]])
            feed = np.array([0.0, 0.0, -speed])
            if cell.clicked(spec.target):
                self.phase = "release"
        if self.phase == "release":
            goal = np.array([top[0], top[1], p[2]])
            feed = np.array([0.0, 0.0, RISE_SPEED])
            if p[2] >= above[2]:
                self.phase = "hold"
        if self.phase == "hold":
            goal = above
        return self._ik(goal, feed)

    def _ik(self, goal: np.ndarray, feed: np.ndarray) -> np.ndarray:
        cell, p = self.cell, self.p
        pos, rot = cell.tcp()
        v = p.kp * (goal - pos)
        n = np.linalg.norm(v)
        if n > APPROACH_SPEED:
            v *= APPROACH_SPEED / n
        v = v + feed
        w = p.kr * 0.5 * sum(np.cross(rot[:, i], R_DOWN[:, i]) for i in range(3))
        J = cell.tcp_jacobian()
        JJt = J @ J.T + (p.damping ** 2) * np.eye(6)
        J_pinv = J.T @ np.linalg.inv(JJt)
        qdot = J_pinv @ np.concatenate([v, w])
        # The exact projector: the damped inverse's (I - J+ J) leaks the posture pull into the tool's motion.
        qdot += (np.eye(7) - np.linalg.pinv(J) @ J) @ (p.k_null * (READY_Q - cell.q))
        peak = np.max(np.abs(qdot))
        if peak > p.max_joint_speed:
            qdot *= p.max_joint_speed / peak
        return qdot


class DartNoise:
    """The DART perturbation: a drift (Ornstein-Uhlenbeck, stationary std ``std`` rad/s per joint, time
    constant ``tau_s``; 0 is white noise), one value per control tick.

    A drift rather than white noise because the velocity servo and every sensor window average white
    noise away: the arm then moves as the clean command says, the measured motion predicts the label,
    and a cloned policy copies its own motion instead of reading the task from the sensors (measured:
    with white noise it never started, or followed). A drift moves the arm off the expert's path for a
    while, so the data show recoveries and the arm's motion is not the label.
    """

    # Episodes whose listening phase is perturbed too. Not all: where the arm always drifts while the
    # cue plays, a still arm at the start is something the training data never show, except while the
    # expert waits for an intruder (when the label is "hold"), and the clone learned "still -> stay still":
    # open loop it started on the cue, closed loop from a still start it never moved (measured, 0/6).
    LISTEN_SHARE = 0.5

    def __init__(self, rng: np.random.Generator, std: float, tau_s: float, period_s: float):
        self.rng, self.std = rng, float(std)
        self.rho = math.exp(-period_s / tau_s) if tau_s > 0 else 0.0
        self.value = rng.normal(0, self.std, 7) if self.std > 0 else np.zeros(7)
        self.listening = bool(rng.random() < self.LISTEN_SHARE)

    def next(self) -> np.ndarray:
        if self.std > 0:
            self.value = self.rho * self.value + math.sqrt(1.0 - self.rho ** 2) * self.rng.normal(0, self.std, 7)
        return self.value


def expert_commands(expert: Expert, noise: DartNoise) -> tuple[np.ndarray, np.ndarray]:
    """(clean label, executed command) for this tick: the executed one carries DART noise when allowed."""
    clean = expert.act()
    drift = noise.next()      # stepped every tick, so the noise stream depends on the seed alone
    perturb = drift if expert.perturbable and (expert.phase != "listen" or noise.listening) else 0.0
    limit = expert.p.max_joint_speed
    return clean, np.clip(clean + perturb, -limit, limit)


def run_expert_episode(cell: Cell, seed: int, noise: float = 0.0, control_rate_hz: float = 100.0,
                       on_tick=None, noise_tau_s: float = 0.0) -> None:
    """One episode under the expert at the control rate; ``on_tick(t, clean, executed, readings)`` sees each tick.

    ``noise`` is the standard deviation (rad/s) of the DART perturbation added to the executed command;
    its generator is seeded by the episode seed, so a noisy episode is as reproducible as a clean one.
    """
    cell.reset(seed)
    expert = Expert(cell)
    period = 1.0 / control_rate_hz
    dart = DartNoise(np.random.default_rng([seed, 7]), noise, noise_tau_s, period)
    t = cell.t
    while not cell.outcome.done:
        clean, executed = expert_commands(expert, dart)
        cell.command(executed)
        t += period
        readings = cell.advance(t)
        if on_tick is not None:
            on_tick(t, clean, executed, readings)
