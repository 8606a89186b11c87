"""Closed-form continuous-time (CfC) cells, Hasani et al. 2022.

One call advances the hidden state by the real elapsed time ``dt`` of a control
tick, so an irregular tick (a late timer, a dropped tick) is integrated as what
it was rather than as a nominal period. Same parameterisation as ``ncps``'
``CfCCell`` (tests compare the two with copied weights), without its sparsity
mask, and with ``dt`` always shaped (B, 1).

``CfCCells`` runs several independent cells side by side (one per modality) as
batched matmuls: the same maths as a list of cells, in a quarter of the graph
nodes, which is what bounds latency of a batch-1 step on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lecun_tanh(x: torch.Tensor) -> torch.Tensor:
    return 1.7159 * torch.tanh(0.666 * x)


class ParallelLinear(nn.Module):
    """``cells`` independent Linear layers applied to (B, cells, in) -> (B, cells, out)."""

    def __init__(self, cells: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cells, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(cells, out_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.bias, -bound, bound)
        for w in self.weight:  # xavier per cell, as ncps initialises each Linear
            nn.init.xavier_uniform_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cellwise(x, self.weight) + self.bias


def cellwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(..., cells, in) x (cells, in, out) -> (..., cells, out), as one batched matmul over the cells.

    Not ``matmul(x.unsqueeze(-2), weight)``: that broadcasts the weight over the batch, and its
    backward reduces over it: measured 10x slower forward and backward on a CPU (training's
    tick-by-tick loop is made of these).
    """
    lead = x.shape[:-2]
    flat = x.reshape(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)          # (cells, N, in)
    return torch.bmm(flat, weight).transpose(0, 1).reshape(*lead, x.shape[-2], weight.shape[-1])


class CfCCells(nn.Module):
    MODES = ("default", "no_gate", "pure")

    def __init__(self, cells: int, input_size: int, hidden_size: int, mode: str = "default",
                 backbone_units: int = 64, backbone_layers: int = 1):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown CfC mode {mode!r}; allowed: {list(self.MODES)}")
        self.cells, self.input_size, self.hidden_size, self.mode = cells, input_size, hidden_size, mode
        width = input_size + hidden_size
        self.backbone = nn.ModuleList()
        for _ in range(backbone_layers):
            self.backbone.append(ParallelLinear(cells, width, backbone_units))
            width = backbone_units
        # ncps' ff1, ff2, time_a and time_b, stacked along the output axis in that order.
        self.heads = ParallelLinear(cells, width, hidden_size * (1 if mode == "pure" else 4))
        if mode == "pure":
            self.w_tau = nn.Parameter(torch.zeros(cells, hidden_size))
            self.A = nn.Parameter(torch.ones(cells, hidden_size))

    def forward(self, x: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """x: (B, cells, input), h: (B, cells, hidden), dt: (B, 1) seconds in fp32 -> new h."""
        return self.advance(self.input_part(x), h, dt)

    # The first backbone layer reads [x, h]; its x half does not depend on the state, so training
    # computes it for every tick of a chunk at once (``input_part``) and steps only the h half tick
    # by tick (``advance``). The live step runs the same two functions, so there is one arithmetic.

    def _first(self) -> ParallelLinear:
        return self.backbone[0] if len(self.backbone) else self.heads

    def input_part(self, x: torch.Tensor) -> torch.Tensor:
        """(..., cells, input) -> the first layer's pre-activation from the input, bias included."""
        first = self._first()
        return cellwise(x, first.weight[:, :self.input_size]) + first.bias

    def advance(self, xw: torch.Tensor, h: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """``input_part(x)`` (B, cells, width), h (B, cells, hidden), dt (B, 1) -> new h."""
        z = xw + cellwise(h, self._first().weight[:, self.input_size:])
        if len(self.backbone):
            z = lecun_tanh(z)
            for layer in self.backbone[1:]:
                z = lecun_tanh(layer(z))
            z = self.heads(z)
        dt = dt.unsqueeze(-1)  # (B, 1, 1): one elapsed time for every cell
        if self.mode == "pure":
            ff1 = z
            return -self.A * torch.exp(-dt * (torch.abs(self.w_tau) + torch.abs(ff1))) * ff1 + self.A
        ff1, ff2, t_a, t_b = z.chunk(4, dim=-1)
        ff1, ff2 = torch.tanh(ff1), torch.tanh(ff2)
        t_interp = torch.sigmoid(t_a * dt + t_b)
        if self.mode == "no_gate":
            return ff1 + t_interp * ff2
        return ff1 * (1.0 - t_interp) + t_interp * ff2
