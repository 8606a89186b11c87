"""The Panda's tool tip from its joint positions, in torch: inside the network, so that it is exported with it.

The same published modified-DH table as ``sim.panda.forward_kinematics`` (tested against it), written with
torch operations that ONNX exports (cos, sin, stack, matmul), for a batch of joint vectors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..sim.panda import FLANGE_D, MDH, TIP_RADIUS, TOOL_LENGTH

TOOL_FEATURES = 12   # tool_pose_features: the tip (3) and the rotation matrix (9)


class PandaPose(NamedTuple):
    """The arm's pose at one joint vector, all in the base frame (m): what the tool-space head's features and
    Jacobian and the cue read's tool offset are computed from, once per tick (``panda_tool_pose``)."""
    tip: torch.Tensor        # (B, 3) the tool tip (what touches a button)
    rot: torch.Tensor        # (B, 3, 3) the tool's rotation
    origins: torch.Tensor    # (B, 7, 3) every joint's origin
    axes: torch.Tensor       # (B, 7, 3) every joint's axis (in Craig's convention joint i turns about its frame's z)


# Craig's RotX(alpha) TransX(a) RotZ(q) TransZ(d), per joint: the parts that do not depend on q.
_A = [a for a, _, _ in MDH]
_CA = [math.cos(alpha) for _, _, alpha in MDH]
_SA = [math.sin(alpha) for _, _, alpha in MDH]
_D_SA = [-d * math.sin(alpha) for _, d, alpha in MDH]
_D_CA = [d * math.cos(alpha) for _, d, alpha in MDH]


def panda_tool_tip(q: torch.Tensor) -> torch.Tensor:
    """(B, 7) joint positions (rad) -> (B, 3) the tool tip (what touches a button) in the base frame (m)."""
    return panda_tool_pose(q).tip


def panda_tool_pose(q: torch.Tensor) -> PandaPose:
    """(B, 7) joint positions (rad) -> the arm's ``PandaPose``, in q's dtype.

    The seven link transforms are built at once over the joints (one cos, one sin, one stack), and only their
    chain is a loop: exported, this is a few dozen ONNX operators rather than a few hundred, which at ONNX
    Runtime's per-operator cost is what a tick of a tool-space policy spent on its kinematics (measured,
    README "Where learning stands")."""
    const = lambda v: torch.tensor(v, dtype=q.dtype, device=q.device)   # noqa: E731
    c, s = torch.cos(q), torch.sin(q)
    zero, one = torch.zeros_like(q), torch.ones_like(q)
    ca, sa = const(_CA), const(_SA)
    rows = (
        (c, -s, zero, zero + const(_A)),
        (s * ca, c * ca, zero - sa, zero + const(_D_SA)),
        (s * sa, c * sa, zero + ca, zero + const(_D_CA)),
        (zero, zero, zero, one),
    )
    links = torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)   # (B, 7, 4, 4)
    frames = [links[:, 0]]
    for i in range(1, len(MDH)):
        frames.append(torch.matmul(frames[-1], links[:, i]))
    T = frames[-1]
    chain = torch.stack(frames, dim=1)   # (B, 7, 4, 4)
    reach = FLANGE_D + TOOL_LENGTH + TIP_RADIUS
    tip = T[:, :3, 3] + T[:, :3, 2] * reach
    return PandaPose(tip, T[:, :3, :3], chain[:, :, :3, 3], chain[:, :, :3, 2])


def panda_tool_jacobian(q: torch.Tensor, pose: PandaPose | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 7) -> the geometric Jacobian of the tool tip (B, 6, 7): rows v (m/s) then w (rad/s) per rad/s of
    each joint; and the tip (B, 3) and the tool's rotation (B, 3, 3) it was taken at. ``pose``: q's
    ``panda_tool_pose``, where the caller has it already."""
    tip, rot, origins, axes = panda_tool_pose(q) if pose is None else pose
    r = tip.unsqueeze(1) - origins
    z = axes
    # z_i x (p - o_i), by components: torch.linalg.cross has no ONNX export.
    linear = torch.stack([z[..., 1] * r[..., 2] - z[..., 2] * r[..., 1], z[..., 2] * r[..., 0] - z[..., 0] * r[..., 2],
                          z[..., 0] * r[..., 1] - z[..., 1] * r[..., 0]], dim=-1)   # (B, 7, 3)
    return torch.cat([linear, axes], dim=-1).transpose(1, 2), tip, rot


def spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x with A x = b for a batch of small symmetric positive definite A (B, n, n), b (B, n): Cholesky,
    unrolled over n. Written out because ONNX has no linear-solve or inverse operator (torch.linalg.solve
    does not export), and n = 6 here: 21 square roots and divisions per tick."""
    n = A.shape[-1]
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        s = A[:, j, j] - sum(L[j][k] * L[j][k] for k in range(j)) if j else A[:, j, j]
        L[j][j] = torch.sqrt(s)
        for i in range(j + 1, n):
            s = A[:, i, j] - sum(L[i][k] * L[j][k] for k in range(j)) if j else A[:, i, j]
            L[i][j] = s / L[j][j]
    y = [None] * n
    for i in range(n):   # L y = b
        s = b[:, i] - sum(L[i][k] * y[k] for k in range(i)) if i else b[:, i]
        y[i] = s / L[i][i]
    x = [None] * n
    for i in reversed(range(n)):   # L^T x = y
        s = y[i] - sum(L[k][i] * x[k] for k in range(i + 1, n)) if i < n - 1 else y[i]
        x[i] = s / L[i][i]
    return torch.stack(x, dim=-1)


def tool_twist_to_joints(q: torch.Tensor, twist: torch.Tensor, rest: torch.Tensor, null_gain: float,
                         damping: float, pose: PandaPose | None = None) -> torch.Tensor:
    """Joint velocities (B, 7) for a tool twist (B, 6: v in m/s, w in rad/s, base frame, at the tool tip):
    damped least squares, ``J^T (J J^T + damping^2 I)^-1 twist``, plus ``null_gain * (rest - q)`` projected
    into the Jacobian's null space, so that the elbow keeps to the rest posture without moving the tool.

    The operational-space controller every Cartesian teleoperation and servo interface runs (MoveIt
    Servo, Franka's Cartesian velocity interface), inside the network: the policy says where the tool
    should go, and the arm's kinematics, which it need not learn, say how the joints get it there."""
    J, _, _ = panda_tool_jacobian(q, pose)
    Jt = J.transpose(1, 2)
    JJt = torch.matmul(J, Jt)
    eye = torch.eye(6, dtype=q.dtype, device=q.device).unsqueeze(0)
    pull = null_gain * (rest - q)
    # Two solves: the damped one for the twist, and (I - J^+ J) pull with J^+ = J^T (J J^T)^-1 (a hair of
    # damping keeps it finite at a singularity). Neither needs the other, so they go as one batch of 2B:
    # the unrolled Cholesky's operator count, which is what ONNX Runtime's cost follows, is then paid once.
    B = q.shape[0]
    solved = spd_solve(torch.cat([JJt + damping ** 2 * eye, JJt + 1e-6 * eye], dim=0),
                       torch.cat([twist, torch.matmul(J, pull.unsqueeze(-1)).squeeze(-1)], dim=0))
    moved = torch.matmul(torch.cat([Jt, Jt], dim=0), solved.unsqueeze(-1)).squeeze(-1)
    qdot, along = moved[:B], moved[B:]
    return qdot + pull - along


def tool_pose_features(q: torch.Tensor, units_per_m: float, pose: PandaPose | None = None) -> torch.Tensor:
    """(B, 7) -> (B, 12): the tool tip (in ``units_per_m``) and its rotation matrix, row by row: what a policy
    acting in tool space needs to know of the arm (an orientation error is linear in the matrix). In q's
    dtype, whatever ``pose``'s."""
    tip, rot, _, _ = panda_tool_pose(q) if pose is None else pose
    tip, rot = tip.to(q.dtype), rot.to(q.dtype)
    return torch.cat([tip * units_per_m, rot.flatten(1)], dim=-1)


def joints_to_tool_twist(q: torch.Tensor, qdot: torch.Tensor) -> torch.Tensor:
    """(B, 7), (B, 7) -> the tool twist (B, 6) those joint velocities give: J(q) qdot. Training turns the
    expert's joint-velocity labels into the tool-space head's targets with it."""
    J, _, _ = panda_tool_jacobian(q)
    return torch.matmul(J, qdot.unsqueeze(-1)).squeeze(-1)
