"""The simulated cell's figures: real-time factor, scripted-expert success, bytes per episode, recording rate.

    .venv/bin/python bench/sim_cell.py [--episodes 200] [--seed 100000] [--record 20] [--workers 2] [--json]

1. Real-time factor in-process with every sensor on (camera rendered at 30 Hz, audio, LiDAR, IMU,
   joint states) and the expert driving at 100 Hz: sim seconds per wall second, per episode, median.
2. Expert success over ``--episodes`` seeded episodes (seeds from ``--seed``; rendering is off, the
   outcome does not depend on it) with the 95% Wilson interval and every failure's reason.
3. ``mm-fusion record`` of ``--record`` episodes with 1 and ``--workers`` processes: episodes per
   minute, real-time factor, bytes per episode (bags on disk, MCAP).

Seeds 100000 and up are kept for this benchmark, away from the small seeds the tests and the
recorded training sets start at.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_fusion_ros.sim.config import load_cell_config  # noqa: E402
from mm_fusion_ros.sim.record import RecordOptions, record  # noqa: E402
from mm_fusion_ros.stats import wilson_interval  # noqa: E402

SIM_YAML = REPO / "config" / "sim.yaml"


def _episodes(args: tuple[list[int], bool]) -> list[dict]:
    from mm_fusion_ros.sim.cell import Cell
    from mm_fusion_ros.sim.expert import run_expert_episode

    seeds, render = args
    out = []
    with Cell(load_cell_config(SIM_YAML), render=render) as cell:
        for seed in seeds:
            w = time.perf_counter()
            run_expert_episode(cell, seed, on_tick=(lambda *a: None))
            out.append({"seed": seed, "outcome": cell.outcome.status, "reason": cell.outcome.reason,
                        "detail": cell.outcome.detail, "sim_s": cell.outcome.t, "wall_s": time.perf_counter() - w,
                        "intrusion": cell.spec.intrusion is not None})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=100_000)
    p.add_argument("--rtf-episodes", type=int, default=10)
    p.add_argument("--record", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from tqdm import tqdm

    report: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    # 1. Real-time factor, all sensors, one process.
    rtf = _episodes((list(range(args.seed, args.seed + args.rtf_episodes)), True))
    factors = [e["sim_s"] / e["wall_s"] for e in rtf]
    report["realtime_factor_all_sensors"] = {"median": statistics.median(factors), "min": min(factors),
                                             "max": max(factors), "episodes": len(rtf)}
    # 2. Expert success.
    seeds = list(range(args.seed, args.seed + args.episodes))
    chunks = [seeds[i::args.workers] for i in range(args.workers)]
    results: list[dict] = []
    with ProcessPoolExecutor(args.workers) as pool, tqdm(total=len(seeds), desc="expert", unit="episode",
                                                         file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        # Small batches so that the bar moves; each worker keeps its own Cell per batch.
        futures = [pool.submit(_episodes, ([s], False)) for s in seeds] if args.episodes <= 20 else \
            [pool.submit(_episodes, (c[i:i + 10], False)) for c in chunks for i in range(0, len(c), 10)]
        for f in futures:
            r = f.result()
            results += r
            bar.update(len(r))
    ok = sum(e["outcome"] == "success" for e in results)
    lo, hi = wilson_interval(ok, len(results))
    report["expert"] = {
        "episodes": len(results), "successes": ok, "success_rate": ok / len(results), "ci95": [lo, hi],
        "reasons": dict(Counter(e["reason"] for e in results)),
        "with_intrusion": sum(e["intrusion"] for e in results),
        "mean_time_to_success_s": statistics.mean(e["sim_s"] for e in results if e["outcome"] == "success"),
        "failures": [{k: e[k] for k in ("seed", "reason", "detail")} for e in results if e["outcome"] != "success"],
    }
    # 3. Recording.
    with tempfile.TemporaryDirectory() as tmp:
        rec = {}
        for workers in sorted({1, args.workers}):
            out = Path(tmp) / f"w{workers}"
            w = time.perf_counter()
            index = record(out, SIM_YAML, RecordOptions(episodes=args.record, seed=args.seed, workers=workers),
                           progress=False, log=lambda _m: None)
            wall = time.perf_counter() - w
            s = index["summary"]
            rec[workers] = {"episodes_per_min": 60 * args.record / wall, "realtime_factor": s["sim_s"] / wall,
                            "mean_bytes": s["mean_bytes"], "mean_episode_s": s["sim_s"] / s["episodes"]}
        report["record"] = rec
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        r, e = report["realtime_factor_all_sensors"], report["expert"]
        print(f"machine: {report['machine']}")
        print(f"real-time factor, all sensors + expert, in-process: median {r['median']:.1f}x "
              f"(min {r['min']:.1f}, max {r['max']:.1f}; {r['episodes']} episodes)")
        print(f"expert: {e['successes']}/{e['episodes']} = {100 * e['success_rate']:.1f}% "
              f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%), {e['with_intrusion']} with an intrusion, "
              f"mean time to success {e['mean_time_to_success_s']:.2f} s; reasons {e['reasons']}")
        for f in e["failures"]:
            print(f"  failed: seed {f['seed']}: {f['reason']} ({f['detail']})")
        for workers, x in report["record"].items():
            print(f"record, {workers} worker(s): {x['episodes_per_min']:.1f} episodes/min, "
                  f"{x['realtime_factor']:.1f}x real time, {x['mean_bytes'] / 1e6:.2f} MB per episode "
                  f"({x['mean_episode_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
