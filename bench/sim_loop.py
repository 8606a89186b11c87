"""The cell over ROS 2 with fusion_node beside it: does the loop keep real time, and with what headroom?

    .venv/bin/python bench/sim_loop.py [--duration 60] [--rate-factor 1.0] [--json]

Starts ``sim_node`` and ``fusion_node`` (``config/sim.yaml``, ONNX Runtime, the
untrained policy: the figure is about the loop, not the policy) as separate
processes on an isolated domain, lets them run ``--duration`` wall seconds,
stops them with SIGINT and reads both nodes' statistics lines: sim_node's
real-time factor, clock slips and CPU share; fusion_node's ticks, ticks over
budget, tick p50/p99 and how often each input was masked; messages lost
between the two (published by sim_node, not received by fusion_node).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.live_demo import fusion_env  # noqa: E402

SIM_YAML = REPO / "config" / "sim.yaml"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--rate-factor", type=float, default=1.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = procs.ros_env()
        stats_path = Path(tmp) / "fusion_stats.json"
        fusion = procs.start_node(
            "fusion_node", tmp, params_file=SIM_YAML, env={**env, **fusion_env(stats_path, rt_priority=0)},
            overrides={"engine.backend": "onnxruntime", "engine.artifact_dir": str(Path(tmp) / "artifacts")})
        if not procs.wait_for_log(fusion, "ticking at", timeout=120):
            print(fusion.log(), file=sys.stderr)
            raise SystemExit("fusion_node did not start")
        sim = procs.start_node("sim_node", tmp, params_file=SIM_YAML, env=env,
                               overrides={"node.rate_factor": args.rate_factor})
        if not procs.wait_for_log(sim, "cell at", timeout=60):
            print(sim.log(), file=sys.stderr)
            raise SystemExit("sim_node did not start")
        time.sleep(args.duration)
        # sim_node first (stop_all stops in reverse order), so that fusion_node is still there for its last messages.
        codes = procs.stop_all([fusion, sim])
        sim_stats, fusion_stats = sim.stats(), json.loads(stats_path.read_text())
    if sim_stats is None:
        raise SystemExit("sim_node printed no statistics")
    summary = fusion_stats.get("summary", {})
    published = sim_stats["published"]
    received = fusion_stats["received"]
    lost = {m: published[m] - received.get(m, 0) for m in ("camera", "audio", "imu", "lidar")}
    report = {
        "duration_s": args.duration, "rate_factor": args.rate_factor, "cores": os.cpu_count(), "exit": codes,
        "sim_node": {k: sim_stats[k] for k in ("real_time_factor", "slips", "cpu_share", "sim_s", "wall_s",
                                               "step_compute_ms", "episodes", "outcomes")},
        "fusion_node": {"ticks": fusion_stats["ticks"], "over_budget": fusion_stats["over_budget"],
                        "tick_ms": fusion_stats["tick_ms"], "mask_rate": summary.get("mask_rate"),
                        "bad": fusion_stats["bad"]},
        "lost": lost,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        s, f = report["sim_node"], report["fusion_node"]
        print(f"{args.duration:g} s wall, rate factor {args.rate_factor:g}, {report['cores']} cores")
        print(f"sim_node: {s['real_time_factor']:.3f}x real time, {s['slips']} slips, "
              f"CPU {100 * (s['cpu_share'] or 0):.0f}% of one core, step compute {s['step_compute_ms']}")
        print(f"fusion_node: {f['ticks']} ticks, {f['over_budget']} over budget, tick {f['tick_ms']}, "
              f"masked {f['mask_rate']}, bad {f['bad']}")
        print(f"lost (published by sim_node, not received by fusion_node): {lost}; exit codes {codes}")
    return 0 if all(c == 0 for c in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
