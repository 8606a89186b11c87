"""LeakyIntegrateFire against snnTorch's Leaky neuron (the independent reference).

Our layer returns the spike *rate* (count / num_steps) of LIF neurons driven by a
constant current from mem = 0; snnTorch is stepped by hand with the same current
and its spikes are counted.
"""

from __future__ import annotations

import numpy as np
import pytest
import snntorch
import torch

from mm_fusion_ros.model.spiking import (LeakyIntegrateFire, counts_from_onsets, onsets_hold_near_each_onset,
                                         spike_onsets, surrogate_slope, unrolled_counts)

BETA, THRESHOLD, STEPS = 0.95, 1.0, 32


def currents(seed: int = 1234, n: int = 4096) -> torch.Tensor:
    """A few thousand currents spanning [-0.5, 3], shaped (B, M, D) like the network's, plus edge values."""
    g = torch.Generator().manual_seed(seed)
    random = torch.rand(n, generator=g) * 3.5 - 0.5
    grid = torch.linspace(-0.5, 3.0, 1024)
    # Exactly at threshold, the steady-state boundary current (1 - beta) * thr, zero, and their neighbours.
    edges = torch.tensor([0.0, 1.0, 2.0, 0.05, 0.1, 1.05, 1.95])
    edges = torch.cat([edges, torch.nextafter(edges, torch.full_like(edges, 10.0)),
                       torch.nextafter(edges, torch.full_like(edges, -10.0))])
    allc = torch.cat([random, grid, edges])
    allc = torch.cat([allc, torch.zeros((-len(allc)) % 64)])
    return allc.view(-1, 4, 16)


def snntorch_counts(current: torch.Tensor, beta=BETA, threshold=THRESHOLD, steps=STEPS,
                    grad: bool = False) -> torch.Tensor:
    neuron = snntorch.Leaky(beta=beta, threshold=threshold, reset_mechanism="subtract")
    mem = torch.zeros_like(current)
    count = torch.zeros_like(current)
    with torch.set_grad_enabled(grad):
        for _ in range(steps):
            spk, mem = neuron(current, mem)
            count = count + spk
    return count


@pytest.mark.parametrize("beta, threshold, steps", [(BETA, THRESHOLD, STEPS), (0.8, 0.5, 17), (1.0, 1.0, 8)])
def test_eval_path_matches_snntorch_exactly(beta, threshold, steps):
    cur = currents()
    if threshold != 1.0:
        cur = cur * threshold
    lif = LeakyIntegrateFire(beta, threshold, steps).eval()
    with torch.no_grad():
        rate = lif(cur)
    ref = snntorch_counts(cur, beta, threshold, steps)
    assert rate.shape == cur.shape and rate.dtype == cur.dtype
    assert (ref == 0).any() and (ref > 0).any()  # the range exercises silent and firing neurons
    counts = rate * steps
    mismatched = (counts.round() != ref)
    assert not mismatched.any(), (
        f"{int(mismatched.sum())} of {cur.numel()} neurons differ; currents "
        f"{cur[mismatched][:10].tolist()}: ours {counts[mismatched][:10].tolist()} vs snnTorch {ref[mismatched][:10].tolist()}")
    # The rate is count / steps exactly, not just close to it.
    assert torch.equal(rate, ref * (1.0 / steps))


def test_spike_counts_have_the_expected_extremes():
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS).eval()
    cur = torch.tensor([[-1.0, 0.0, 0.04, 1.0, 1.0001, 3.0, 100.0]])
    with torch.no_grad():
        rate = lif(cur)
    # Non-positive and sub-rheobase currents (below (1 - beta) * thr = 0.05) never fire; a current of
    # exactly the threshold does not fire on the first step (mem > thr is strict) but does later;
    # a huge current fires every step.
    assert rate[0, 0] == 0 and rate[0, 1] == 0 and rate[0, 2] == 0
    assert rate[0, -1] == 1.0
    assert 0 < rate[0, 3] < 1 and rate[0, 4] > 0
    assert torch.all(rate[0, 3:].diff() >= 0)  # monotone in the current


def test_training_path_matches_eval_and_snntorch_and_has_surrogate_gradient():
    cur = currents(seed=99)
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS)
    with torch.no_grad():
        eval_rate = lif.eval()(cur)

    lif.train()
    x = cur.clone().requires_grad_(True)
    train_rate = lif(x)
    assert train_rate.requires_grad
    # Same forward value as the inference path, and a true Heaviside: whole spike counts.
    assert torch.equal(train_rate.detach(), eval_rate)
    counts = train_rate.detach() * STEPS
    assert torch.equal(counts, counts.round())

    # Surrogate gradient: non-zero, and equal to snnTorch's ATan surrogate through the same unrolled
    # dynamics (snnTorch also detaches the reset).
    train_rate.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad != 0).float().mean() > 0.9
    y = cur.clone().requires_grad_(True)
    ref = snntorch_counts(y, grad=True)
    assert torch.equal(ref.detach() * (1.0 / STEPS), train_rate.detach())
    (ref.sum() / STEPS).backward()
    # The exact surrogate slope (closed form of the unrolled graph's gradient) is snnTorch's ...
    exact = surrogate_slope(cur, BETA, THRESHOLD, STEPS)
    torch.testing.assert_close(exact, y.grad, rtol=1e-5, atol=1e-6)
    # ... and training reads it from a table, linearly interpolated: close on average, and off by
    # more than 2 % of the largest slope only next to the onsets, where the exact slope jumps.
    err = (x.grad - y.grad).abs()
    assert float(err.sum() / y.grad.abs().sum()) < 5e-3
    assert float((err > 0.02 * y.grad.abs().max()).float().mean()) < 0.02


def test_training_mode_without_grad_uses_inference_path_with_same_values():
    cur = currents(seed=5)
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS).train()
    with torch.no_grad():
        a = lif(cur)
    with torch.enable_grad():
        b = lif(cur.clone().requires_grad_(True)).detach()
    assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("example", ["silent", "mixed"])
def test_eval_path_traces_without_data_dependent_control_flow(example):
    """A trace records one path; if the eval path branched on the data, the trace taken at one input
    would be wrong at another. Trace at a silent (no spikes) and at a mixed input, check at others."""
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS).eval()
    mixed = torch.linspace(-0.5, 3.0, 2 * 4 * 16).view(2, 4, 16)
    example_input = torch.full((2, 4, 16), -0.25) if example == "silent" else mixed
    checks = [mixed.flip(-1), currents(seed=7), torch.full((3, 4, 16), -0.25), torch.full((1, 4, 16), 5.0)]
    with torch.no_grad():
        traced = torch.jit.trace(lif, example_input, check_trace=False)
        graph = str(traced.inlined_graph)
        assert "prim::If" not in graph and "prim::Loop" not in graph
        for x in checks:
            out = traced(x)
            assert torch.equal(out, lif(x))
            assert torch.equal(out, snntorch_counts(x) / STEPS)


def test_eval_path_exports_with_torch_export():
    """torch.export refuses Python branches on tensor values, so this fails on data-dependent control flow."""
    lif = LeakyIntegrateFire(BETA, THRESHOLD, 8).eval()
    x = torch.linspace(-0.5, 3.0, 4 * 16).view(1, 4, 16)
    with torch.no_grad():
        exported = torch.export.export(lif, (x,))
        y = -x.flip(-1) + 1.0
        assert torch.equal(exported.module()(y), lif(y))


# ---------------------------------------------------------------- the onset form of the eval path

def test_reference_recurrence_is_snntorch():
    """``unrolled_counts`` (numpy, float32) is the recurrence the onsets are found with: same counts as
    snnTorch's Leaky on the standard currents, for every tested configuration."""
    for beta, threshold, steps in [(BETA, THRESHOLD, STEPS), (0.8, 0.5, 17), (1.0, 1.0, 8)]:
        cur = currents(seed=11) * threshold
        ref = snntorch_counts(cur, beta, threshold, steps).numpy()
        assert np.array_equal(unrolled_counts(cur.numpy(), beta, threshold, steps), ref)


@pytest.mark.parametrize("beta, threshold, steps", [(BETA, THRESHOLD, STEPS), (0.8, 0.5, 17), (1.0, 1.0, 8)])
def test_onsets_give_the_unrolled_count_for_every_float32_current(beta, threshold, steps):
    """Exhaustive between the first and the last onset (about 35 M currents for the default): the
    count from the onsets equals the count of the unrolled steps for every float32 value there.
    Below the first onset and above the last the recurrence never / always fires (the membrane is
    monotone in the current while the spike train is the same); a sweep checks those ranges too."""
    lif = LeakyIntegrateFire(beta, threshold, steps)
    onsets = lif.onsets.numpy()
    assert lif.exact_onsets and np.all(np.diff(onsets) > 0)
    lo, hi = onsets[:1].view(np.int32)[0], onsets[-1:].view(np.int32)[0] + 2
    for start in range(int(lo), int(hi), 1 << 22):
        x = np.arange(start, min(start + (1 << 22), int(hi)), dtype=np.int32).view(np.float32)
        got = counts_from_onsets(x, onsets)
        want = unrolled_counts(x, beta, threshold, steps)
        bad = np.nonzero(got != want)[0]
        assert bad.size == 0, f"current {x[bad[0]]!r}: onsets say {got[bad[0]]}, the steps {want[bad[0]]}"
    outside = np.concatenate([np.geomspace(1e-30, float(onsets[0]), 20000, dtype=np.float32),
                              np.geomspace(float(onsets[-1]) * 1.0001, 3e38, 20000, dtype=np.float32),
                              -np.geomspace(1e-30, 3e38, 2000, dtype=np.float32),
                              np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32)])
    assert np.array_equal(counts_from_onsets(outside, onsets), unrolled_counts(outside, beta, threshold, steps))


def test_eval_path_equals_the_unrolled_steps_in_torch():
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS).eval()
    bits = lif.onsets.numpy().view(np.int32).astype(np.int64)[:, None] + np.arange(-3, 4)
    cur = torch.from_numpy(bits.astype(np.int32).view(np.float32).reshape(1, -1))
    with torch.no_grad():
        assert torch.equal(lif(cur), lif.unrolled(cur))
    assert torch.equal(lif(cur) * STEPS, snntorch_counts(cur))


def test_layer_falls_back_to_the_unrolled_steps_where_the_onsets_do_not_hold(monkeypatch):
    import mm_fusion_ros.model.spiking as spiking

    monkeypatch.setattr(spiking, "onsets_hold_near_each_onset", lambda *a, **k: False)
    lif = LeakyIntegrateFire(BETA, THRESHOLD, STEPS).eval()
    assert not lif.exact_onsets
    calls = []
    monkeypatch.setattr(lif, "unrolled", lambda x: calls.append(x) or torch.zeros_like(x))
    lif(currents())
    assert calls


def test_onset_check_catches_a_wrong_onset():
    onsets = spike_onsets(BETA, THRESHOLD, STEPS)
    assert onsets_hold_near_each_onset(onsets, BETA, THRESHOLD)
    moved = onsets.copy()
    moved[5] = np.nextafter(moved[5], np.float32(10.0))  # one ulp too high: that current fires 6 times
    assert not onsets_hold_near_each_onset(moved, BETA, THRESHOLD)
