"""``mm-fusion sim-demo`` (``make demo``): the trained policy driving the simulated cell over ROS 2, live.

Two processes on an isolated, loopback-only domain, as ``launch/sim.launch.py`` starts them:
``sim_node`` (the cell: sensors, ``/clock``, the arm's velocity controller) and ``fusion_node``
(``config/sim.yaml``'s block, the shipped checkpoint, ONNX Runtime, 100 Hz on sim time). This process
watches: at each episode's end (``/sim/episode``) it prints the outcome and the cadence, asks fusion_node
to forget the episode (``mm_fusion/reset``: a policy's reset() between episodes, as eval starts each
episode afresh) and starts the next one (``/sim/reset``). At the end: the success rate with its 95%
interval, tick p50/p99 and ticks over budget, how often each input was masked, messages lost between
the nodes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from . import procs
from .config import load_config
from .files import write_json_atomic
from .live_demo import READY_TIMEOUT_S, Monitor, _pct, apply_ros_env, fusion_env, tick_times_in, window_summary
from .stats import wilson_interval

DEFAULT_CHECKPOINT = "policies/sim_policy.pt"
DEMO_SEED = 5000   # evaluation seeds (training recordings use seeds below 1000)
EPISODE_TIMEOUT_S = 60.0


def run_sim_demo(config: str | Path, checkpoint: str | Path, episodes: int, workdir: str | Path, seed: int = DEMO_SEED,
                 say: Callable[[str], None] = print) -> dict:
    cfg = load_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint} (make train produces it)")
    stats_path = workdir / "fusion_stats.json"
    stats_path.unlink(missing_ok=True)
    env = procs.ros_env()
    apply_ros_env(env)
    logs = workdir / "logs"
    monitor = Monitor(cfg)
    outcomes: list[dict] = []
    try:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        node = monitor.node
        node.create_subscription(String, "/sim/episode", lambda m: outcomes.append(json.loads(m.data)),
                                 QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE,
                                            durability=DurabilityPolicy.TRANSIENT_LOCAL))
        reset_policy = node.create_client(Trigger, cfg.outputs.reset_service)
        next_episode = node.create_client(Trigger, "/sim/reset")
        say(f"sim-demo: starting fusion_node ({checkpoint.name}, ONNX Runtime, {cfg.control_rate_hz:g} Hz on sim time) "
            f"and sim_node ({episodes} episodes from seed {seed}) on domain {env['ROS_DOMAIN_ID']}")
        fusion = procs.start_node("fusion_node", logs, params_file=config, env={**env, **fusion_env(stats_path)},
                                  overrides={"checkpoint": str(checkpoint), "engine.backend": "onnxruntime",
                                             "engine.artifact_dir": str(workdir / "artifacts")})
        nodes = [fusion]
        try:
            if not procs.wait_for_log(fusion, "ticking at", timeout=READY_TIMEOUT_S):
                raise RuntimeError(f"fusion_node did not start; see {fusion.log_path}:\n{fusion.log()[-2000:]}")
            sim = procs.start_node("sim_node", logs, params_file=config, env=env,
                                   overrides={"seed": seed, "node.episodes": episodes, "node.auto_reset": False})
            nodes.append(sim)
            if not procs.wait_for_log(sim, "cell at", timeout=60):
                raise RuntimeError(f"sim_node did not start; see {sim.log_path}:\n{sim.log()[-2000:]}")
            monitor.recording = True
            started = time.monotonic()
            while len(outcomes) < episodes:
                n = len(outcomes)
                if not monitor.wait_for(lambda: len(outcomes) > n, EPISODE_TIMEOUT_S):
                    raise RuntimeError(f"no episode ended within {EPISODE_TIMEOUT_S:.0f} s; see {logs}")
                ep = outcomes[n]
                window = window_summary(monitor, ep["clock_start"], ep["clock_end"], cfg.control_rate_hz)
                masked = {k: v for k, v in window.get("mask_rate", {}).items() if v > 0}
                say(f"  episode {ep['episode']} (seed {ep['seed']}): {ep['status']} ({ep['reason']}) after "
                    f"{ep['duration']:.2f} s | {window.get('ticks', 0)} ticks at {window.get('achieved_hz')} Hz, "
                    f"held {100 * window.get('held_share', 0):.1f}% | masked: "
                    + (", ".join(f"{k} {100 * v:.1f}%" for k, v in masked.items()) or "none"))
                if len(outcomes) < episodes:
                    _call(reset_policy, cfg.outputs.reset_service)
                    _call(next_episode, "/sim/reset")
            wall = time.monotonic() - started
            monitor.recording = False
            monitor.wait_for(lambda: not sim.alive(), 30.0)   # it shuts down by itself after the last episode
            codes = procs.stop_all(nodes)
            nodes = []
        finally:
            if nodes:
                procs.stop_all(nodes)
        sim_stats = sim.stats() or {}
        stats = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        # The episodes' span on the sim clock (the ticks' clock; this process's own clock is wall time).
        t0, t1 = outcomes[0]["clock_start"], outcomes[-1]["clock_end"]
        summary = _summary(cfg, monitor, outcomes, stats, sim_stats, t0, t1, wall)
        summary["exit_codes"] = codes
    finally:
        monitor.close()
    for line in summary_lines(summary):
        say(line)
    return summary


def _call(client: Any, name: str, timeout: float = 10.0) -> None:
    from std_srvs.srv import Trigger
    if not client.wait_for_service(timeout_sec=timeout):
        raise RuntimeError(f"service {name} not available")
    future = client.call_async(Trigger.Request())
    deadline = time.monotonic() + timeout
    while not future.done() and time.monotonic() < deadline:
        time.sleep(0.005)
    if not future.done() or not future.result().success:
        raise RuntimeError(f"{name} failed: {future.result().message if future.done() else 'no answer'}")


def _summary(cfg, monitor: Monitor, outcomes: list[dict], stats: dict, sim_stats: dict, t0: float, t1: float,
             wall: float) -> dict:
    window = window_summary(monitor, t0, t1, cfg.control_rate_hz)
    tick_s = tick_times_in(stats, t0, t1)
    n, wins = len(outcomes), sum(e["status"] == "success" for e in outcomes)
    lo, hi = wilson_interval(wins, n)
    published = sim_stats.get("published", {})
    received = stats.get("received", {})
    names = {"joint_states": "joint_state"}   # sim_node counts by sensor, fusion_node by modality
    lost = {names.get(k, k): max(0, v - int(received.get(names.get(k, k), 0)))
            for k, v in published.items() if k != "clock"}
    return {
        "episodes": n, "successes": wins, "success_rate": wins / n if n else None, "success_ci95": [lo, hi],
        "outcomes": [{k: e[k] for k in ("episode", "seed", "status", "reason", "duration")} for e in outcomes],
        "ticks": window.get("ticks"), "achieved_hz": window.get("achieved_hz"),
        "tick_ms": {"p50": _pct(tick_s, 50), "p99": _pct(tick_s, 99)},
        "over_budget_share": round(float((tick_s > 1.0 / cfg.control_rate_hz).mean()), 5) if len(tick_s) else None,
        "mask_rate": window.get("mask_rate", {}), "held_share": window.get("held_share"),
        "lost": lost, "bad": stats.get("bad", {}),
        "sim_real_time_factor": sim_stats.get("real_time_factor"), "sim_slips": sim_stats.get("slips"),
        "wall_s": round(wall, 1),
    }


def summary_lines(s: dict) -> list[str]:
    lo, hi = s["success_ci95"]
    tick = s["tick_ms"]
    over = s["over_budget_share"]
    masks = ", ".join(f"{m} {100 * r:.2f}%" for m, r in s["mask_rate"].items())
    lost = sum(s["lost"].values())
    return [
        f"summary: {s['successes']}/{s['episodes']} episodes succeeded ({100 * (s['success_rate'] or 0):.0f}%, "
        f"95% CI {100 * lo:.0f}-{100 * hi:.0f}%)",
        f"summary: {s['ticks']} ticks at {s['achieved_hz']} Hz (sim time, sim_node at {s['sim_real_time_factor']}x "
        f"real time, {s['sim_slips']} slips); tick p50 {tick['p50']} ms, p99 {tick['p99']} ms, over budget "
        + (f"{100 * over:.2f}%" if over is not None else "-"),
        f"summary: inputs masked {masks}; watchdog held {100 * (s['held_share'] or 0):.1f}% of ticks",
        f"summary: messages lost between sim_node and fusion_node: {lost} {s['lost']}; bad: {s['bad'] or 'none'}",
    ]


def cmd_sim_demo(args: Any, _cfg: Any) -> int:
    if args.episodes < 1:
        print("mm-fusion sim-demo: --episodes must be at least 1")
        return 2
    try:
        summary = run_sim_demo(args.config, args.checkpoint, args.episodes, args.workdir, args.seed)
    except FileNotFoundError as exc:
        print(f"mm-fusion sim-demo: {exc}")
        return 2
    out = write_json_atomic(Path(args.workdir) / "sim_demo.json", summary)
    print(f"wrote {out}")
    return 0 if all(c == 0 for c in summary["exit_codes"].values()) else 1


def add_sim_demo_command(add: Callable[[str, str], Any], default_config: str) -> None:
    p = add("sim-demo", "the trained policy in the simulated cell over ROS 2 (sim_node + fusion_node), live")
    p.set_defaults(config=default_config, func=cmd_sim_demo)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="default: %(default)s (make train)")
    p.add_argument("--episodes", type=int, default=5)
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="first episode's seed (not a training seed)")
    p.add_argument("--workdir", default="artifacts/sim_demo", help="logs, engine artefacts, the summary JSON")
