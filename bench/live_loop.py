"""Live benchmark: the four sensor streams from other processes -> fusion_node at 100 Hz, for minutes.

    .venv/bin/python bench/live_loop.py [--duration 300] [--out artifacts/bench_live.json]
                                        [--plot artifacts/bench_live.png] [--rt-priority 50]

camera_node (a 640x480 MJPG video, published as rgb8 at 30 Hz), microphone_node
(16 kHz WAV in 20 ms chunks), sensor_sim_node (LaserScan 10 Hz x 360 beams, Imu
200 Hz) and fusion_node, each its own process, as in ``make demo``. This process
starts ROS nothing itself (no subscriber competing for the two cores): the
figures come from fusion_node's own statistics file and the publishers' counts.

Reports, over the measured window (after a warm-up):
- share of ticks over budget (tick time > 1 / control_rate_hz), target < 0.5 %;
- p50 / p99 / max tick time, timer callback start to last publish (align ->
  infer -> safety -> publish), target p99 < 5 ms;
- camera transport p50: capture stamp -> fusion_node receipt of a 640x480 rgb8
  frame (colour conversion, message, DDS, deserialisation), target < 3 ms;
- sensor messages lost by fusion_node's subscriptions: published - received per
  input, target 0.
Writes the JSON and a latency histogram PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import load_config  # noqa: E402
from mm_fusion_ros.live_demo import (SENSOR_NODES, LivePipeline, fusion_env, lost_messages,  # noqa: E402
                                     make_video, make_wav)

TARGETS = {"over_budget_share_max": 0.005, "tick_p99_ms_max": 5.0, "camera_transport_p50_ms_max": 3.0, "lost_max": 0}


def audio_type_without_rclpy(configured: str) -> str:
    """Which audio type both ends will use, decided without importing rclpy in this process."""
    try:
        import audio_common_msgs.msg  # noqa: F401
    except ImportError:
        return "image_pcm"
    return configured


def run(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config)
    work = Path(args.workdir)
    stats_path = work / "fusion_stats.json"
    stats_path.unlink(missing_ok=True)
    video = make_video(work / "live_camera.avi")
    wav = make_wav(work / "live_microphone.wav", rate=cfg.inputs.audio.source_rate)
    audio_type = audio_type_without_rclpy(cfg.inputs.audio.type)
    pipeline = LivePipeline(work / "logs", args.config)
    budget = 1.0 / cfg.control_rate_hz
    with pipeline:
        fusion = pipeline.start("fusion_node", {"safety.start_enabled": True, "inputs.audio.type": audio_type},
                                env=fusion_env(stats_path, args.rt_priority))
        if not procs.wait_for_log(fusion, "ticking at", 300):
            raise RuntimeError(f"fusion_node did not start; see {fusion.log_path}")
        pipeline.start("camera_node", {"source": str(video), "wait_for_subscribers": 1})
        pipeline.start("microphone_node", {"source": str(wav), "type": audio_type, "wait_for_subscribers": 1})
        pipeline.start("sensor_sim_node", {"wait_for_subscribers": 1})
        time.sleep(args.warmup)
        pipeline.check_alive()
        t0 = time.time()   # ROS time is system time here (no use_sim_time)
        print(f"live_loop: measuring for {args.duration:.0f} s (fusion_node log lines follow)", flush=True)
        end, seen = time.monotonic() + args.duration, 0
        while time.monotonic() < end:
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            pipeline.check_alive()
            lines = [line for line in fusion.log().splitlines() if "Hz  tick p50" in line]
            for line in lines[seen:]:
                print("  " + line.split("]: ", 1)[-1], flush=True)
            seen = len(lines)
        t1 = time.time()
        for name in reversed(SENSOR_NODES):
            pipeline.stop(name)
        time.sleep(0.5)
        pipeline.stop("fusion_node")
    stats = json.loads(stats_path.read_text())
    published: dict[str, int] = {}
    for name in SENSOR_NODES:
        published.update((pipeline.procs[name].stats() or {}).get("published", {}))

    t = np.asarray(stats["tick_t"])
    s = np.asarray(stats["tick_s"])[: len(t)]
    window = s[(t >= t0) & (t <= t1)]
    camera = np.asarray(stats["camera_transport_s"])
    messages = lost_messages(published, stats["received"])
    ms = window * 1e3
    result = {
        "duration_s": round(t1 - t0, 2), "target_hz": cfg.control_rate_hz,
        "ticks": int(len(window)), "achieved_hz": round(len(window) / (t1 - t0), 3),
        "tick_ms": {"p50": round(float(np.median(ms)), 4), "p99": round(float(np.percentile(ms, 99)), 4),
                    "max": round(float(ms.max()), 4), "mean": round(float(ms.mean()), 4)},
        "over_budget_share": round(float((window > budget).mean()), 6),
        "over_budget_ticks": int((window > budget).sum()),
        "camera_transport_ms": {"p50": round(float(np.median(camera)) * 1e3, 4),
                                "p99": round(float(np.percentile(camera, 99)) * 1e3, 4), "frames": int(len(camera))},
        "messages": messages, "lost_total": int(sum(v["lost"] for v in messages.values())),
        "bad": stats.get("bad", {}), "stage_ms": stats.get("summary", {}).get("stage_ms", {}),
        "exit_codes": pipeline.exit_codes, "rt_priority": args.rt_priority,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        "targets": TARGETS,
    }
    result["meets"] = {
        "over_budget": result["over_budget_share"] < TARGETS["over_budget_share_max"],
        "tick_p99": result["tick_ms"]["p99"] < TARGETS["tick_p99_ms_max"],
        "camera_transport_p50": result["camera_transport_ms"]["p50"] < TARGETS["camera_transport_p50_ms_max"],
        "no_loss": result["lost_total"] <= TARGETS["lost_max"],
    }
    if args.plot:
        plot(ms, camera * 1e3, budget * 1e3, args.plot)
    return result


def plot(tick_ms: np.ndarray, camera_ms: np.ndarray, budget_ms: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    top = max(budget_ms * 1.2, float(np.percentile(tick_ms, 99.9)) * 1.1)
    ax1.hist(np.clip(tick_ms, 0, top), bins=np.linspace(0, top, 150), color="tab:blue")
    ax1.axvline(budget_ms, color="tab:red", linestyle="--", label=f"budget {budget_ms:g} ms")
    ax1.axvline(np.percentile(tick_ms, 99), color="tab:orange", linestyle=":",
                label=f"p99 {np.percentile(tick_ms, 99):.2f} ms")
    ax1.set_yscale("log")
    ax1.set_xlabel("tick time, align -> publish (ms)")
    ax1.set_ylabel("ticks")
    ax1.legend()
    top = float(np.percentile(camera_ms, 99.5)) * 1.1
    ax2.hist(np.clip(camera_ms, 0, top), bins=np.linspace(0, top, 100), color="tab:green")
    ax2.axvline(np.median(camera_ms), color="k", linestyle=":", label=f"p50 {np.median(camera_ms):.2f} ms")
    ax2.set_xlabel("camera transport, capture -> fusion_node (ms), 640x480 rgb8")
    ax2.legend()
    fig.suptitle(f"live loop: {len(tick_ms)} ticks")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "config" / "robot.yaml"))
    parser.add_argument("--duration", type=float, default=300.0, help="measured seconds (default 300)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds after the sensors start (default 5)")
    parser.add_argument("--rt-priority", type=int, default=50,
                        help="SCHED_FIFO priority for fusion_node's threads, 0 = normal scheduling (default 50)")
    parser.add_argument("--workdir", default=str(REPO / "artifacts" / "bench_live"))
    parser.add_argument("--out", default=str(REPO / "artifacts" / "bench_live.json"))
    parser.add_argument("--plot", default=str(REPO / "artifacts" / "bench_live.png"))
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be positive")
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("ticks", "achieved_hz", "tick_ms", "over_budget_share",
                                             "camera_transport_ms", "lost_total", "meets")}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
