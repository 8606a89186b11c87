"""CfCCells against ncps' CfCCell (the reference implementation of Hasani et al.'s CfC).

Weights are copied from one ncps cell per modality cell: an ncps ``Linear`` weight
is (out, in) and ours is (cells, in, out), so it is transposed; ff1, ff2, time_a
and time_b are stacked along our heads' output axis in that order (pure mode:
ff1 only, plus w_tau and A). Compared at cell level: ncps' ``CfC`` sequence
wrapper squeezes the timespans wrongly for batch > 1.
"""

from __future__ import annotations

import pytest
import torch
from ncps.torch import CfCCell

from mm_fusion_ros.model.liquid import CfCCells

IN, HIDDEN, UNITS, BATCH, STEPS = 12, 10, 16, 5, 6


def make_refs(cells: int, mode: str, layers: int, seed: int = 0) -> list[CfCCell]:
    torch.manual_seed(seed)
    refs = [CfCCell(IN, HIDDEN, mode=mode, backbone_units=UNITS, backbone_layers=layers) for _ in range(cells)]
    # ncps initialises biases to PyTorch's defaults and pure mode's w_tau / A by xavier; perturb the
    # biases too so a bias that is dropped or misplaced cannot go unnoticed.
    with torch.no_grad():
        for ref in refs:
            for name, p in ref.named_parameters():
                if name.endswith("bias"):
                    p.add_(0.3 * torch.randn_like(p))
    return [r.eval() for r in refs]


def copy_into(ours: CfCCells, refs: list[CfCCell]) -> None:
    with torch.no_grad():
        for c, ref in enumerate(refs):
            linears = [m for m in ref.backbone if isinstance(m, torch.nn.Linear)] if ref.backbone is not None else []
            assert len(linears) == len(ours.backbone)
            for layer, lin in zip(ours.backbone, linears):
                layer.weight[c].copy_(lin.weight.T)
                layer.bias[c].copy_(lin.bias)
            heads = [ref.ff1] if ref.mode == "pure" else [ref.ff1, ref.ff2, ref.time_a, ref.time_b]
            ours.heads.weight[c].copy_(torch.cat([h.weight.T for h in heads], dim=1))
            ours.heads.bias[c].copy_(torch.cat([h.bias for h in heads]))
            if ref.mode == "pure":
                ours.w_tau[c].copy_(ref.w_tau[0])
                ours.A[c].copy_(ref.A[0])


def dts(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Different per batch row: nominal 10 ms ticks, a late one, a long gap and a tiny one.
    base = torch.tensor([[0.01], [0.013], [0.25], [1e-4], [1.5]])
    return base * (1.0 + 0.1 * torch.rand(BATCH, 1, generator=g))


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_single_cell_matches_ncps(mode, layers):
    (ref,) = make_refs(1, mode, layers)
    ours = CfCCells(1, IN, HIDDEN, mode=mode, backbone_units=UNITS, backbone_layers=layers).eval()
    copy_into(ours, [ref])
    g = torch.Generator().manual_seed(42)
    h_ref = torch.randn(BATCH, HIDDEN, generator=g) * 0.5
    h_ours = h_ref.clone().unsqueeze(1)
    with torch.no_grad():
        for step in range(STEPS):
            x = torch.rand(BATCH, IN, generator=g) * 2.0 - 0.5
            dt = dts(step)
            h_ref, out_ref = ref(x, h_ref, dt)
            h_ours = ours(x.unsqueeze(1), h_ours, dt)
            assert h_ours.shape == (BATCH, 1, HIDDEN)
            torch.testing.assert_close(h_ours[:, 0], out_ref, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            # Feed each implementation its own state back, so errors would accumulate.
    assert not torch.allclose(h_ref, torch.zeros_like(h_ref))


@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_several_cells_each_match_their_own_ncps_cell(mode):
    cells = 4
    refs = make_refs(cells, mode, layers=1, seed=3)
    ours = CfCCells(cells, IN, HIDDEN, mode=mode, backbone_units=UNITS, backbone_layers=1).eval()
    copy_into(ours, refs)
    g = torch.Generator().manual_seed(7)
    h = torch.randn(BATCH, cells, HIDDEN, generator=g)
    h_refs = [h[:, c].clone() for c in range(cells)]
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(BATCH, cells, IN, generator=g)
            dt = dts(10 + step)
            h = ours(x, h, dt)
            for c, ref in enumerate(refs):
                h_refs[c], _ = ref(x[:, c], h_refs[c], dt)
                torch.testing.assert_close(h[:, c], h_refs[c], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_cells_are_independent(mode):
    torch.manual_seed(0)
    ours = CfCCells(4, IN, HIDDEN, mode=mode, backbone_units=UNITS, backbone_layers=1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 4, IN, generator=g)
    h = torch.randn(BATCH, 4, HIDDEN, generator=g)
    dt = dts(0)
    x2, h2 = x.clone(), h.clone()
    x2[:, 2] = torch.randn(BATCH, IN, generator=g) * 3.0
    h3 = h.clone()
    h3[:, 2] = -h3[:, 2]
    with torch.no_grad():
        a, b, c = ours(x, h, dt), ours(x2, h2, dt), ours(x, h3, dt)
    others = [0, 1, 3]
    assert torch.equal(a[:, others], b[:, others])
    assert torch.equal(a[:, others], c[:, others])
    # ... and cell 2 itself did change, so the comparison means something.
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-3
    assert (a[:, 2] - c[:, 2]).abs().max() > 1e-3


def test_batch_rows_are_independent():
    torch.manual_seed(0)
    ours = CfCCells(4, IN, HIDDEN).eval()
    g = torch.Generator().manual_seed(2)
    x, h, dt = torch.randn(BATCH, 4, IN, generator=g), torch.randn(BATCH, 4, HIDDEN, generator=g), dts(1)
    with torch.no_grad():
        full = ours(x, h, dt)
        for i in range(BATCH):
            torch.testing.assert_close(ours(x[i:i + 1], h[i:i + 1], dt[i:i + 1]), full[i:i + 1],
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "no_gate", "pure"])
def test_dt_matters(mode):
    torch.manual_seed(0)
    ours = CfCCells(4, IN, HIDDEN, mode=mode, backbone_units=UNITS).eval()
    if mode == "pure":
        with torch.no_grad():
            ours.w_tau.normal_()  # zero-initialised; give the time constant something to do
    g = torch.Generator().manual_seed(3)
    x, h = torch.randn(BATCH, 4, IN, generator=g), torch.randn(BATCH, 4, HIDDEN, generator=g)
    with torch.no_grad():
        short = ours(x, h, torch.full((BATCH, 1), 0.01))
        long = ours(x, h, torch.full((BATCH, 1), 1.0))
        # dt is per batch row: row 0 at 1.0 s, the rest at 10 ms.
        mixed_dt = torch.full((BATCH, 1), 0.01)
        mixed_dt[0] = 1.0
        mixed = ours(x, h, mixed_dt)
    assert (short - long).abs().max() > 1e-2
    torch.testing.assert_close(mixed[0], long[0], rtol=0, atol=0)
    torch.testing.assert_close(mixed[1:], short[1:], rtol=0, atol=0)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="gated"):
        CfCCells(1, IN, HIDDEN, mode="gated")
