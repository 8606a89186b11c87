"""Remote inference over loopback (issue #13): round trip, the 100 Hz loop, throughput; all in one run.

    .venv/bin/python bench/remote_inference.py [--config config/robot.yaml] [--out artifacts/bench_remote.json]

Two ``mm-fusion serve`` processes on 127.0.0.1 (one plain, one with CURVE keys made for the run),
both on the config's backend, against the same backend in this process:

1. Round trip of one streaming step: in-process engine, remote, remote + CURVE, interleaved in rounds
   so that a busy moment of the machine falls on all three alike. p50 / p99 / max per variant; the
   overhead is the remote p50 minus the in-process p50.
2. The 100 Hz loop: a Runtime (aligner, stream, safety) fed synthetic samples at their own rates, ticking
   on a 10 ms wall-clock grid, with each engine in turn (again interleaved): share of ticks whose tick()
   took longer than the 10 ms budget, p50 / p99 tick time, failed steps.
3. Throughput: 1, 4 and 16 closed-loop clients (threads of this process, one socket each) on one server,
   steps per second served; with 1 and 2 server workers.

Only loopback addresses; every loop is bounded in time and the servers are stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_fusion_ros import procs  # noqa: E402
from mm_fusion_ros.config import MODALITIES, RobotConfig, load_config  # noqa: E402
from mm_fusion_ros.engine import create_engine, model_fingerprint  # noqa: E402
from mm_fusion_ros.engine.remote_engine import RemoteEngine, RemoteError  # noqa: E402
from mm_fusion_ros.remote.keys import create_keys  # noqa: E402
from mm_fusion_ros.runtime import Runtime, load_model  # noqa: E402
from mm_fusion_ros.samples import AudioSample, CameraSample, ImuSample, LidarSample  # noqa: E402
from mm_fusion_ros.synthetic import SyntheticSensors  # noqa: E402


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: str, backend: str, endpoint: str, keys: Path | None = None, workers: int = 1):
    cmd = [sys.executable, "-m", "mm_fusion_ros.cli", "serve", "--config", config, "--backend", backend,
           "--bind", endpoint, "--workers", str(workers), "--stats-period", "3600"]
    if keys:
        cmd += ["--keys", str(keys)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc


def stop(proc) -> None:
    procs.stop_process(proc)


def inputs_for(specs, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {s.name: (rng.integers(0, 256, s.shape, dtype=np.uint8) if np.dtype(s.dtype) == np.uint8
                    else rng.uniform(0, 1, s.shape).astype(s.dtype)) for s in specs}
    out["dt"][:] = 0.01
    return out


def pct(values, q) -> float:
    return float(1e3 * np.quantile(np.asarray(values), q)) if len(values) else float("nan")


def summary_ms(values) -> dict:
    return {"p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99), "max_ms": pct(values, 1.0), "n": len(values)}


# ---------------------------------------------------------------- 1. round trip

def round_trip(engines: dict, specs, rounds: int, steps: int) -> dict:
    x = inputs_for(specs, 0)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        for _ in range(50):
            engine.step(x)
    for _ in range(rounds):
        for name, engine in engines.items():
            for _ in range(steps):
                t = time.perf_counter()
                engine.step(x)
                times[name].append(time.perf_counter() - t)
    return {name: summary_ms(v) for name, v in times.items()}


# ---------------------------------------------------------------- 2. the 100 Hz loop

RATES = {"camera": 30.0, "audio": 50.0, "imu": 200.0, "lidar": 10.0}


class Feed:
    """Synthetic samples for the modalities it knows, at their own rates, captured on the tick clock."""

    def __init__(self, cfg: RobotConfig, start: float):
        self.cfg, self.s = cfg, SyntheticSensors(cfg.model, seed=1)
        self.next = {m: start for m in RATES if m in MODALITIES}

    def sample(self, name: str, stamp: float):
        cam, rate = self.cfg.model.camera, self.cfg.model.audio.sample_rate
        if name == "camera":
            return CameraSample(stamp, "rgb8", cam.width, cam.height, cam.width * 3, self.s.camera(stamp).reshape(-1))
        if name == "audio":
            n = int(round(rate / RATES["audio"]))
            return AudioSample(stamp, rate, self.s.audio(stamp + (n - 1) / rate, n=n))
        if name == "imu":
            row = self.s.imu(stamp, n=1)[0]
            return ImuSample(stamp, row[:3].copy(), row[3:].copy())
        return LidarSample(stamp, self.s.lidar(stamp))

    def until(self, runtime: Runtime, now: float) -> None:
        for name in self.next:
            span = 1.0 / RATES[name] if name == "audio" else 0.0
            while self.next[name] + span <= now:
                runtime.add(self.sample(name, self.next[name]), now)
                self.next[name] += 1.0 / RATES[name]


def control_loop(cfg: RobotConfig, engines: dict, seconds: float, rounds: int) -> dict:
    period = 1.0 / cfg.control_rate_hz
    results = {name: {"tick_s": [], "failed": 0} for name in engines}
    runtimes = {name: Runtime(cfg, engine=engine, log=lambda _: None) for name, engine in engines.items()}
    for r in range(rounds):
        for name, runtime in runtimes.items():
            feed = Feed(cfg, 0.0)
            start = time.perf_counter()
            base = 100.0 + r * (seconds + 10.0)   # each stretch later on the clock: no backwards jump, no reset
            feed.next = {m: base - 1.1 for m in feed.next}
            next_tick = start
            while time.perf_counter() - start < seconds:
                now = time.perf_counter()
                if now < next_tick:
                    time.sleep(next_tick - now)
                    continue
                t = base + (next_tick - start)
                feed.until(runtime, t)
                t0 = time.perf_counter()
                res = runtime.tick(t)
                results[name]["tick_s"].append(time.perf_counter() - t0)
                results[name]["failed"] += int(not np.isfinite(res.raw_action).all())
                next_tick += period
                if next_tick < time.perf_counter():   # behind: skip ticks, as fusion_node's grid does
                    next_tick += period * (1 + int((time.perf_counter() - next_tick) / period))
    out = {}
    for name, r in results.items():
        ticks = np.asarray(r["tick_s"])
        out[name] = {**summary_ms(ticks), "over_budget_share": float(np.mean(ticks > period)),
                     "failed_steps": r["failed"], "ticks": int(ticks.size)}
    return out


# ---------------------------------------------------------------- 3. throughput

def throughput(remote_cfg, specs_in, specs_out, fingerprint: str, clients: int, seconds: float) -> dict:
    counts, errors = [0] * clients, [0] * clients
    go, stop_at = threading.Event(), [0.0]

    def run(i: int):
        engine = RemoteEngine(remote_cfg, specs_in, specs_out, fingerprint, log=lambda _: None)
        x = inputs_for(specs_in, i)
        go.wait()
        while time.perf_counter() < stop_at[0]:
            try:
                engine.step(x)
                counts[i] += 1
            except RemoteError:
                errors[i] += 1
        engine.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)   # every client connected and handshaken
    stop_at[0] = time.perf_counter() + seconds
    go.set()
    for t in threads:
        t.join()
    return {"clients": clients, "steps_per_s": sum(counts) / seconds, "misses": sum(errors),
            "per_client_min": min(counts) / seconds, "per_client_max": max(counts) / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/robot.yaml")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200, help="round-trip steps per variant per round")
    parser.add_argument("--loop-seconds", type=float, default=10.0, help="per variant per round")
    parser.add_argument("--loop-rounds", type=int, default=3)
    parser.add_argument("--throughput-seconds", type=float, default=5.0)
    parser.add_argument("--busy-poll-ms", type=float, default=2.0,
                        help="engine.remote.busy_poll_ms of the 'busy poll' variants (default: %(default)s)")
    parser.add_argument("--out", default="artifacts/bench_remote.json")
    args = parser.parse_args()

    cfg = load_config(args.config)
    import torch

    from mm_fusion_ros.engine import resolve_backend
    # The Runtime's torch parts (whole-window log-mel on a resync) get the engine's thread budget, as on the robot.
    torch.set_num_threads(max(1, cfg.engine.intra_op_threads))
    backend = resolve_backend(cfg.engine.backend)
    model = load_model(cfg)
    local = create_engine(cfg, model, backend, log=lambda _: None)
    fingerprint = model_fingerprint(model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    keys = tmp / "keys"
    create_keys(keys, ["bench"])
    plain_ep, curve_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    servers = [start_server(args.config, backend, plain_ep), start_server(args.config, backend, curve_ep, keys)]
    report: dict = {"machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                "python": platform.python_version()},
                    "backend": local.describe(), "config": args.config}
    try:
        remote = dataclasses.replace(cfg.engine.remote, endpoint=plain_ep, timeout_ms=1000.0)
        curve = dataclasses.replace(remote, endpoint=curve_ep, server_key=str(keys / "server.key"),
                                    client_key=str(keys / "clients/bench.key_secret"))
        engines = {"in_process": local,
                   "remote": RemoteEngine(remote, local.input_specs, local.output_specs, fingerprint, log=print),
                   "remote_curve": RemoteEngine(curve, local.input_specs, local.output_specs, fingerprint, log=print)}
        busy = {"remote_busy_poll": dataclasses.replace(remote, busy_poll_ms=args.busy_poll_ms),
                "remote_curve_busy_poll": dataclasses.replace(curve, busy_poll_ms=args.busy_poll_ms)}
        for name, c in busy.items():
            engines[name] = RemoteEngine(c, local.input_specs, local.output_specs, fingerprint, log=print)
        report["busy_poll_ms"] = args.busy_poll_ms
        print("round trip ...", flush=True)
        report["round_trip"] = round_trip(engines, local.input_specs, args.rounds, args.steps)
        base = report["round_trip"]["in_process"]["p50_ms"]
        for name in engines:
            if name != "in_process":
                report["round_trip"][name]["overhead_p50_ms"] = report["round_trip"][name]["p50_ms"] - base

        print("100 Hz loop ...", flush=True)
        loop_engines = dict(engines)
        variants = {"remote": remote, "remote_curve": curve, **busy}
        for name, c in variants.items():   # the configured deadline, as a robot would run
            c = dataclasses.replace(c, timeout_ms=cfg.engine.remote.timeout_ms)
            loop_engines[name] = RemoteEngine(c, local.input_specs, local.output_specs, fingerprint, log=print)
        report["loop_100hz"] = control_loop(cfg, loop_engines, args.loop_seconds, args.loop_rounds)
        report["loop_100hz_timeout_ms"] = cfg.engine.remote.timeout_ms

        print("throughput ...", flush=True)
        report["throughput"] = {}
        for workers in (1, 2):
            if workers == 2:
                stop(servers[0])
                plain_ep = f"tcp://127.0.0.1:{free_port()}"
                servers[0] = start_server(args.config, backend, plain_ep, workers=2)
            rc = dataclasses.replace(remote, endpoint=plain_ep)
            report["throughput"][f"workers_{workers}"] = [
                throughput(rc, local.input_specs, local.output_specs, fingerprint, n, args.throughput_seconds)
                for n in (1, 4, 16)]
    finally:
        for proc in servers:
            stop(proc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
