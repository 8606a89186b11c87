"""The Franka Emika Panda as published: kinematics, limits, and an MJCF of simple geoms built from them.

The modified Denavit-Hartenberg table and the limits are Franka's published
figures (``shared/reference/franka-panda.md``); the link shapes are capsules
between joint origins, because a mesh model costs ~27 ms per 96x96 frame on
the software renderer and simple geoms ~2 ms. In Craig's convention joint i's
frame is ``RotX(alpha) TransX(a) RotZ(q) TransZ(d)`` from the previous one;
RotZ and TransZ commute, so each MJCF body sits at ``(a, -d sin alpha, d cos
alpha)`` turned by ``RotX(alpha)`` and its hinge is its local z axis.
"""

from __future__ import annotations

import math

import numpy as np

JOINT_NAMES = tuple(f"panda_joint{i}" for i in range(1, 8))

# (a, d, alpha) of joints 1..7 and the flange; metres, radians.
MDH = ((0.0, 0.333, 0.0), (0.0, 0.0, -math.pi / 2), (0.0, 0.316, math.pi / 2), (0.0825, 0.0, math.pi / 2),
       (-0.0825, 0.384, -math.pi / 2), (0.0, 0.0, math.pi / 2), (0.088, 0.0, math.pi / 2))
FLANGE_D = 0.107
Q_MIN = np.array([-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973])
Q_MAX = np.array([2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973])
QD_MAX = np.array([2.1750, 2.1750, 2.1750, 2.1750, 2.6100, 2.6100, 2.6100])
QDD_MAX = np.array([15.0, 7.5, 10.0, 12.5, 15.0, 20.0, 20.0])
TAU_MAX = np.array([87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0])
READY_Q = np.array([0.0, -math.pi / 4, 0.0, -3 * math.pi / 4, 0.0, math.pi / 2, math.pi / 4])

# Link masses (kg), close to Franka's published inertial estimates; capsule radii (m) for looks and contact.
LINK_MASS = (4.97, 0.65, 3.23, 3.59, 1.23, 1.67, 0.74)
LINK_RADIUS = (0.06, 0.06, 0.055, 0.055, 0.05, 0.045, 0.04)
TOOL_LENGTH = 0.1034   # flange -> fingertip centre, as the Franka Hand
TIP_RADIUS = 0.012


def mdh_transform(a: float, d: float, alpha: float, q) -> np.ndarray:
    """Craig's RotX(alpha) TransX(a) RotZ(q) TransZ(d): (4, 4) for a scalar ``q``, (..., 4, 4) for an array."""
    ca, sa = math.cos(alpha), math.sin(alpha)
    q = np.asarray(q, dtype=np.float64)
    cq, sq = np.cos(q), np.sin(q)
    T = np.zeros(q.shape + (4, 4))
    T[..., 0, 0], T[..., 0, 1], T[..., 0, 3] = cq, -sq, a
    T[..., 1, 0], T[..., 1, 1], T[..., 1, 2], T[..., 1, 3] = sq * ca, cq * ca, -sa, -d * sa
    T[..., 2, 0], T[..., 2, 1], T[..., 2, 2], T[..., 2, 3] = sq * sa, cq * sa, ca, d * ca
    T[..., 3, 3] = 1.0
    return T


def forward_kinematics(q: np.ndarray, tool: float = TOOL_LENGTH) -> np.ndarray:
    """Base -> tool tip (4x4) from the published table alone: the reference the MJCF is tested against.
    ``q`` (7,) gives one frame, (T, 7) one per row."""
    q = np.asarray(q, dtype=np.float64)
    T = np.broadcast_to(np.eye(4), q.shape[:-1] + (4, 4))
    for (a, d, alpha), qi in zip(MDH, np.moveaxis(q, -1, 0)):
        T = T @ mdh_transform(a, d, alpha, qi)
    return T @ mdh_transform(0.0, FLANGE_D + tool, 0.0, 0.0)


def _fmt(v) -> str:
    return " ".join(f"{x:.6g}" for x in v)


def _quat_rotx(alpha: float) -> tuple[float, float, float, float]:
    return (math.cos(alpha / 2), math.sin(alpha / 2), 0.0, 0.0)


KP = (2000.0, 2000.0, 2000.0, 2000.0, 500.0, 500.0, 500.0)   # N m / rad
KD = (120.0, 120.0, 120.0, 120.0, 20.0, 20.0, 20.0)              # N m s / rad


def arm_mjcf() -> tuple[str, str]:
    """(bodies, actuators) MJCF fragments: the arm on the world origin, joints under a stiff servo.

    A robot's joint velocity interface (what ros2_control's forward velocity controller writes to)
    tracks the commanded velocity with its own position loop. So here each joint has a PD servo
    with velocity feedforward, ``kp (q_ref - q) + kd (qdot_cmd - qdot)``, made of a ``position``
    actuator (control: the reference q_ref, which the cell integrates from the command) and a
    ``velocity`` actuator (control: the command), their sum limited to the published torque by the
    joint's ``actuatorfrcrange``. It holds the arm still under load at zero command and pushes harder
    the longer a blocked joint is commanded on, as a real arm does. (A pure velocity servo instead
    either stalls at a few newtons or, stiff enough not to, goes unstable once its torque saturates.)
    Links carry gravity compensation, as the Panda's controller does.
    """
    bodies, closing = [], []
    for i, (a, d, alpha) in enumerate(MDH):
        pos = (a, -d * math.sin(alpha), d * math.cos(alpha))
        # The capsule runs from this joint towards the next one, expressed in this body's frame.
        if i + 1 < len(MDH):
            na, nd, nalpha = MDH[i + 1]
            end = (na, -nd * math.sin(nalpha), nd * math.cos(nalpha))
        else:
            end = (0.0, 0.0, FLANGE_D)
        seg = np.asarray(end)
        length = float(np.linalg.norm(seg))
        name = JOINT_NAMES[i]
        body = [f'<body name="link{i + 1}" pos="{_fmt(pos)}" quat="{_fmt(_quat_rotx(alpha))}" gravcomp="1">',
                f'<joint name="{name}" type="hinge" axis="0 0 1" range="{Q_MIN[i]:.4f} {Q_MAX[i]:.4f}" '
                f'armature="0.1" damping="0.5" actuatorfrcrange="{-TAU_MAX[i]} {TAU_MAX[i]}"/>',
                f'<geom name="link{i + 1}_joint" type="cylinder" size="{LINK_RADIUS[i]:.3f} {LINK_RADIUS[i]:.3f}" '
                f'mass="{LINK_MASS[i] * 0.4:.3f}" class="arm"/>']
        if length > 1e-6:
            body.append(f'<geom name="link{i + 1}_seg" type="capsule" fromto="0 0 0 {_fmt(seg)}" '
                        f'size="{LINK_RADIUS[i] * 0.8:.3f}" mass="{LINK_MASS[i] * 0.6:.3f}" class="arm"/>')
        bodies.append("\n".join(body))
        closing.append("</body>")
    # The flange, the hand turned -45 degrees about z as on the real arm, and a push tool with the TCP at its tip.
    bodies.append(
        f'<body name="hand" pos="0 0 {FLANGE_D}" quat="{_fmt((math.cos(-math.pi / 8), 0, 0, math.sin(-math.pi / 8)))}" '
        f'gravcomp="1">'
        '<site name="imu" pos="0 0 0.02" size="0.01" rgba="1 1 0 1"/>'
        '<geom name="hand" type="box" size="0.02 0.09 0.025" pos="0 0 0.03" mass="0.6" class="arm"/>'
        f'<geom name="tool" type="capsule" fromto="0 0 0.05 0 0 {TOOL_LENGTH - TIP_RADIUS:.4f}" size="0.008" '
        'mass="0.05" class="arm"/>'
        f'<geom name="tip" type="sphere" pos="0 0 {TOOL_LENGTH:.4f}" size="{TIP_RADIUS}" mass="0.02" class="arm" '
        'rgba="0.9 0.9 0.9 1"/>'
        f'<site name="tcp" pos="0 0 {TOOL_LENGTH + TIP_RADIUS:.4f}" size="0.005"/>'
        '</body>')
    position = [f'<position name="{JOINT_NAMES[i]}_position" joint="{JOINT_NAMES[i]}" kp="{KP[i]}" kv="0" '
                f'ctrlrange="{Q_MIN[i]:.4f} {Q_MAX[i]:.4f}" ctrllimited="true"/>' for i in range(7)]
    velocity = [f'<velocity name="{JOINT_NAMES[i]}_velocity" joint="{JOINT_NAMES[i]}" kv="{KD[i]}" '
                f'ctrlrange="{-QD_MAX[i]:.4f} {QD_MAX[i]:.4f}" ctrllimited="true"/>' for i in range(7)]
    actuators = "\n".join(position + velocity)
    return "\n".join(bodies) + "\n" + "\n".join(reversed(closing)), actuators
