"""Leaky integrate-and-fire (LIF) spiking layer.

Same dynamics as snnTorch's ``Leaky`` with subtract reset, in snnTorch's order
of float operations::

    reset_t = H(mem_{t-1} - threshold)
    mem_t   = (beta * mem_{t-1} + current) - reset_t * threshold
    spk_t   = H(mem_t - threshold)

The membrane starts at rest every control tick and the current is constant
over the ``num_steps`` steps, so a neuron's spike count is a function of its
current alone, and (checked below) a non-decreasing one: it fires at least k
times exactly when the current exceeds an onset current ``onset[k-1]``. The layer finds those
onsets once, at construction, by running the recurrence above (unrolled over
all ``num_steps`` steps, in float32) inside a bisection over every float32
value, and a tick then computes the count as a Heaviside of the current against
each onset: five graph nodes in all instead of four per unrolled step (128).

That is the same function, not an approximation, wherever the count is
monotone in the current. ``test/test_spiking.py`` checks every float32 current
between the first and the last onset against the unrolled recurrence (and
snnTorch) for the default and the other tested configurations; below the first
onset and above the last the recurrence provably never or always fires (the
membrane is monotone in the current while the spike train is the same). For
any configuration the construction checks the counts around every onset and on
a sweep; should they disagree, the layer runs the unrolled steps on every tick
instead. So relative to "spike steps unrolled": the steps are unrolled when the
model is built, and the exported graph holds their result, with no Loop op
either way.

Training (``train()`` with gradients) unrolls the steps on every call, because
the surrogate gradient needs them: a straight-through estimator adds snnTorch's
arctan surrogate gradient (``ATan``) without changing the forward value, so
training and the exported engine compute the same spikes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

_INF_BITS = 0x7F800000  # float32 +inf: fires on every step


def heaviside(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, torch.ones_like(x), torch.zeros_like(x))


def spike(x: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Heaviside forward value with snnTorch's arctan surrogate gradient."""
    hard = heaviside(x)
    # d/dx [atan(pi/2 * alpha * x) / pi] = (alpha / 2) / (1 + (pi/2 * alpha * x)^2), snnTorch's ATan.
    soft = torch.atan(0.5 * math.pi * alpha * x) / math.pi
    return hard + (soft - soft.detach())


def unrolled_counts(current: np.ndarray, beta: float, threshold: float, steps: int) -> np.ndarray:
    """Spike counts of the recurrence above, stepped ``steps`` times in float32 (the reference)."""
    current = np.asarray(current, dtype=np.float32)
    b, thr, zero = np.float32(beta), np.float32(threshold), np.float32(0.0)
    mem = np.zeros_like(current)
    fired = np.zeros(current.shape, dtype=bool)
    count = np.zeros(current.shape, dtype=np.int64)
    with np.errstate(over="ignore"):  # a huge current overflows to inf, which fires, as in torch
        for _ in range(steps):
            mem = (b * mem + current) - np.where(fired, thr, zero)  # reset * thr is thr or 0 exactly
            fired = mem > thr
            count += fired
    return count


def spike_onsets(beta: float, threshold: float, steps: int) -> np.ndarray:
    """onset[k] = the largest float32 current that fires at most k times, k = 0 .. steps - 1.

    A bisection over float32 bit patterns (their order is the order of the
    non-negative floats): 0 never fires, +inf fires on every step.
    """
    k = np.arange(steps)
    lo = np.zeros(steps, dtype=np.int64)
    hi = np.full(steps, _INF_BITS, dtype=np.int64)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        few = unrolled_counts(mid.astype(np.int32).view(np.float32), beta, threshold, steps) <= k
        lo, hi = np.where(few, mid, lo), np.where(few, hi, mid)
    return lo.astype(np.int32).view(np.float32)


def counts_from_onsets(current: np.ndarray, onsets: np.ndarray) -> np.ndarray:
    return (np.asarray(current, dtype=np.float32)[..., None] > onsets).sum(axis=-1)


def onsets_hold_near_each_onset(onsets: np.ndarray, beta: float, threshold: float, ulps: int = 64) -> bool:
    """Whether the onset form matches the recurrence within ``ulps`` float32 steps of every onset
    and on a log-spaced sweep across them: where the count is not monotone, it shows here."""
    bits = onsets.view(np.int32).astype(np.int64)[:, None] + np.arange(-ulps, ulps + 1)
    near = bits[bits >= 0].astype(np.int32).view(np.float32)
    top = max(float(onsets[-1]), 1e-30)
    sweep = np.geomspace(max(float(onsets[0]), 1e-30) / 2, 2 * top, 4096, dtype=np.float32)
    probe = np.concatenate([near, sweep, -sweep])
    return bool(np.array_equal(unrolled_counts(probe, beta, threshold, len(onsets)),
                               counts_from_onsets(probe, onsets)))


class LeakyIntegrateFire(nn.Module):
    """LIF neurons driven by a constant current for ``num_steps`` steps, from rest.

    The membrane starts at rest every control tick: the spikes encode the
    current tick's features, and memory across ticks is the CfC cell's job.
    Returns the spike rate (spikes / steps) in [0, 1].
    """

    def __init__(self, beta: float, threshold: float, num_steps: int):
        super().__init__()
        self.beta = float(beta)
        self.threshold = float(threshold)
        self.num_steps = int(num_steps)
        onsets = spike_onsets(self.beta, self.threshold, self.num_steps)
        self.exact_onsets = onsets_hold_near_each_onset(onsets, self.beta, self.threshold)
        self.register_buffer("onsets", torch.from_numpy(onsets.copy()), persistent=False)
        grid = torch.linspace(SLOPE_LO, SLOPE_HI, SLOPE_POINTS, dtype=torch.float64).float()
        self.register_buffer("slope_table", surrogate_slope(grid, self.beta, self.threshold, self.num_steps),
                             persistent=False)

    def step(self, current: torch.Tensor, mem: torch.Tensor, spk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step; the reset uses the previous spike, H(mem_{t-1} - threshold), detached as in snnTorch."""
        mem = self.beta * mem + current - spk.detach() * self.threshold
        return spike(mem - self.threshold), mem

    def unrolled(self, current: torch.Tensor) -> torch.Tensor:
        mem = torch.zeros_like(current)
        spk = torch.zeros_like(current)
        count = torch.zeros_like(current)
        for _ in range(self.num_steps):
            spk, mem = self.step(current, mem, spk)
            count = count + spk
        return count * (1.0 / self.num_steps)

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if not self.exact_onsets:
            return self.unrolled(current)
        if self.training and torch.is_grad_enabled():
            return _SurrogateRate.apply(current, self.onsets, self.slope_table.to(current.dtype), self.num_steps)
        # One Heaviside per onset, H(current - onset[k]): 1 when the current fires at least k + 1 times.
        # Written as a comparison and a cast (the same values): a Where against constant ones and
        # zeros the size of the comparison costs the runtime more than the rest of the layer.
        count = (current.unsqueeze(-1) > self.onsets).to(current.dtype).sum(dim=-1)
        return count * (1.0 / self.num_steps)



# The surrogate gradient's table: currents in [SLOPE_LO, SLOPE_HI] on a grid fine against the width of
# one ATan bump in current (~0.015 for the defaults: 40 grid steps), clamped to the ends outside it.
SLOPE_LO, SLOPE_HI, SLOPE_POINTS = -4.0, 8.0, 32769


def surrogate_slope(current: torch.Tensor, beta: float, threshold: float, steps: int,
                    alpha: float = 2.0) -> torch.Tensor:
    """d rate / d current of ``LeakyIntegrateFire.unrolled`` under autograd (ATan surrogate), exactly.

    The reset term is detached (as in snnTorch), so d mem_t / d current = (1 - beta^t) / (1 - beta)
    whatever spiked, and the unrolled graph's gradient is sum_t ATan'(mem_t - threshold) times that.
    """
    with torch.no_grad():
        mem = torch.zeros_like(current)
        fired = torch.zeros_like(current)
        slope = torch.zeros_like(current)
        gain = 0.0
        for _ in range(steps):
            mem = beta * mem + current - fired * threshold
            fired = heaviside(mem - threshold)
            gain = beta * gain + 1.0
            x = 0.5 * math.pi * alpha * (mem - threshold)
            slope += (0.5 * alpha * gain) / (1.0 + x * x)
        return slope / steps


class _SurrogateRate(torch.autograd.Function):
    """The spike rate (from the onsets: the same counts as the unrolled steps) with the unrolled steps'
    surrogate gradient, read from a table of ``surrogate_slope`` instead of differentiating 32 steps.

    The layer runs on every tick of a training chunk (16 episodes x 120 ticks x 5 x 64 neurons); the
    32-step graph was a third of a training step's time and most of its memory.
    """

    @staticmethod
    def forward(ctx, current, onsets, table, steps: int):
        count = torch.searchsorted(onsets, current.contiguous(), right=False).to(current.dtype)
        ctx.save_for_backward(current, table)
        return count * (1.0 / steps)

    @staticmethod
    def backward(ctx, grad):
        current, table = ctx.saved_tensors
        pos = (current.clamp(SLOPE_LO, SLOPE_HI) - SLOPE_LO) * ((SLOPE_POINTS - 1) / (SLOPE_HI - SLOPE_LO))
        lo = pos.floor().clamp(max=SLOPE_POINTS - 2)
        frac = pos - lo
        lo = lo.long()
        slope = table[lo] * (1.0 - frac) + table[lo + 1] * frac
        return grad * slope, None, None, None
