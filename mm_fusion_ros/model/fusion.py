"""Fusion strategies over per-modality tokens.

Every strategy takes tokens (B, M, D) and a modality mask (B, M) of 0/1 and
returns ``(fused (B, D), attention (B, M, M), contribution (B, M))``. A masked
modality contributes nothing: its token is zeroed and it is excluded from
attention keys and from pooling, so its input cannot reach the output.
``attention`` is the modality-to-modality attention for the attention-based
strategies and the diagonal of ``contribution`` for the others.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MODALITIES

# Large negative additive bias for masked keys. -1e4 rather than -inf or -1e9:
# it survives fp16 engines (max 65504) and an all-masked row stays finite.
MASKED = -1.0e4


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask.unsqueeze(-1)
    return (tokens * w).sum(dim=1) / torch.clamp(w.sum(dim=1), min=1.0)


def share(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalise non-negative per-modality values over the present modalities."""
    v = values * mask
    return v / torch.clamp(v.sum(dim=1, keepdim=True), min=1e-6)


class ModalityAttention(nn.Module):
    """Multi-head attention over a handful of modality tokens with an additive bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, m, d = tokens.shape
        q, k, v = self.qkv(self.norm(tokens)).view(b, m, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim ** -0.5) + bias.unsqueeze(1)
        probs = torch.softmax(scores, dim=-1)
        mixed = torch.matmul(probs, v).transpose(1, 2).reshape(b, m, d)
        return tokens + self.out(mixed), probs.mean(dim=1)


def key_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, M) mask -> (B, M, M) additive bias that hides masked keys from every query."""
    return ((1.0 - mask) * MASKED).unsqueeze(1).expand(-1, mask.shape[1], -1)


def query_rows(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention as reported: a masked modality's own query row is zero, not its stale state's view."""
    return probs * mask.unsqueeze(-1)


def column_share(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How much attention each key receives from the present queries, normalised."""
    received = (probs * mask.unsqueeze(-1)).sum(dim=1)
    return share(received, mask)


class EarlyFusion(nn.Module):
    """Concatenate the masked tokens and project."""

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.modalities = modalities
        self.proj = nn.Linear(dim * modalities, dim)

    def fuse(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only the fused vector: what the hybrid strategy uses of this path."""
        return torch.tanh(self.proj((tokens * mask.unsqueeze(-1)).flatten(1)))

    def forward(self, tokens, mask):
        masked = tokens * mask.unsqueeze(-1)
        fused = torch.tanh(self.proj(masked.flatten(1)))
        # Contribution: size of each modality's block of the projection.
        blocks = self.proj.weight.view(self.proj.out_features, self.modalities, -1)
        parts = torch.einsum("omd,bmd->bmo", blocks, masked)
        contribution = share(parts.norm(dim=-1), mask)
        return fused, contribution.unsqueeze(-1) * torch.eye(self.modalities), contribution


class LateFusion(nn.Module):
    """A head per modality; learned weights renormalised over present modalities."""

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(modalities))
        self.logits = nn.Parameter(torch.zeros(modalities))

    def forward(self, tokens, mask):
        outs = torch.stack([head(tokens[:, i]) for i, head in enumerate(self.heads)], dim=1)
        weights = share(torch.exp(self.logits).unsqueeze(0).expand_as(mask), mask)
        fused = (outs * weights.unsqueeze(-1)).sum(dim=1)
        return fused, weights.unsqueeze(-1) * torch.eye(weights.shape[1]), weights


class HybridFusion(nn.Module):
    """Cross-modal attention over modality tokens, plus the early (concatenation) path."""

    def __init__(self, dim: int, modalities: int, heads: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, modalities, dim))
        self.attn = ModalityAttention(dim, heads)
        self.early = EarlyFusion(dim, modalities)
        self.mix = nn.Linear(2 * dim, dim)

    def forward(self, tokens, mask):
        mixed, probs = self.attn(tokens + self.embed, key_bias(mask))
        pooled = masked_mean(mixed, mask)
        # Not self.early(...): its contribution would be computed and thrown away on every tick,
        # work the exported graph prunes but eager would still do (an unfair handicap for eager).
        early = self.early.fuse(tokens, mask)
        fused = torch.tanh(self.mix(torch.cat([pooled, early], dim=1)))
        return fused, query_rows(probs, mask), column_share(probs, mask)


class HierarchicalFusion(nn.Module):
    """Pairwise cross-attention inside modality groups, then global attention.

    Groups gather modalities that describe the same thing: (camera, lidar) see the
    scene, (audio, imu, joint_state) feel the arm itself: contact, vibration, where it is.
    """

    GROUPS = (("camera", "lidar"), ("audio", "imu", "joint_state"))

    def __init__(self, dim: int, modalities: int, heads: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, modalities, dim))
        self.pairwise = ModalityAttention(dim, heads)
        self.global_attn = ModalityAttention(dim, heads)
        self.proj = nn.Linear(dim, dim)
        same_group = torch.eye(modalities)
        for group in self.GROUPS:
            for i in (MODALITIES.index(n) for n in group):
                for j in (MODALITIES.index(n) for n in group):
                    same_group[i, j] = 1.0
        self.register_buffer("group_bias", (1.0 - same_group) * MASKED, persistent=False)

    def forward(self, tokens, mask):
        x = tokens + self.embed
        x, _ = self.pairwise(x, key_bias(mask) + self.group_bias)
        x, probs = self.global_attn(x, key_bias(mask))
        fused = torch.tanh(self.proj(masked_mean(x, mask)))
        return fused, query_rows(probs, mask), column_share(probs, mask)


class BilinearFusion(nn.Module):
    """Low-rank multiplicative fusion (Liu et al. 2018, "Efficient Low-rank Multimodal Fusion").

    Each modality gives ``rank`` factors ``1 + A_m z_m``; their product over the
    modalities, summed over the rank, holds every uni-, bi-, tri- and four-modal
    interaction without the full outer-product tensor. A masked modality's
    factor is exactly 1, the identity of the product: it is left out, not
    replaced by a learned stand-in that a missing sensor would still steer.
    """

    def __init__(self, dim: int, modalities: int, rank: int):
        super().__init__()
        self.rank, self.dim = rank, dim
        # Small factors at init keep the product of four near 1 instead of exploding or vanishing.
        self.factors = nn.Parameter(torch.randn(modalities, dim, rank * dim) * (0.5 / dim ** 0.5))
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens, mask):
        b, m, _ = tokens.shape
        data = torch.einsum("bmd,mde->bme", tokens * mask.unsqueeze(-1), self.factors)  # (B, M, rank * D)
        product = torch.prod(1.0 + data, dim=1).view(b, self.rank, self.dim)
        fused = torch.tanh(torch.einsum("r,brd->bd", self.rank_weights, product) - self.rank_weights.sum()
                           + self.bias)
        # Contribution: size of each modality's data-dependent factor part (zero when masked).
        contribution = share(data.norm(dim=-1), mask)
        return fused, contribution.unsqueeze(-1) * torch.eye(m), contribution


class AdaptiveFusion(nn.Module):
    """Quality-gated fusion: each modality's token rates its own reliability.

    A per-modality gate reads the token and gives a score in (0, 1); the scores
    of the present modalities are renormalised into weights for a weighted sum
    of the tokens. A degraded stream (a camera in the dark, a microphone in
    clipping) can learn to weigh itself down, tick by tick, where late fusion's
    weights are fixed after training.
    """

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(1, modalities, dim))
        self.gate_weight = nn.Parameter(torch.randn(modalities, dim) * (1.0 / dim ** 0.5))
        self.gate_bias = nn.Parameter(torch.zeros(modalities))
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens, mask):
        m = tokens.shape[1]
        quality = torch.sigmoid(torch.einsum("bmd,md->bm", tokens, self.gate_weight) + self.gate_bias)
        weights = share(quality, mask)  # zero for a masked modality, so its token cannot reach the sum
        pooled = ((tokens + self.embed) * weights.unsqueeze(-1)).sum(dim=1)
        fused = torch.tanh(self.proj(pooled))
        return fused, weights.unsqueeze(-1) * torch.eye(m), weights


def make_fusion(strategy: str, dim: int, modalities: int, heads: int, rank: int = 4) -> nn.Module:
    if strategy == "early":
        return EarlyFusion(dim, modalities)
    if strategy == "late":
        return LateFusion(dim, modalities)
    if strategy == "hybrid":
        return HybridFusion(dim, modalities, heads)
    if strategy == "hierarchical":
        return HierarchicalFusion(dim, modalities, heads)
    if strategy == "bilinear":
        return BilinearFusion(dim, modalities, rank)
    if strategy == "adaptive":
        return AdaptiveFusion(dim, modalities)
    raise ValueError(f"unknown fusion strategy {strategy!r}; "
                     "allowed: early, late, hybrid, hierarchical, bilinear, adaptive")
