"""The whole FusionNet streaming step: shapes, ranges, masking, explicit state, checkpoints."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import with_strategy
from mm_fusion_ros.sim.task_state import PHASE_SOURCES, PHASES

from mm_fusion_ros.config import MODALITIES, ModelConfig
from mm_fusion_ros.sim.panda import READY_Q
from mm_fusion_ros.model.network import PhaseHead
from mm_fusion_ros.model.preprocess import PIXEL_FILTER_GAIN
from mm_fusion_ros.model import (INPUT_NAMES, OUTPUT_NAMES, FusionNet, build_model, config_mismatch, input_specs,
                                 load_checkpoint, output_specs, save_checkpoint)

STRATEGIES = ("early", "late", "hybrid", "hierarchical", "bilinear", "adaptive")
ATTENTION_STRATEGIES = ("hybrid", "hierarchical")


CELL_FLAG_SOURCES = {s for p, s in zip(PHASES, PHASE_SOURCES) if p not in PhaseHead.NOW}

# Every strategy, and one with queries over the camera's keypoints (KeypointRead) from the fused state,
# one with them from the audio cell's state, and one with the cue read (CueRead, three buttons).
VARIANTS = STRATEGIES + ("hybrid+keypoints", "hybrid+audio_keypoints", "hybrid+cue", "hybrid+cue+tool",
                         "hybrid+cue+tool+memory", "hybrid+cue+tool+memory+task")


@pytest.fixture(scope="module")
def models(default_config) -> dict[str, FusionNet]:
    return {s: build_model(with_strategy(default_config.model, s), seed=0) for s in VARIANTS}


def run(model: FusionNet, inputs: dict) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        outs = model(*[inputs[name] for name in INPUT_NAMES])
    assert len(outs) == len(OUTPUT_NAMES)
    return dict(zip(OUTPUT_NAMES, outs))


def assert_valid_outputs(model: FusionNet, outs: dict, batch: int) -> None:
    cfg = model.cfg
    for spec in output_specs(cfg, batch):
        t = outs[spec.name]
        assert tuple(t.shape) == spec.shape, spec.name
        assert str(t.dtype).removeprefix("torch.") == spec.dtype, spec.name
        assert torch.isfinite(t).all(), spec.name
    lower = torch.tensor(cfg.action.lower)
    upper = torch.tensor(cfg.action.upper)
    assert torch.all(outs["action"] >= lower) and torch.all(outs["action"] <= upper)


def extreme_inputs(cfg: ModelConfig, batch: int, make_inputs) -> list[dict]:
    base = make_inputs(cfg, 11, batch)
    n = cfg.audio.window_samples
    t = torch.arange(n) / cfg.audio.sample_rate
    square = torch.sign(torch.sin(2 * np.pi * 1000.0 * t)).expand(batch, n).contiguous()
    square[square == 0] = 1.0
    cases = []
    loud = dict(base)
    loud["camera"] = torch.full_like(base["camera"], 255)
    loud["audio"] = square
    loud["imu"] = torch.full_like(base["imu"], 1.0e4) * torch.tensor([1, -1, 1, -1, 1, -1.0])
    loud["lidar"] = torch.full_like(base["lidar"], cfg.lidar.range_max)
    loud["joint_state"] = torch.full_like(base["joint_state"], 1.0e4) * torch.tensor([1.0, -1.0]).repeat(cfg.action.dof)
    loud["dt"] = torch.full_like(base["dt"], 10.0)
    loud["state"] = torch.full_like(base["state"], 50.0)
    cases.append(loud)
    dark = dict(base)
    dark["camera"] = torch.zeros_like(base["camera"])
    dark["audio"] = torch.zeros_like(base["audio"])
    dark["imu"] = torch.full_like(base["imu"], -1.0e4)
    dark["lidar"] = torch.full_like(base["lidar"], float("inf"))
    dark["joint_state"] = torch.zeros_like(base["joint_state"])
    dark["dt"] = torch.zeros_like(base["dt"])
    dark["state"] = torch.full_like(base["state"], -50.0)
    cases.append(dark)
    return cases


# ---------------------------------------------------------------- shapes and ranges


@pytest.mark.parametrize("strategy", VARIANTS)
def test_forward_shapes_ranges_and_finiteness(models, strategy, make_inputs):
    model = models[strategy]
    assert model.cfg.fusion.strategy == strategy.partition("+")[0]
    assert (model.keypoint_read is not None) == strategy.endswith("keypoints")
    assert (model.cue_read is not None) == ("+cue" in strategy)
    assert model.action_head.tool == ("+tool" in strategy)
    assert (model.cue_read is not None and model.cue_read.gate is not None) == ("+memory" in strategy)
    for batch in (1, 3):
        inputs = make_inputs(model.cfg, 0, batch)
        for spec in input_specs(model.cfg, batch):
            assert tuple(inputs[spec.name].shape) == spec.shape
        assert_valid_outputs(model, run(model, inputs), batch)
        for case in extreme_inputs(model.cfg, batch, make_inputs):
            assert_valid_outputs(model, run(model, case), batch)


def test_input_and_output_specs_follow_config(default_config):
    cfg = default_config.model
    specs = {s.name: s for s in input_specs(cfg, 2)}
    assert tuple(specs) == INPUT_NAMES
    assert specs["camera"].shape == (2, 96, 96, 3) and specs["camera"].dtype == "uint8"
    assert specs["audio"].shape == (2, 16000)
    assert specs["imu"].shape == (2, 40, 6)
    assert specs["lidar"].shape == (2, 360)
    assert specs["joint_state"].shape == (2, 2 * cfg.action.dof) == (2, 14)   # positions, then velocities
    assert specs["joint_state"].dtype == "float32"
    assert INPUT_NAMES.index("joint_state") == INPUT_NAMES.index("lidar") + 1 == INPUT_NAMES.index("mask") - 1
    assert specs["mask"].shape == (2, 5) and specs["dt"].shape == (2, 1)
    assert specs["state"].shape == (2, 5, cfg.encoder.hidden)
    out = {s.name: s for s in output_specs(cfg, 2)}
    assert tuple(out) == OUTPUT_NAMES
    assert out["action"].shape == (2, 7)
    assert out["fused_state"].shape == (2, cfg.fused_state_dim)
    assert out["attention"].shape == (2, 5, 5) and out["contribution"].shape == (2, 5)


@pytest.mark.parametrize("strategy", ["early", "hierarchical"])
def test_action_is_scaled_into_configured_per_dof_limits(default_config, strategy, make_inputs):
    lower = (-2.0, -1.0, 0.0, 0.5, -0.1, 10.0, -30.0)
    upper = (-1.5, 1.0, 0.25, 3.0, 0.1, 12.0, 30.0)
    base = with_strategy(default_config.model, strategy)
    cfg = dataclasses.replace(base, action=dataclasses.replace(base.action, lower=lower, upper=upper))
    model = build_model(cfg, seed=4)
    for inputs in [make_inputs(cfg, 1, 4)] + extreme_inputs(cfg, 2, make_inputs):
        outs = run(model, inputs)
        assert_valid_outputs(model, outs, inputs["mask"].shape[0])
    # The head is affine in its MLP's output, then clamped: mean = (lower + upper) / 2 and std =
    # (upper - lower) / 4 until trained. The same network with the default limits gives action_default
    # in [-1, 1]; the custom one must be its affine image (the clamps map onto each other too).
    ref_model = build_model(base, seed=4)
    inputs = make_inputs(cfg, 0, 4)
    a_custom = run(model, inputs)["action"]
    a_default = run(ref_model, inputs)["action"]
    lo, hi = torch.tensor(lower), torch.tensor(upper)
    torch.testing.assert_close(a_custom, lo + (hi - lo) * (a_default + 1.0) / 2.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", VARIANTS)
def test_batch_rows_are_independent(models, strategy, make_inputs):
    model = models[strategy]
    inputs = make_inputs(model.cfg, 5, 3)
    inputs["mask"][1] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    inputs["mask"][2] = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    full = run(model, inputs)
    for i in range(3):
        single = run(model, {k: v[i:i + 1] for k, v in inputs.items()})
        for name in OUTPUT_NAMES:
            torch.testing.assert_close(single[name], full[name][i:i + 1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- masking


def _alternative(name: str, cfg: ModelConfig, inputs: dict, make_inputs) -> torch.Tensor:
    """Very different data for one modality (so an unmasked modality certainly moves the output)."""
    other = make_inputs(cfg, 99, inputs["mask"].shape[0])[name]
    if name == "camera":
        return 255 - inputs["camera"]
    if name == "audio":
        return torch.flip(other, dims=[1]) * 3.0
    if name == "imu":
        return other * 20.0
    if name == "lidar":
        return torch.flip(other, dims=[1]) * 0.1 + cfg.lidar.range_min
    if name == "joint_state":
        return -3.0 * torch.flip(other, dims=[1]) + 0.5
    raise AssertionError(name)


def _outputs_equal(a: dict, b: dict, names=("action", "fused_state", "attention", "contribution")) -> None:
    for name in names:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("strategy", VARIANTS)
@pytest.mark.parametrize("m", range(len(MODALITIES)), ids=MODALITIES)
def test_masked_modality_data_cannot_reach_outputs(models, strategy, m, make_inputs):
    model = models[strategy]
    name = MODALITIES[m]
    inputs = make_inputs(model.cfg, 1, 2)
    inputs["mask"][:, m] = 0.0
    base = run(model, inputs)
    assert torch.equal(base["new_state"][:, m], inputs["state"][:, m])  # a masked modality holds its state

    changed = dict(inputs)
    changed[name] = _alternative(name, model.cfg, inputs, make_inputs)
    if name == "audio":  # the cached log-mel frames are audio data too
        changed["audio_frames"] = -2.0 * inputs["audio_frames"] + 1.0
    outs = run(model, changed)
    _outputs_equal(base, outs)
    assert torch.equal(outs["new_state"], base["new_state"])

    if name != "camera":  # uint8 cannot be NaN; a dead float sensor can
        poisoned = dict(inputs)
        poisoned[name] = torch.full_like(inputs[name], float("nan"))
        outs = run(model, poisoned)
        _outputs_equal(base, outs)
        assert torch.equal(outs["new_state"], base["new_state"])

    # Control: the same change with the modality present moves the action. (A task-reading head's hold gate
    # starts sure, so a random intruder flag near 1 would scale every twist down to ~nothing: opened here.)
    present = dict(inputs)
    present["mask"] = torch.ones_like(inputs["mask"])
    present_changed = dict(present)
    present_changed[name] = changed[name]
    gate = model.action_head.hold_gate
    saved = None if gate is None else gate.bias.detach().clone()
    try:
        if gate is not None:
            with torch.no_grad():
                gate.bias.fill_(-50.0)
        a, b = run(model, present)["action"], run(model, present_changed)["action"]
    finally:
        if gate is not None:
            with torch.no_grad():
                gate.bias.copy_(saved)
    # (1e-6, not more: the same graph on the same inputs gives the same bits on CPU, so any difference is the
    # data's; an untrained task head, two tanh layers behind a softmax belief, passes the tone on at ~2e-6.)
    assert (a - b).abs().max() > 1e-6, f"changing present {name} did not change the action"


@pytest.mark.parametrize("strategy", VARIANTS)
@pytest.mark.parametrize("m", range(len(MODALITIES)), ids=MODALITIES)
def test_masked_modality_state_slot_cannot_reach_outputs(models, strategy, m, make_inputs):
    """The held state of a masked modality is passed through, and does not drive any fused output,
    attention included (also the masked modality's own query row: its stale state must not show)."""
    model = models[strategy]
    inputs = make_inputs(model.cfg, 2, 2)
    inputs["mask"][:, m] = 0.0
    base = run(model, inputs)
    changed = dict(inputs)
    changed["state"] = inputs["state"].clone()
    changed["state"][:, m] = -3.0 * inputs["state"][:, m] + 1.0
    outs = run(model, changed)
    assert torch.equal(outs["new_state"][:, m], changed["state"][:, m])
    others = [i for i in range(len(MODALITIES)) if i != m]
    assert torch.equal(outs["new_state"][:, others], base["new_state"][:, others])
    _outputs_equal(base, outs)
    # Attention *to* the masked modality is zero from every present query.
    assert torch.all(outs["attention"][:, others, m] <= 1e-6)

    # Control: with the modality present, its state slot matters (to the fused state at least: a head that
    # reads the task reads the cells of the sensors whose phase flags are memories, and the others' inputs only).
    present = {**inputs, "mask": torch.ones_like(inputs["mask"])}
    present_changed = {**changed, "mask": torch.ones_like(inputs["mask"])}
    a, b = run(model, present), run(model, present_changed)
    assert (a["fused_state"] - b["fused_state"]).abs().max() > 1e-5
    if model.cfg.action.reads == "fused" or MODALITIES[m] in CELL_FLAG_SOURCES:
        assert (a["action"] - b["action"]).abs().max() > 1e-5


@pytest.mark.parametrize("strategy", ATTENTION_STRATEGIES)
def test_attention_rows_of_present_queries_are_distributions_over_present_keys(models, strategy, make_inputs):
    model = models[strategy]
    masks = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1],
                          [1, 0, 0, 1, 0]], dtype=torch.float32)
    inputs = make_inputs(model.cfg, 7, len(masks))
    inputs["mask"] = masks
    att = run(model, inputs)["attention"]
    assert torch.all(att >= 0)
    for b, mask in enumerate(masks):
        present = mask.nonzero().flatten()
        absent = (mask == 0).nonzero().flatten()
        rows = att[b, present]
        torch.testing.assert_close(rows.sum(dim=-1), torch.ones(len(present)), rtol=0, atol=1e-5)
        assert torch.all(rows[:, absent] <= 1e-6)


@pytest.mark.parametrize("strategy", VARIANTS)
def test_all_modalities_masked_gives_finite_outputs(models, strategy, make_inputs):
    model = models[strategy]
    inputs = make_inputs(model.cfg, 3, 2)
    inputs["mask"] = torch.zeros_like(inputs["mask"])
    outs = run(model, inputs)
    assert_valid_outputs(model, outs, 2)
    assert torch.equal(outs["new_state"], inputs["state"])
    assert torch.all(outs["contribution"] == 0)
    # Nothing present: the outputs do not depend on any modality's data or state.
    other = make_inputs(model.cfg, 4, 2)
    other["mask"] = inputs["mask"]
    other["dt"] = inputs["dt"]
    _outputs_equal(outs, run(model, other), ("action", "fused_state", "contribution"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_contribution_is_a_distribution_over_present_modalities(models, strategy, make_inputs):
    model = models[strategy]
    masks = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0], [1, 1, 0, 0, 0],
                          [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 1, 0, 1]], dtype=torch.float32)
    inputs = make_inputs(model.cfg, 6, len(masks))
    inputs["mask"] = masks
    contrib = run(model, inputs)["contribution"]
    assert torch.all(contrib >= 0)
    assert torch.all(contrib[masks == 0] == 0)
    torch.testing.assert_close(contrib.sum(dim=1), torch.ones(len(masks)), rtol=0, atol=1e-5)
    # A single present modality carries everything.
    torch.testing.assert_close(contrib[3], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(contrib[6], torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- lidar robustness


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_invalid_lidar_returns_are_all_the_same_to_the_model(models, strategy, make_inputs):
    model = models[strategy]
    cfg = model.cfg.lidar
    inputs = make_inputs(model.cfg, 8, 2)
    invalid = torch.zeros(cfg.beams, dtype=torch.bool)
    invalid[::3] = True
    invalid[100:160] = True
    variants = {}
    for label, value in {"inf": float("inf"), "-inf": float("-inf"), "nan": float("nan"),
                         "below_min": 0.0, "just_below_min": cfg.range_min * 0.99,
                         "above_max": cfg.range_max * 1.5, "negative": -1.0}.items():
        lidar = inputs["lidar"].clone()
        lidar[:, invalid] = value
        variants[label] = run(model, {**inputs, "lidar": lidar})
    # A mixture of different invalid values beam by beam, too.
    lidar = inputs["lidar"].clone()
    idx = invalid.nonzero().flatten()
    pool = torch.tensor([float("inf"), float("nan"), 0.0, cfg.range_max + 1.0])
    lidar[:, idx] = pool[torch.arange(len(idx)) % len(pool)]
    variants["mixed"] = run(model, {**inputs, "lidar": lidar})

    reference = variants.pop("inf")
    assert_valid_outputs(model, reference, 2)
    for label, outs in variants.items():
        for name in OUTPUT_NAMES:
            assert torch.equal(outs[name], reference[name]), f"{label}: {name} differs"
    # Control: the valid returns still matter.
    lidar = inputs["lidar"].clone()
    lidar[:, invalid] = float("inf")
    lidar[:, ~invalid] = cfg.range_min + 0.5 * (lidar[:, ~invalid] - cfg.range_min)
    closer = run(model, {**inputs, "lidar": lidar})
    assert not torch.equal(closer["new_state"][:, MODALITIES.index("lidar")],
                           reference["new_state"][:, MODALITIES.index("lidar")])


def test_range_limits_are_inclusive(default_config, make_inputs):
    """Returns exactly at range_min / range_max are valid, so they differ from an invalid return."""
    model = build_model(default_config.model)
    inputs = make_inputs(model.cfg, 9, 1)
    li = MODALITIES.index("lidar")
    out = {}
    for label, value in {"min": model.cfg.lidar.range_min, "max": model.cfg.lidar.range_max,
                         "inf": float("inf")}.items():
        lidar = torch.full_like(inputs["lidar"], value)
        out[label] = run(model, {**inputs, "lidar": lidar})["new_state"][:, li]
    assert not torch.equal(out["min"], out["inf"])
    assert not torch.equal(out["max"], out["inf"])


# ---------------------------------------------------------------- explicit state


@pytest.mark.parametrize("strategy", VARIANTS)
def test_model_keeps_no_hidden_state(models, strategy, make_inputs):
    model = models[strategy]
    before = {k: v.clone() for k, v in list(model.named_buffers()) + list(model.named_parameters())}
    inputs = make_inputs(model.cfg, 10, 2)
    first = run(model, inputs)
    state = inputs["state"]
    for i in range(10):
        step = make_inputs(model.cfg, 20 + i, 2)
        step["state"] = state
        state = run(model, step)["new_state"]
    after = dict(list(model.named_buffers()) + list(model.named_parameters()))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed across forward calls"
    again = run(model, inputs)
    for name in OUTPUT_NAMES:
        assert torch.equal(first[name], again[name]), name
    # The recurrent state lives in the output: feeding it back is what changes the next step.
    step2 = {**inputs, "state": first["new_state"]}
    assert not torch.equal(run(model, step2)["new_state"], first["new_state"])


def test_initial_state_matches_spec(models):
    model = models["hybrid"]
    spec = {s.name: s for s in input_specs(model.cfg, 3)}["state"]
    s0 = model.initial_state(3)
    assert tuple(s0.shape) == spec.shape and torch.all(s0 == 0)


# ---------------------------------------------------------------- checkpoints and seeds


@pytest.mark.parametrize("strategy", ["late", "hierarchical"])
def test_checkpoint_round_trip(default_config, tmp_path, strategy, make_inputs):
    cfg = with_strategy(default_config.model, strategy)
    cfg = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, cfc_mode="no_gate"))
    model = build_model(cfg, seed=3)
    path = tmp_path / "sub" / "model.ckpt"
    save_checkpoint(model, path)
    assert path.is_file() and not path.with_name(path.name + ".tmp").exists()
    loaded = load_checkpoint(path)
    assert isinstance(loaded, FusionNet) and not loaded.training
    assert loaded.cfg == cfg
    assert config_mismatch(loaded.cfg, cfg) == []
    inputs = make_inputs(cfg, 12, 2)
    inputs["mask"][1, 2] = 0.0
    a, b = run(model, inputs), run(loaded, inputs)
    for name in OUTPUT_NAMES:
        assert torch.equal(a[name], b[name]), name
    # A freshly seeded model with another seed is different, so the equality above is meaningful.
    other = run(build_model(cfg, seed=4), inputs)
    assert not torch.equal(other["action"], a["action"])


def test_normalization_statistics_travel_in_the_checkpoint(default_config, tmp_path, make_inputs):
    """The joint-state, IMU and action statistics are weights: set, saved, loaded, applied inside the step."""
    cfg = default_config.model
    model = build_model(cfg, seed=3)
    inputs = make_inputs(cfg, 13, 2)
    before = run(model, inputs)
    dof = cfg.action.dof
    rng = np.random.default_rng(0)
    model.set_normalization(imu_mean=rng.normal(size=6), imu_std=rng.uniform(0.5, 2.0, 6),
                            joint_mean=rng.normal(size=2 * dof), joint_std=rng.uniform(0.5, 2.0, 2 * dof),
                            action_mean=np.full(dof, 0.1), action_std=np.full(dof, 0.2))
    after = run(model, inputs)
    js = MODALITIES.index("joint_state")
    assert not torch.equal(after["new_state"][:, js], before["new_state"][:, js])
    path = tmp_path / "normalized.ckpt"
    save_checkpoint(model, path, extra={"note": "kept beside the weights"})
    loaded = load_checkpoint(path)
    for name in OUTPUT_NAMES:
        assert torch.equal(run(loaded, inputs)[name], after[name]), name
    blob = torch.load(path, weights_only=True)
    assert blob["note"] == "kept beside the weights" and blob["format"] == "mm_fusion_ros.checkpoint/2"
    assert "joint_state.mean" in blob["state_dict"] and "joint_state.inv_std" in blob["state_dict"]


def test_a_four_modality_checkpoint_is_refused_with_a_reason(default_config, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"format": "mm_fusion_ros.checkpoint/1", "model_config": {}, "state_dict": {}}, path)
    with pytest.raises(ValueError, match="checkpoint/1.*retrain"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [{"state_dict": {}}, {"format": "something/else", "state_dict": {}}, [1, 2, 3]])
def test_loading_a_torch_file_that_is_not_a_checkpoint_raises_value_error(tmp_path, payload):
    path = tmp_path / "not_a_checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"hello, not a checkpoint\n", b"", b"PK\x03\x04 truncated zip"],
                         ids=["text", "empty", "bad_zip"])
def test_loading_a_non_torch_file_raises_value_error(tmp_path, content):
    # Used to escape as KeyError / EOFError / UnpicklingError from torch.load, without the path.
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path).replace(".", r"\.")):
        load_checkpoint(path)


def test_loading_a_missing_checkpoint_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_config_mismatch_lists_the_differing_keys(default_config):
    a = default_config.model
    b = dataclasses.replace(with_strategy(a, "late"), lidar=dataclasses.replace(a.lidar, beams=720),
                            fused_state_dim=16)
    diff = config_mismatch(a, b)
    keys = sorted(d.split(":")[0] for d in diff)
    assert keys == ["model.fused_state_dim", "model.fusion.strategy", "model.lidar.beams"]
    assert any("'hybrid'" in d and "'late'" in d for d in diff)
    assert config_mismatch(a, a) == []
    c = dataclasses.replace(a, action=dataclasses.replace(a.action, upper=(2.0,) * 7))
    assert [d.split(":")[0] for d in config_mismatch(a, c)] == ["model.action.upper"]


def test_seed_determines_the_weights(default_config):
    cfg = default_config.model
    w0 = build_model(cfg, seed=0).state_dict()
    w0_again = build_model(cfg, seed=0).state_dict()
    w1 = build_model(cfg, seed=1).state_dict()
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w0_again[k]) for k in w0)
    random_weights = [k for k in w0 if k.endswith("weight") and w0[k].numel() > 1 and w0[k].std() > 0]
    assert len(random_weights) > 10
    differing = [k for k in random_weights if not torch.equal(w0[k], w1[k])]
    assert differing == random_weights


def test_hybrid_step_does_no_work_it_throws_away(models, make_inputs, monkeypatch):
    """Eager runs every op it is given while the exported graph drops unused ones, so a discarded
    computation would handicap the torch baseline: hybrid fusion must use the early path's fused
    vector only, and match what the full early path would give."""
    from mm_fusion_ros.model.fusion import EarlyFusion

    model = models["hybrid"]
    inputs = make_inputs(model.cfg, 5)
    expected = run(model, inputs)
    tokens = torch.randn(1, len(MODALITIES), model.cfg.encoder.hidden)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 1.0]])
    with torch.inference_mode():
        assert torch.equal(model.fusion.early.fuse(tokens, mask), model.fusion.early(tokens, mask)[0])

    def forbidden(self, tokens, mask):
        raise AssertionError("hybrid fusion computed the early path's attention and contribution")

    monkeypatch.setattr(EarlyFusion, "forward", forbidden)
    again = run(model, inputs)
    for name in OUTPUT_NAMES:
        assert torch.equal(again[name], expected[name]), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_camera_keypoints_follow_an_object_from_initialisation(default_config, seed):
    """The spatial softmax must not start flat: after the last ReLU, untrained, it was nearly uniform, and
    for a square carried across the frame the keypoint that moved most moved 0.003-0.016 (of the image's
    [-1, 1]; seeds 0-2), too little for a head to learn from. On the last conv before its ReLU, with the
    learned temperature, it moves 0.048-0.52 on these seeds, and the right way."""
    cfg = default_config.model
    net = build_model(cfg, seed=seed)
    h, w = cfg.camera.height, cfg.camera.width
    frames = np.full((2, h, w, 3), 90, np.uint8)
    side = h // 6
    frames[0, side:2 * side, side:2 * side] = (220, 30, 30)                 # up left
    frames[1, h - 2 * side:h - side, w - 2 * side:w - side] = (220, 30, 30)  # down right
    with torch.no_grad():
        _, keypoints = net.camera.encode(torch.from_numpy(frames))
    moved = keypoints[1] - keypoints[0]                                     # (channels, 2)
    most = int(moved.abs().sum(dim=1).argmax())
    assert float(moved[most].abs().max()) > 0.03
    assert bool((moved[most] > 0).all())                                     # right and down: x and y grow


def test_audio_asked_keypoint_queries_read_the_same_whatever_the_joints_say(models, make_inputs):
    """keypoint_query_source audio: which keypoints are read depends on the audio cell's state alone, not
    on the fused vector (where the joint states say where the arm is heading, the shortcut that the fused
    queries took); the fused-state queries do depend on it."""
    M = len(MODALITIES)
    torch.manual_seed(0)
    state = torch.randn(2, M, models["hybrid"].cfg.encoder.hidden)
    keypoints = torch.rand(2, models["hybrid"].camera.keypoints, 2) * 2 - 1
    mask = torch.ones(2, M)
    fused_a, fused_b = torch.randn(2, state.shape[-1]), torch.randn(2, state.shape[-1])
    audio = models["hybrid+audio_keypoints"]
    with torch.no_grad():
        _, a = audio.read_keypoints_located(fused_a, keypoints, mask, state)
        _, b = audio.read_keypoints_located(fused_b, keypoints, mask, state)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        other = state.clone()
        other[:, MODALITIES.index("audio")] = torch.randn_like(other[:, 0])
        _, c = audio.read_keypoints_located(fused_a, keypoints, mask, other)
        assert float((c - a).abs().max()) > 1e-4
        fused_net = models["hybrid+keypoints"]
        _, d = fused_net.read_keypoints_located(fused_a, keypoints, mask, state)
        _, e = fused_net.read_keypoints_located(fused_b, keypoints, mask, state)
        assert float((d - e).abs().max()) > 1e-4


def test_the_networks_tool_tip_is_the_published_kinematics():
    """CueRead's tool tip (torch, exported with the network) is sim.task_state's (numpy, checked against
    MuJoCo's tool site in test_sim) for random joint vectors."""
    from mm_fusion_ros.model.kinematics import panda_tool_tip
    from mm_fusion_ros.sim.task_state import tool_tips
    q = np.random.default_rng(0).uniform(-2.8, 2.8, (64, 7))
    ours = panda_tool_tip(torch.tensor(q, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(ours, tool_tips(q), atol=1e-12, rtol=0)
    assert np.ptp(ours, axis=0).min() > 0.1        # the joints move the tip: not a constant


def test_the_cue_read_takes_which_button_from_the_audio_alone_and_where_from_the_camera(models):
    """CueRead: the belief over the buttons is a function of the audio cell's state only (not of the fused
    vector, the joints or the camera); the cued position is the belief's mix of the positions read off the
    keypoints; the tool's offset enters the fused vector; with camera, audio or joints masked nothing does."""
    net = models["hybrid+cue"]
    M, D = len(MODALITIES), net.cfg.encoder.hidden
    torch.manual_seed(0)
    state = torch.randn(2, M, D)
    keypoints = torch.rand(2, net.camera.keypoints, 2) * 2 - 1
    joints = torch.zeros(2, 2 * net.cfg.action.dof)
    joints[:, :7] = torch.tensor([0.0, -0.785, 0.0, -2.356, 0.0, 1.571, 0.785])
    mask = torch.ones(2, M)
    fused_a, fused_b = torch.randn(2, D), torch.randn(2, D)
    with torch.no_grad():
        out_a, a = net.read_camera(fused_a, keypoints, mask, state, joints)
        _, b = net.read_camera(fused_b, keypoints, mask, state, joints)
        moved = joints.clone()
        moved[:, 0] += 0.5
        out_moved, c = net.read_camera(fused_a, keypoints, mask, state, moved)
        for x in (b, c):
            torch.testing.assert_close(x.cue, a.cue, rtol=0, atol=0)
            torch.testing.assert_close(x.located, a.located, rtol=0, atol=0)
        assert float((out_moved - out_a).abs().max()) > 1e-4          # the tool's offset is read
        other = state.clone()
        other[:, MODALITIES.index("camera")] = torch.randn(2, D)
        other[:, MODALITIES.index("joint_state")] = torch.randn(2, D)
        _, d = net.read_camera(fused_a, keypoints, mask, other, joints)
        torch.testing.assert_close(d.cue, a.cue, rtol=0, atol=0)
        other[:, MODALITIES.index("audio")] = torch.randn(2, D)
        _, e = net.read_camera(fused_a, keypoints, mask, other, joints)
        assert float((e.cue - a.cue).abs().max()) > 1e-4
        belief = torch.softmax(a.cue, dim=-1)
        mix = (belief.unsqueeze(-1) * a.objects.view(2, 3, 2)).sum(dim=1)
        torch.testing.assert_close(a.located, mix)
        for name in ("camera", "audio", "joint_state"):
            off = mask.clone()
            off[:, MODALITIES.index(name)] = 0
            out_off, _ = net.read_camera(fused_a, keypoints, off, state, joints)
            out_off_moved, _ = net.read_camera(fused_a, keypoints, off, state, moved)
            torch.testing.assert_close(out_off, out_off_moved, rtol=0, atol=0)   # nothing read
            torch.testing.assert_close(out_off, fused_a + net.cue_read.out.bias, rtol=0, atol=1e-6)


def test_the_tool_space_heads_kinematics_are_the_published_panda():
    """The tool-space head's Jacobian is the tool tip's derivative (central differences of the published
    kinematics), its Cholesky solve is a linear solve, and its joint velocities are the damped least squares
    with the exact null-space projector, computed in numpy; with almost no damping they give the tool the
    twist asked for, whatever the null-space pull."""
    from mm_fusion_ros.model.kinematics import (joints_to_tool_twist, panda_tool_jacobian, panda_tool_tip, spd_solve,
                                                tool_twist_to_joints)
    rng = np.random.default_rng(3)
    q = torch.tensor(READY_Q + rng.normal(0, 0.3, (16, 7)))
    J, tip, _ = panda_tool_jacobian(q)
    np.testing.assert_allclose(tip.numpy(), panda_tool_tip(q).numpy(), atol=1e-12)
    h = 1e-6
    for i in range(7):
        dq = torch.zeros(7, dtype=q.dtype)
        dq[i] = h
        fd = (panda_tool_tip(q + dq) - panda_tool_tip(q - dq)) / (2 * h)
        np.testing.assert_allclose(J[:, :3, i].numpy(), fd.numpy(), atol=1e-7)
    np.testing.assert_allclose(torch.linalg.norm(J[:, 3:], dim=1).numpy(), 1.0, atol=1e-12)   # unit joint axes
    A = torch.tensor(rng.normal(size=(16, 6, 6)))
    A = A @ A.transpose(1, 2) + 0.1 * torch.eye(6, dtype=A.dtype)
    b = torch.tensor(rng.normal(size=(16, 6)))
    np.testing.assert_allclose(spd_solve(A, b).numpy(), torch.linalg.solve(A, b).numpy(), atol=1e-9)
    twist = torch.tensor(rng.normal(0, 0.1, (16, 6)))
    rest = torch.tensor(READY_Q).unsqueeze(0)
    qdot = tool_twist_to_joints(q, twist, rest, 0.5, 0.05).numpy()
    for k in range(16):
        Jk = J[k].numpy()
        want = (Jk.T @ np.linalg.solve(Jk @ Jk.T + 0.05 ** 2 * np.eye(6), twist[k].numpy())
                + (np.eye(7) - np.linalg.pinv(Jk) @ Jk) @ (0.5 * (READY_Q - q[k].numpy())))
        np.testing.assert_allclose(qdot[k], want, atol=2e-5)   # the projector carries 1e-6 of damping
    exact = tool_twist_to_joints(q, twist, rest, 0.5, 1e-5)
    np.testing.assert_allclose(joints_to_tool_twist(q, exact).numpy(), twist.numpy(), atol=1e-5)
    assert float((exact - tool_twist_to_joints(q, twist, rest, 0.0, 1e-5)).abs().max()) > 1e-3   # the pull moves joints


def test_a_tool_space_head_commands_what_it_says_and_stays_in_range(models, make_inputs):
    """``action.space: tool``: the joint velocities are the head's twist through the damped least squares at
    the measured joints, scaled as a whole (direction kept) into the action range."""
    from mm_fusion_ros.model.kinematics import joints_to_tool_twist, tool_twist_to_joints
    net = models["hybrid+cue+tool"]
    inputs = make_inputs(net.cfg, 4, 2)
    q = torch.tensor(READY_Q, dtype=torch.float32).repeat(2, 1) + 0.1
    inputs["joint_state"][:, :7] = q
    inputs["mask"][:] = 1.0
    head = net.action_head
    fused = torch.randn(2, net.cfg.encoder.hidden)
    with torch.no_grad():
        twist = head.mean + head.std * head.normalized(fused, q)
        want = tool_twist_to_joints(q, twist, head.rest, head.null_gain, head.damping)
        np.testing.assert_allclose(head(fused, q).numpy(), want.numpy(), atol=1e-6)
        head.std.mul_(100.0)   # a twist far beyond what the joints may do
        fast = tool_twist_to_joints(q, head.mean + head.std * head.normalized(fused, q), head.rest, head.null_gain,
                                    head.damping)
        out = head(fused, q)
        head.std.div_(100.0)
    assert float(out.abs().max()) == pytest.approx(1.0, abs=1e-5)   # the range is [-1, 1]: the fastest joint at it
    np.testing.assert_allclose((out / out.norm(dim=-1, keepdim=True)).numpy(),
                               (fast / fast.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    assert joints_to_tool_twist(q, out).abs().max() > 0


def test_a_tool_space_action_needs_its_rest_posture_and_the_joint_states():
    from mm_fusion_ros.config import ActionConfig, ConfigError
    with pytest.raises(ConfigError, match="rest"):
        ActionConfig(space="tool", rest=(0.0, 0.0, 0.0)).validate("model.action")
    with pytest.raises(ConfigError, match="damping"):
        ActionConfig(space="tool", rest=tuple(READY_Q), damping=0.0).validate("model.action")
    cfg = ModelConfig(action=ActionConfig(space="tool", rest=tuple(float(x) for x in READY_Q)),
                      modalities=("camera", "audio", "imu", "lidar"))
    with pytest.raises(ConfigError, match="joint_state"):
        cfg.validate("model")


def test_the_kinematics_run_once_a_tick_and_say_what_running_them_per_reader_said(models):
    """FusionNet.forward runs the Panda's kinematics once (the tool-space head's float64 ``arm_pose``) for both
    the cue read's tool offset and the head: the same outputs as each computing its own, whichever inputs are
    masked (with the camera or audio masked the cue read's tip is then the real arm's, not the zero pose's,
    and must still read nothing)."""
    net = models["hybrid+cue+tool"]
    M, D = len(MODALITIES), net.cfg.encoder.hidden
    torch.manual_seed(1)
    state = torch.randn(3, M, D)
    keypoints = torch.rand(3, net.camera.keypoints, 2) * 2 - 1
    joint_state = torch.zeros(3, 2 * net.cfg.action.dof)
    joint_state[:, :7] = torch.tensor(READY_Q, dtype=torch.float32) + torch.randn(3, 7) * 0.3
    fused = torch.randn(3, D)
    for off in (None, "camera", "audio", "joint_state"):
        mask = torch.ones(3, M)
        if off:
            mask[:, MODALITIES.index(off)] = 0
        with torch.no_grad():
            joints = net.measured_joints(joint_state, mask)
            pose = net.action_head.arm_pose(joints)
            shared, reads = net.read_camera(fused, keypoints, mask, state, joint_state, pose)
            own, own_reads = net.read_camera(fused, keypoints, mask, state, joint_state)
            torch.testing.assert_close(shared, own, rtol=0, atol=1e-5, msg=f"masked: {off}")
            torch.testing.assert_close(reads.located, own_reads.located, rtol=0, atol=0)
            torch.testing.assert_close(net.action_head(shared, joints, pose), net.action_head(shared, joints),
                                       rtol=0, atol=0)
            if off is None:   # all present: the tool's offset is read, so the shared tip is really used
                moved = net.action_head.arm_pose(joints + 0.3)
                assert float((net.read_camera(fused, keypoints, mask, state, joint_state, moved)[0]
                              - shared).abs().max()) > 1e-4


# ---------------------------------------------------------------- pixel keypoints and the cue read's memory

def _red_detector(camera, k: int = 0) -> None:
    """Pixel keypoint ``k`` set to respond to red (R high, G and B low), sharply."""
    with torch.no_grad():
        camera.pixel_filter.weight.zero_()
        camera.pixel_filter.bias.zero_()
        camera.pixel_filter.weight[k, :, 0, 0] = torch.tensor([1.0, -1.0, -1.0])
        camera.pixel_log_temperature[k] = float(np.log(20.0))


def test_a_pixel_keypoint_finds_its_colours_centroid_and_says_when_it_is_out_of_sight(default_config):
    """The soft-argmax runs over every pixel (x: column, y: row, both in [-1, 1], as the CNN's keypoints), so
    a small red disc is placed to a fraction of a pixel, which a 6x6 map cannot do; its visibility (the
    filter's soft maximum) falls when the disc is covered."""
    cfg = dataclasses.replace(default_config.model, camera=dataclasses.replace(default_config.model.camera,
                                                                               pixel_keypoints=2))
    net = build_model(cfg, seed=0)
    _red_detector(net.camera)
    H, W = cfg.camera.height, cfg.camera.width
    rows, cols = np.mgrid[0:H, 0:W]
    image = np.full((1, H, W, 3), 120, np.uint8)   # grey table
    centre = (0.37 * (H - 1), 0.71 * (W - 1))      # off the pixel grid
    disc = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 3.2 ** 2
    image[0][disc] = (220, 40, 40)
    with torch.no_grad():
        _, keypoints, visibility = net.camera.encode_reads(torch.from_numpy(image))
        _, _, hidden = net.camera.encode_reads(torch.from_numpy(np.full_like(image, 120)))
    assert keypoints.shape == (1, net.camera.keypoints, 2) and net.camera.keypoints == cfg.camera.channels[-1] + 2
    x, y = keypoints[0, -2].tolist()                 # the red keypoint: the pixel keypoints come last
    expected_x = 2 * cols[disc].mean() / (W - 1) - 1
    expected_y = 2 * rows[disc].mean() / (H - 1) - 1
    pixel = 2 / (W - 1)
    assert abs(x - expected_x) < 0.2 * pixel and abs(y - expected_y) < 0.2 * pixel, (x, y, expected_x, expected_y)
    assert float(visibility[0, 0]) > float(hidden[0, 0]) + 1.0
    # The visibility is the filter's logsumexp over the pixels (computed from the softmax's peak share, which
    # exports to fewer ONNX operators), less the uniform share, at its temperature; also at a sharp temperature.
    for log_t in (np.log(20.0), np.log(2000.0)):
        with torch.no_grad():
            net.camera.pixel_log_temperature[0] = float(log_t)
            x = torch.from_numpy(image).permute(0, 3, 1, 2).float() * net.camera.scale + net.camera.offset
            t = net.camera.pixel_log_temperature.exp()
            flat = (net.camera.pixel_filter(x) * (PIXEL_FILTER_GAIN * t).view(1, -1, 1, 1)).flatten(2)
            expected = (torch.logsumexp(flat, dim=-1) - np.log(H * W)) / t
            _, _, visibility = net.camera.encode_reads(torch.from_numpy(image))
        assert torch.allclose(visibility, expected, rtol=1e-5, atol=1e-5), (visibility, expected)


def test_the_cue_reads_memory_holds_an_estimate_while_its_gate_is_shut_and_starts_from_the_first_frame(
        default_config):
    """``CueRead.remember``: the first frame after a reset replaces the (zero) memory whatever its gate; a
    shut gate (the colour out of sight) holds the estimate against what the frame says; open ones are
    averaged; the hand over a button keeps the frame from it; a masked camera, NaN frames included, moves
    nothing."""
    cfg = with_strategy(default_config.model, "hybrid+cue+tool+memory")
    net = build_model(cfg, seed=0)
    read = net.cue_read
    with torch.no_grad():
        read.gate.weight.fill_(0.0)
        read.gate.weight[:, 0] = 10.0     # visibility of pixel keypoint 0 opens every gate
        read.gate.bias.fill_(-5.0)
    D, n2 = cfg.encoder.hidden, 2 * cfg.fusion.cue_objects
    memory = torch.zeros(1, D)
    first = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    shut, open_ = torch.tensor([[-1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    on, off = torch.ones(1, 1), torch.zeros(1, 1)
    memory = read.remember(memory, first, shut, on)          # first frame: taken though the gate is shut
    torch.testing.assert_close(memory[:, :n2], first)
    assert float(memory[0, n2].detach()) == 1.0
    elsewhere = first + 3.0
    held = read.remember(memory, elsewhere, shut, on)         # out of sight: held (gate sigmoid(-15))
    torch.testing.assert_close(held[:, :n2], first, atol=1e-5, rtol=0)
    followed = read.remember(memory, elsewhere, open_, on)    # in sight: follows (gate sigmoid(5))
    assert float((followed[:, :n2] - elsewhere).abs().max().detach()) < 0.03 * 3.0
    # Frames in sight are averaged (the buttons stand still; each frame's scatter averages out): a second
    # one 2 units further puts the estimate half way, and hundreds of frames with the gate shut after them
    # (the hand over the cap) move it by less than a millimetre's worth.
    averaged = read.remember(followed, elsewhere + 2.0, open_, on)
    torch.testing.assert_close(averaged[:, :n2], elsewhere + 1.0, atol=1e-4, rtol=0)
    hidden = averaged
    for _ in range(300):
        hidden = read.remember(hidden, elsewhere + 50.0, shut, on)
    assert float((hidden[:, :n2] - averaged[:, :n2]).abs().max().detach()) < 1e-3
    # The hand over a button (the tool tip low over where it is held) keeps that frame from it, whatever the
    # gate says; buttons clear of the hand, or all of them with the tip high, still take it.
    held_m = averaged[0, :n2].detach().view(-1, 2) / 10.0      # dm -> m
    over0 = torch.tensor([[float(held_m[0, 0]), float(held_m[0, 1]), 0.05]], dtype=torch.float64)
    high0 = over0 + torch.tensor([[0.0, 0.0, 0.45]], dtype=torch.float64)
    far = elsewhere + 2.0
    under_hand = read.remember(averaged, far, open_, on, over0, on)
    torch.testing.assert_close(under_hand[:, :2], averaged[:, :2], atol=1e-3, rtol=0)
    assert float((under_hand[:, 2:n2] - averaged[:, 2:n2]).abs().min().detach()) > 0.2
    lifted = read.remember(averaged, far, open_, on, high0, on)
    assert float((lifted[:, :2] - averaged[:, :2]).abs().min().detach()) > 0.2
    unknown = read.remember(averaged, far, open_, on, over0, off)   # joints masked: the gate alone decides
    torch.testing.assert_close(unknown, lifted)
    nan = torch.full_like(first, float("nan"))
    masked = read.remember(memory, nan, torch.full_like(open_, float("nan")), off)
    torch.testing.assert_close(masked, memory)


def test_through_the_step_a_frame_without_the_colour_leaves_the_held_buttons_where_the_last_one_put_them(
        default_config, make_inputs):
    """FusionNet.forward with the memory: the state's extra slot carries the buttons from a frame in which the
    red filter sees its disc through a frame in which nothing is red (the hand over the cap), and the step's
    output is then that of the held estimate, not of the empty frame's."""
    cfg = with_strategy(default_config.model, "hybrid+cue+tool+memory")
    net = build_model(cfg, seed=0)
    _red_detector(net.camera)
    with torch.no_grad():
        net.cue_read.gate.weight.fill_(0.0)
        net.cue_read.gate.weight[:, 0] = 10.0
        net.cue_read.gate.bias.fill_(-5.0)
    H, W = cfg.camera.height, cfg.camera.width
    rows, cols = np.mgrid[0:H, 0:W]
    seen = np.full((1, H, W, 3), 120, np.uint8)
    seen[0][(rows - 30) ** 2 + (cols - 60) ** 2 <= 10] = (220, 40, 40)
    covered = np.full_like(seen, 120)
    inputs = make_inputs(cfg, 0, 1)
    inputs["mask"] = torch.ones_like(inputs["mask"])
    state = net.initial_state(1)
    assert state.shape == (1, len(MODALITIES) + 1, cfg.encoder.hidden)
    n2 = 2 * cfg.fusion.cue_objects
    with torch.no_grad():
        after_seen = run(net, {**inputs, "camera": torch.from_numpy(seen), "state": state})["new_state"]
        after_covered = run(net, {**inputs, "camera": torch.from_numpy(covered), "state": after_seen})
        fresh = run(net, {**inputs, "camera": torch.from_numpy(covered), "state": state})
    held = after_seen[0, -1, :n2]
    torch.testing.assert_close(after_covered["new_state"][0, -1, :n2], held, atol=1e-3, rtol=0)
    assert float((fresh["new_state"][0, -1, :n2] - held).abs().max()) > 0.05   # the empty frame says otherwise


def test_a_high_passed_imu_reads_the_click_but_not_the_arms_steady_motion(default_config):
    """With ``model.imu.high_pass`` a steady rotation or a tilt (a constant per channel across the window:
    what a velocity-controlled arm's last command looks like at the wrist) changes nothing the encoder
    says, while a 1 m/s^2 snap inside the window does; without it the steady rotation does too."""
    from mm_fusion_ros.model.preprocess import ImuEncoder
    cfg = default_config.model.imu
    torch.manual_seed(0)
    plain = ImuEncoder(dataclasses.replace(cfg, high_pass=False), 16)
    high = ImuEncoder(dataclasses.replace(cfg, high_pass=True), 16)
    high.load_state_dict(plain.state_dict())
    n = cfg.window_samples
    rest = torch.zeros(1, n, 6)
    rest[..., 2] = 9.81
    rest += 0.03 * torch.randn(1, n, 6)
    turning = rest.clone()
    turning[..., 3:] += torch.tensor([0.3, -0.2, 0.5])     # rad/s, the whole window
    turning[..., :3] += torch.tensor([0.5, 0.0, -0.4])     # m/s^2: gravity's direction moved
    snap = rest.clone()
    snap[:, n // 2: n // 2 + 3, 2] += 1.0
    with torch.no_grad():
        steady = float((high(turning) - high(rest)).abs().max())
        clicked = float((high(snap) - high(rest)).abs().max())
        unfiltered = float((plain(turning) - plain(rest)).abs().max())
    assert steady < 1e-5                      # float rounding only
    assert clicked > 100 * max(steady, 1e-7)
    assert unfiltered > 100 * max(steady, 1e-7)
