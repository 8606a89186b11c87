"""Offline replay speed against real time: default config, ONNX Runtime backend.

    .venv/bin/python bench/replay_speed.py [--duration 10] [--camera-size 640x480] [--runs 3] [--json]

Writes a synthetic bag (all four sensors at their real rates, camera 640x480
rgb8), replays it ``--runs`` times through ``mm_fusion_ros.replay.replay``
(each run a fresh Runtime, so recurrent state and buffers start empty) and
reports bag seconds per wall second for each run, the median, and where a
tick's time goes. The first run pays for ONNX Runtime's warm-up; the median
is the figure to quote. Every run's output bag must be byte-identical to the
first (the determinism the regression comparison relies on); the script
fails otherwise.

The issue's target is at least 20x real time. At 100 Hz that is 0.5 ms per
tick for everything: reading and converting the bag's messages, alignment,
preprocessing, the engine step, safety and writing four output messages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_fusion_ros.bag.make_bag import MakeBagOptions, make_bag  # noqa: E402
from mm_fusion_ros.bag.reader import BagReader  # noqa: E402
from mm_fusion_ros.config import load_config  # noqa: E402
from mm_fusion_ros.replay import ReplayOptions, replay  # noqa: E402
from mm_fusion_ros.runtime import Runtime  # noqa: E402

TARGET_X = 20.0


def _quiet(_msg: str) -> None:
    pass


def _payloads(path: Path) -> list[tuple[str, int, bytes]]:
    with BagReader(path, log=_quiet) as bag:
        return [(m.topic, m.t_ns, m.data) for m in bag.messages()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "config" / "robot.yaml"))
    p.add_argument("--duration", type=float, default=10.0, help="bag length in seconds (default: %(default)s)")
    p.add_argument("--camera-size", default="640x480")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bag", help="replay this bag instead of writing a synthetic one")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args()

    cfg = load_config(args.config)
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend="onnxruntime"))
    width, height = (int(v) for v in args.camera_size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="replay_speed_") as tmp:
        tmp = Path(tmp)
        bag = Path(args.bag) if args.bag else tmp / "bag"
        if not args.bag:
            t0 = time.perf_counter()
            make_bag(bag, cfg, MakeBagOptions(duration_s=args.duration, camera_width=width, camera_height=height),
                     progress=False, log=_quiet)
            print(f"made a {args.duration:g} s bag ({width}x{height} camera) in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr)
        runs, first = [], None
        for i in range(args.runs):
            runtime = Runtime(cfg, log=_quiet)
            result = replay(bag, cfg, ReplayOptions(out=tmp / f"out{i}", progress=False), runtime=runtime,
                            log=_quiet)
            payloads = _payloads(result.out)
            if first is None:
                first = payloads
            elif payloads != first:
                print(f"run {i}: output differs from run 0: replay is not deterministic", file=sys.stderr)
                return 1
            runs.append({"speed_x": round(result.speed, 2), "wall_s": round(result.wall_s, 3),
                         "ticks": result.ticks, "stage_ms": {k: round(v, 4) for k, v in
                                                             result.summary["stage_ms"].items()}})
            runtime.engine.close()
            print(f"run {i}: {result.ticks} ticks, {result.bag_s:.2f} s of bag in {result.wall_s:.3f} s = "
                  f"{result.speed:.1f}x real time", file=sys.stderr)
    median = statistics.median(r["speed_x"] for r in runs)
    stages = runs[-1]["stage_ms"]
    tick_ms = 1e3 / (cfg.control_rate_hz * median)
    report = {
        "command": "python bench/replay_speed.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "backend": "onnxruntime", "intra_op_threads": cfg.engine.intra_op_threads,
        "fusion": cfg.model.fusion.strategy, "control_rate_hz": cfg.control_rate_hz,
        "camera": f"{width}x{height}", "bag_s": args.duration if not args.bag else None,
        "runs": runs, "median_speed_x": median, "target_x": TARGET_X, "met": median >= TARGET_X,
        "wall_ms_per_tick": round(tick_ms, 3),
        "stage_ms_last_run": stages,
        "other_ms_per_tick": round(tick_ms - sum(stages.values()), 3),   # bag reading, decoding, conversion
        "deterministic": True,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"offline replay: median {median:.1f}x real time over {len(runs)} runs "
              f"(target {TARGET_X:g}x: {'met' if report['met'] else 'NOT met'})")
        print(f"per tick {tick_ms:.3f} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
              + f", reading + conversion {report['other_ms_per_tick']:.3f} ms")
        print(f"command: {report['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
