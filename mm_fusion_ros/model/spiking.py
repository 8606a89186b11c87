"""Leaky integrate-and-fire (LIF) spiking layer.

Same dynamics as snnTorch's ``Leaky`` with subtract reset::

    reset_t = H(mem_{t-1} - threshold)
    mem_t   = beta * mem_{t-1} + current - reset_t * threshold
    spk_t   = H(mem_t - threshold)

The Heaviside is ``torch.where`` so the unrolled layer exports to ONNX without a
custom op. During training a straight-through estimator adds the arctan
surrogate's gradient (snnTorch's default ``ATan``) without changing the forward
value, so training and the exported engine compute the same spikes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def heaviside(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.zeros_like(x))


def spike(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Heaviside forward value with snnTorch's arctan surrogate gradient."""
    hard = heaviside(x)
    # d/dx [atan(pi/2 * alpha * x) / pi] = (alpha / 2) / (1 + (pi/2 * alpha * x)^2), snnTorch's ATan.
    soft = torch.atan(0.5 * math.pi * alpha * x) / math.pi
    return hard + (soft - soft.detach())


class LeakyIntegrateFire(nn.Module):
    """LIF neurons driven by a constant current for ``num_steps`` unrolled steps.

    The membrane starts at rest every control tick: the spikes encode the
    current tick's features, and memory across ticks is the CfC cell's job.
    Returns the spike rate (spikes / steps) in [0, 1].
    """

    def __init__(self, beta: float, threshold: float, num_steps: int):
        super().__init__()
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.num_steps = int(num_steps)

    def step(self, current: torch.Tensor, mem: torch.Tensor, spk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training-mode step; the reset uses the previous spike, H(mem_{t-1} - threshold)."""
        mem = self.beta * mem + current - spk.detach() * self.threshold
        return spike(mem - self.threshold), mem

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            mem = torch.zeros_like(current)
            spk = torch.zeros_like(current)
            count = torch.zeros_like(current)
            for _ in range(self.num_steps):
                spk, mem = self.step(current, mem, spk)
                count = count + spk
            return count * (1.0 / self.num_steps)
        # Inference: four graph nodes per unrolled step instead of ten. The subtract reset
        # selects a precomputed (current - threshold) drive rather than multiplying the
        # spike by the threshold, and spikes stay boolean until counted once at the end.
        # beta*mem + (current - thr) may round differently from snnTorch's
        # (beta*mem + current) - thr by one ulp; the tests bound what that can change.
        drive_after_spike = current - self.threshold
        threshold = torch.full_like(current, self.threshold)  # a tensor: no Casts in the graph
        mem = torch.zeros_like(current)
        fired = torch.zeros_like(current, dtype=torch.bool)
        spikes = []
        for _ in range(self.num_steps):  # unrolled at export: no Loop op in the graph
            mem = self.beta * mem + torch.where(fired, drive_after_spike, current)
            fired = mem > threshold
            spikes.append(fired)
        count = torch.cat(spikes, dim=-1).to(current.dtype).unflatten(-1, (self.num_steps, -1)).sum(dim=-2)
        return count * (1.0 / self.num_steps)
