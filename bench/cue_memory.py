"""Where the cue memory holds the cued button while the tool is near it and low (the overhead camera cannot see
the cap there): the model's memory (``CueRead.remember``), against this frame's estimate alone and against the
exponential average the memory was before, all from one checkpoint's camera and gate, on the validation episodes
of a recording (as ``mm-fusion train`` holds them out: every 10th successful one).

    .venv/bin/python bench/cue_memory.py CKPT --config C BAGS... [--cache artifacts/dataset_cache]

Prints, per rule, the error over the near-and-low ticks and at each episode's first such tick (where the descent
starts from). Offline and tick by tick as the policy's step runs it (the same frame fed to every tick until the
next, a masked camera moving nothing)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_fusion_ros.config import MODALITIES, load_config  # noqa: E402
from mm_fusion_ros.dataset import load_episodes  # noqa: E402
from mm_fusion_ros.evaluate import NEAR_HEIGHT_M, NEAR_LATERAL_M  # noqa: E402
from mm_fusion_ros.model import load_checkpoint  # noqa: E402
from mm_fusion_ros.sim.task_state import UNITS_PER_M, tool_tips  # noqa: E402
from mm_fusion_ros.train import split_episodes, successful  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("bags", nargs="+")
    p.add_argument("--config", required=True)
    p.add_argument("--cache", default="artifacts/dataset_cache")
    args = p.parse_args()
    cfg = load_config(args.config)
    net = load_checkpoint(args.checkpoint).eval()
    if net.cue_read is None or net.cue_read.gate is None:
        raise SystemExit("cue_memory: the checkpoint has no cue memory (model.fusion.cue_memory)")
    episodes = load_episodes(args.bags, cfg, args.cache, workers=1, progress=False, log=lambda _: None)
    # The episodes training held out: the same filter and split as ``mm-fusion train`` (without
    # --include-failures), so that none of them was trained on.
    _, val = split_episodes(successful(episodes, False, lambda _: None), 0.1)
    camera = MODALITIES.index("camera")
    rules = ("this frame", "exponential average", "the model's memory")
    near: dict[str, list[float]] = {r: [] for r in rules}
    first: dict[str, list[float]] = {r: [] for r in rules}
    for e in val:
        spec = (e.meta.get("episode") or {}).get("spec")
        if not spec:
            continue
        target = int(spec["target"])
        button = np.asarray(spec["buttons"][target], np.float64)
        frames = torch.from_numpy(np.asarray(e.arrays["camera_frames"]))
        with torch.no_grad():
            _, keypoints, visibility = net.camera.encode_reads(frames)
            objects = net.cue_read.objects(keypoints)
            gate = torch.sigmoid(net.cue_read.gate(visibility))
        index = np.asarray(e.arrays["camera_index"])
        present = np.asarray(e.arrays["mask"])[:, camera] > 0.5
        tips = tool_tips(np.asarray(e.arrays["joint_state"])[:, :7])
        memory = torch.zeros(1, cfg.model.encoder.hidden)
        ema = frame = None
        errors: dict[str, list[float]] = {r: [] for r in rules}
        n2 = 2 * net.cue_read.n
        for t in range(len(index)):
            k = int(index[t])
            on = bool(present[t] and 0 <= k < len(frames))
            if on:
                frame = objects[k]
                g = gate[k].repeat_interleave(2)
                ema = frame.clone() if ema is None else ema + g * (frame - ema)
                with torch.no_grad():
                    # With the tool tip at this tick's measured joints, as the step passes it (the hand's clearance).
                    memory = net.cue_read.remember(memory, objects[k:k + 1], visibility[k:k + 1], torch.ones(1, 1),
                                                   torch.from_numpy(tips[t:t + 1]), torch.ones(1, 1))
            if frame is None or tips[t, 2] >= NEAR_HEIGHT_M or np.hypot(*(tips[t, :2] - button)) >= NEAR_LATERAL_M:
                continue
            for rule, held in zip(rules, (frame, ema, memory[0, :n2])):
                xy = held.view(-1, 2)[target].double().numpy() / UNITS_PER_M
                errors[rule].append(100.0 * float(np.hypot(*(xy - button))))
        for rule in rules:
            if errors[rule]:
                near[rule] += errors[rule]
                first[rule].append(errors[rule][0])
    print(f"cue memory: {os.path.basename(args.checkpoint)}, {len(first[rules[0]])} validation episodes with the tool "
          f"near and low (within {100 * NEAR_LATERAL_M:.0f} cm of the cued button, below {100 * NEAR_HEIGHT_M:.0f} cm)")
    print(f"{'rule':<22} {'near ticks: median':>19} {'p90':>7} | {'first near tick: median':>24} {'p90':>7} "
          f"{'max':>7} {'> 1.5 cm':>9}")
    for rule in rules:
        a, f = np.asarray(near[rule]), np.asarray(first[rule])
        if not len(a):
            continue
        print(f"{rule:<22} {np.median(a):>17.2f}cm {np.percentile(a, 90):>5.2f}cm | {np.median(f):>22.2f}cm "
              f"{np.percentile(f, 90):>5.2f}cm {f.max():>5.2f}cm {int((f > 1.5).sum()):>4}/{len(f)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
