"""The Panda's tool tip from its joint positions, in torch: inside the network, so that it is exported with it.

The same published modified-DH table as ``sim.panda.forward_kinematics`` (tested against it), written with
torch operations that ONNX exports (cos, sin, stack, matmul), for a batch of joint vectors.
"""

from __future__ import annotations

import math

import torch

from ..sim.panda import FLANGE_D, MDH, TIP_RADIUS, TOOL_LENGTH


def _mdh(a: float, d: float, alpha: float, q: torch.Tensor) -> torch.Tensor:
    """Craig's RotX(alpha) TransX(a) RotZ(q) TransZ(d) for a batch of angles (B,) -> (B, 4, 4)."""
    ca, sa = math.cos(alpha), math.sin(alpha)
    c, s = torch.cos(q), torch.sin(q)
    zero, one = torch.zeros_like(q), torch.ones_like(q)
    rows = (
        (c, -s, zero, zero + a),
        (s * ca, c * ca, zero - sa, zero - d * sa),
        (s * sa, c * sa, zero + ca, zero + d * ca),
        (zero, zero, zero, one),
    )
    return torch.stack([torch.stack(r, dim=-1) for r in rows], dim=-2)


def panda_tool_tip(q: torch.Tensor) -> torch.Tensor:
    """(B, 7) joint positions (rad) -> (B, 3) the tool tip (what touches a button) in the base frame (m)."""
    T = _mdh(*MDH[0], q[:, 0])
    for (a, d, alpha), i in zip(MDH[1:], range(1, 7)):
        T = torch.matmul(T, _mdh(a, d, alpha, q[:, i]))
    reach = FLANGE_D + TOOL_LENGTH + TIP_RADIUS
    return T[:, :3, 3] + T[:, :3, 2] * reach   # TransZ(reach) from the last joint's frame
