"""Where a tick of `mm-fusion eval` goes, per episode, side by side in one run: one episode at a time (the live
node's batch-1 engine) and K episodes in lockstep through one batched engine call (`eval --lockstep K`).

    .venv/bin/python bench/eval_tick.py [--checkpoint policies/sim_policy.pt] [--lockstep 1,8] [--episodes 16]
                                        [--seed 1000] [--json OUT]
    .venv/bin/python bench/eval_tick.py --spaces joint,tool [--lockstep 1]   # untrained policies per action space

Per variant: one worker in-process as eval runs it, a warm-up of K episodes (seeds after the measured ones),
then ``--episodes`` episodes from ``--seed``, all through ``Evaluator.run`` (so a lockstep run's last episodes
step part-empty batches, as eval's do). Reported per episode tick (the episodes' wall time over their ticks):
the whole tick; the cell's physics, sensors and offscreen render (``advance``); the messages' round trip and the
aligner's intake (``receive``); the Runtime's halves around the engine (``runtime``: alignment, safety); the
engine's calls (``engine``, their total over the episode ticks, so a batch of K counts once for K ticks), and
the median engine call (``engine_call``); plus real time per worker (10 ms ticks). ``--spaces`` measures
``config/sim.yaml`` with ``model.action.space`` set to each, on an untrained policy (seed 3: the figure is
about the loop, not the policy); untrained episodes end differently in the two spaces, so compare the per-tick
figures, not episodes per minute.
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
SHIPPED = REPO / "policies" / "sim_policy.pt"
PARTS = ("advance", "receive", "runtime", "engine")


def _timed(record: list, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - t0)
    return wrapper


def untrained(space: str, workdir: Path) -> tuple[Path, Path]:
    """``config/sim.yaml`` with ``model.action.space`` = ``space``, and an untrained policy for it."""
    from mm_fusion_ros.config import load_config
    from mm_fusion_ros.model import build_model, save_checkpoint

    text = SIM_YAML.read_text()
    if "space: tool" not in text:
        raise SystemExit(f"{SIM_YAML} has no 'space: tool' line to switch")
    config = workdir / f"sim_{space}.yaml"
    config.write_text(text.replace("space: tool", f"space: {space}", 1))
    checkpoint = workdir / f"untrained_{space}.pt"
    save_checkpoint(build_model(load_config(config).model, seed=3), checkpoint)
    return config, checkpoint


def measure(label: str, config: Path, checkpoint: Path, lockstep: int, episodes: int, seed: int) -> dict:
    from mm_fusion_ros.evaluate import Evaluator
    from mm_fusion_ros.runtime import Runtime

    ev = Evaluator(str(config), str(checkpoint), "onnxruntime", lockstep=lockstep)
    calls = {name: [] for name in PARTS}
    begin, complete = Runtime.begin_tick, Runtime.complete_tick
    try:
        # Warm-up: the engine's first runs, the renderers' first frames.
        list(ev.run([(seed + episodes + i, (), None) for i in range(lockstep)]))
        for cell in ev.cells:
            cell.advance = _timed(calls["advance"], cell.advance)
        for loop in ev.loops:
            loop.receive = _timed(calls["receive"], loop.receive)
        Runtime.begin_tick = _timed(calls["runtime"], begin)
        Runtime.complete_tick = _timed(calls["runtime"], complete)
        ev.loop.engine.run = _timed(calls["engine"], ev.loop.engine.run)
        wall0 = time.perf_counter()
        results = list(ev.run([(s, (), None) for s in range(seed, seed + episodes)]))
        wall = time.perf_counter() - wall0
    finally:
        Runtime.begin_tick, Runtime.complete_tick = begin, complete
        ev.close()
    ticks = sum(r["ticks"] for r in results)
    ms = lambda v: round(1e3 * v, 3)   # noqa: E731
    return {"variant": label, "lockstep": lockstep, "episodes": episodes, "ticks": ticks,
            "successes": sum(r["outcome"] == "success" for r in results),
            "tick_ms": ms(wall / ticks), **{f"{name}_ms": ms(sum(calls[name]) / ticks) for name in PARTS},
            "engine_call_ms": ms(float(np.median(calls["engine"]))),
            "x_real_time": round(0.01 * ticks / wall, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=SHIPPED)
    p.add_argument("--spaces", default="", help="instead of --checkpoint: untrained policies in these action spaces")
    p.add_argument("--lockstep", default="1,8", help="episodes in lockstep per variant, comma-separated")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    spaces = [s.strip() for s in args.spaces.split(",") if s.strip()]
    try:
        lockstep = [int(k) for k in args.lockstep.split(",") if k.strip()]
    except ValueError:
        p.error(f"--lockstep must be comma-separated integers, got {args.lockstep!r}")
    if args.episodes < 1 or not lockstep or any(k < 1 for k in lockstep) \
            or any(s not in ("joint", "tool") for s in spaces):
        p.error("--episodes and every --lockstep must be >= 1, --spaces a list of joint, tool")
    if not spaces and not args.checkpoint.is_file():
        p.error(f"--checkpoint {args.checkpoint} not found (make train writes it)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [(f"{s} (untrained)", *untrained(s, Path(tmp))) for s in spaces] or \
            [(args.checkpoint.name, SIM_YAML, args.checkpoint)]
        for label, config, checkpoint in variants:
            for k in lockstep:
                rows.append(measure(label, config, checkpoint, k, args.episodes, args.seed))
                print(f"eval_tick: {label}, lockstep {k}: {rows[-1]['tick_ms']} ms a tick", file=sys.stderr, flush=True)
    head = ("variant", "lockstep", "successes", "tick_ms", *(f"{n}_ms" for n in PARTS), "engine_call_ms",
            "x_real_time")
    print("  ".join(f"{h:>16}" for h in head))
    for row in rows:
        print("  ".join(f"{row[h]!s:>16}" for h in head))
    if args.json:
        tmp_out = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp_out.write_text(json.dumps(rows, indent=2))
        tmp_out.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
