"""Where a tick of `mm-fusion eval` goes, in joint and in tool space, side by side in one run.

    .venv/bin/python bench/eval_tick.py [--episodes 3] [--seed 1000] [--spaces joint,tool] [--json OUT]

For each action space: ``config/sim.yaml`` with ``model.action.space`` set to it, an untrained policy
(seed 3: the figure is about the loop, not the policy), one worker in-process as eval runs it, one
warm-up episode, then ``--episodes`` episodes of seed ``--seed``. Reported per tick (medians over the
episodes of each episode's mean): the whole tick; the cell's physics, sensors and offscreen render
(``advance``); the messages' round trip and the aligner's intake (``receive``); the Runtime's tick
(``runtime``, which includes the engine); and the ONNX Runtime step itself (``engine``, the median
call); plus real time per worker (10 ms ticks). Untrained episodes end differently in the two spaces
(a protective stop or the 15 s timeout), so compare the per-tick figures, not episodes per minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", "43")
os.environ.setdefault("MUJOCO_GL", "osmesa")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SIM_YAML = REPO / "config" / "sim.yaml"
PARTS = ("advance", "receive", "runtime", "engine")


def _timed(record: list, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - t0)
    return wrapper


def measure(space: str, episodes: int, seed: int, workdir: Path) -> dict:
    from mm_fusion_ros.config import load_config
    from mm_fusion_ros.evaluate import Evaluator
    from mm_fusion_ros.model import build_model, save_checkpoint

    text = SIM_YAML.read_text()
    if "space: joint" not in text:
        raise SystemExit(f"{SIM_YAML} has no 'space: joint' line to switch")
    config = workdir / f"sim_{space}.yaml"
    config.write_text(text.replace("space: joint", f"space: {space}", 1))
    checkpoint = workdir / f"untrained_{space}.pt"
    save_checkpoint(build_model(load_config(config).model, seed=3), checkpoint)
    ev = Evaluator(str(config), str(checkpoint), "onnxruntime")
    try:
        ev.episode(seed + 1)   # warm-up: the engine's first runs, the renderer's first frames
        calls = {name: [] for name in PARTS}
        ev.cell.advance = _timed(calls["advance"], ev.cell.advance)
        ev.loop.receive = _timed(calls["receive"], ev.loop.receive)
        ev.loop.tick = _timed(calls["runtime"], ev.loop.tick)
        ev.loop.engine.run = _timed(calls["engine"], ev.loop.engine.run)
        per_tick, parts, ticks = [], {name: [] for name in PARTS}, 0
        for _ in range(episodes):
            for c in calls.values():
                c.clear()
            r = ev.episode(seed)
            ticks = r["ticks"]
            per_tick.append(r["wall_s"] / ticks)
            for name in PARTS:
                parts[name].append(float(np.median(calls[name])) if name == "engine" else sum(calls[name]) / ticks)
    finally:
        ev.close()
    ms = lambda v: round(1e3 * float(np.median(v)), 3)   # noqa: E731
    tick = float(np.median(per_tick))
    return {"space": space, "ticks_per_episode": ticks, "tick_ms": ms(per_tick),
            **{f"{name}_ms": ms(parts[name]) for name in PARTS}, "x_real_time": round(0.01 / tick, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--spaces", default="joint,tool")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    spaces = [s.strip() for s in args.spaces.split(",") if s.strip()]
    if args.episodes < 1 or not spaces or any(s not in ("joint", "tool") for s in spaces):
        p.error("--episodes must be >= 1 and --spaces a list of joint, tool")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(s, args.episodes, args.seed, Path(tmp)) for s in spaces]
    head = ("space", "ticks_per_episode", "tick_ms", *(f"{n}_ms" for n in PARTS), "x_real_time")
    print("  ".join(f"{h:>17}" for h in head))
    for row in rows:
        print("  ".join(f"{row[h]!s:>17}" for h in head))
    if args.json:
        tmp_out = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_out.write_text(json.dumps(rows, indent=2))
        tmp_out.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
