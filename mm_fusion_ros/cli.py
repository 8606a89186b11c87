"""``mm-fusion``: one command line for the model and its engines.

Subcommands::

    mm-fusion export        --config C [--out DIR]            model.onnx + model.json
    mm-fusion build-engine  --config C [--precision P] [--force]   TensorRT plan (cached)
    mm-fusion bench-engine  --config C [--backends a,b] [--json] [--plot PNG]
    mm-fusion demo          --config C [--duration S] [--backend B]
    mm-fusion record        OUT --episodes N [--seed S] [--noise X] [--workers W] [--resume]
    mm-fusion serve         --config C [--checkpoint CKPT] [--bind tcp://127.0.0.1:5555] [--keys DIR]
    mm-fusion keys          DIR [--client NAME ...]           CURVE key pairs for serve and its clients
    mm-fusion train         BAGS... --out CKPT [--strategy S] [--modalities a,b] [--epochs N] [--seed S]
    mm-fusion sim-demo      [--checkpoint CKPT] [--episodes N]     sim_node + fusion_node, live
    mm-fusion eval          --checkpoint CKPT [--episodes N] [--seed S] [--workers W] [--video MP4] [--drop M:D@T]

Every subcommand loads and validates the config before doing any work; a bad
config exits with status 2 and a message naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .config import MODALITIES, ConfigError, RobotConfig, load_config

DEFAULT_CONFIG = "config/robot.yaml"
SIM_CONFIG = "config/sim.yaml"     # the simulated cell's (record's default)


def _err(msg: str) -> None:
    print(f"mm-fusion: {msg}", file=sys.stderr)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _quiet_exporter_logs() -> None:
    # The ONNX exporter warns about torchvision ops it cannot register; we do not use them.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


def load_model(cfg: RobotConfig):
    """``mm_fusion_ros.runtime.load_model``, imported late so that ``--help`` does not load torch."""
    from .runtime import load_model as runtime_load_model

    return runtime_load_model(cfg)


# ---------------------------------------------------------------- export / build-engine

def cmd_export(args, cfg: RobotConfig) -> int:
    from .engine import model_fingerprint
    from .engine.export import export_onnx

    _quiet_exporter_logs()
    model = load_model(cfg)
    out = Path(args.out) if args.out else cfg.engine.artifact_path
    path = export_onnx(model, out, extra_meta={"model_sha256": model_fingerprint(model)})
    meta = json.loads((out / "model.json").read_text())
    print(f"wrote {path} ({meta['nodes']} nodes, sha256 {meta['onnx_sha256'][:12]}) and {out / 'model.json'}")
    return 0


def cmd_build_engine(args, cfg: RobotConfig) -> int:
    from .engine import ensure_onnx
    from .engine.tensorrt_engine import build_plan, tensorrt_available

    if not tensorrt_available():
        _err("TensorRT is not available here (needs the tensorrt Python package and a CUDA GPU)")
        return 1
    _quiet_exporter_logs()
    precision = args.precision or cfg.engine.precision
    onnx_path = ensure_onnx(load_model(cfg), cfg.engine.artifact_path, _log)
    build_plan(onnx_path, cfg.engine.artifact_path, precision, force=args.force or cfg.engine.force_rebuild, log=_log)
    return 0


# ---------------------------------------------------------------- bench-engine

def _bench_inputs(cfg: RobotConfig, ticks: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    from .synthetic import SyntheticSensors

    sensors = SyntheticSensors(cfg.model, seed)
    period = 1.0 / cfg.control_rate_hz
    out = []
    for i in range(ticks):
        t = 10.0 + i * period
        out.append({"camera": sensors.camera(t)[None], "audio": sensors.audio(t)[None],
                    "imu": sensors.imu(t)[None], "lidar": sensors.lidar(t)[None],
                    "joint_state": sensors.joint_vector(t)[None],
                    "mask": np.ones((1, len(MODALITIES)), np.float32),
                    "dt": np.array([[period]], np.float32),
                    "audio_frames": np.zeros((1, cfg.model.audio.n_mels, cfg.model.audio.n_frames), np.float32)})
    return out


def cmd_bench_engine(args, cfg: RobotConfig) -> int:
    import torch
    from tqdm import tqdm

    from .engine import BACKENDS, create_engine

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        _err(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
        return 2
    if "torch" not in backends:
        backends.insert(0, "torch")  # the reference every speed-up is quoted against
    if args.iterations < 10 or args.rounds < 1:
        _err("--iterations must be at least 10 and --rounds at least 1")
        return 2
    _quiet_exporter_logs()
    threads = cfg.engine.intra_op_threads or os.cpu_count() or 1
    torch.set_num_threads(threads)  # eager gets the same cores as the compiled engines
    model = load_model(cfg)
    engines = {}
    for name in backends:
        try:
            engines[name] = create_engine(cfg, model, name, log=_log)
        except Exception as exc:  # a backend that cannot run here is reported, not fatal
            _log(f"skipping {name}: {exc}")
    inputs = _bench_inputs(cfg, 64)
    from .model.network import state_slots
    state0 = np.zeros((1, state_slots(cfg.model), cfg.model.encoder.hidden), np.float32)
    latencies: dict[str, list[float]] = {name: [] for name in engines}
    states = {name: state0.copy() for name in engines}

    def run(name: str, n: int, record: bool) -> None:
        engine = engines[name]
        for i in range(n):
            feed = dict(inputs[i % len(inputs)], state=states[name])
            start = time.perf_counter()
            out = engine.step(feed)
            elapsed = time.perf_counter() - start
            states[name] = out["new_state"]
            if record:
                latencies[name].append(elapsed)

    for name in engines:
        run(name, args.warmup, record=False)
    # Interleave the backends in rounds so that machine noise hits them all alike.
    per_round = max(1, args.iterations // args.rounds)
    with tqdm(total=per_round * args.rounds * len(engines), desc="bench-engine", unit="step",
              disable=args.json or not sys.stderr.isatty(), file=sys.stderr) as bar:
        for _ in range(args.rounds):
            for name in engines:
                run(name, per_round, record=True)
                bar.update(per_round)

    results = {}
    ref = float(np.median(latencies["torch"])) if "torch" in engines else None
    for name, values in latencies.items():
        ms = np.asarray(values) * 1e3
        p50 = float(np.median(ms))
        results[name] = {"p50_ms": round(p50, 4), "p99_ms": round(float(np.percentile(ms, 99)), 4),
                         "mean_ms": round(float(ms.mean()), 4), "max_ms": round(float(ms.max()), 4),
                         "speedup_vs_torch": round(ref * 1e3 / p50, 2) if ref else None,
                         "engine": engines[name].describe()}
    report = {"backends": results, "config": str(args.config), "iterations": per_round * args.rounds,
              "threads": threads, "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "fusion": cfg.model.fusion.strategy}
    if args.plot:
        _plot_latency(latencies, args.plot)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"streaming step, batch 1, {report['iterations']} steps per backend, {threads} thread(s), "
              f"fusion={cfg.model.fusion.strategy}")
        print(f"{'backend':12s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'vs torch':>9s}")
        for name, r in results.items():
            print(f"{name:12s} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['max_ms']:8.3f} "
                  f"{r['speedup_vs_torch']:8.2f}x   {r['engine']}")
    for engine in engines.values():
        engine.close()
    return 0


def _plot_latency(latencies: dict[str, list[float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    top = max(np.percentile(np.asarray(v) * 1e3, 99.5) for v in latencies.values())
    bins = np.linspace(0, top * 1.05, 120)
    for name, values in latencies.items():
        ms = np.asarray(values) * 1e3
        ax.hist(ms, bins=bins, alpha=0.6, label=f"{name} (p50 {np.median(ms):.3f} ms)")
    ax.set_xlabel("streaming step latency (ms)")
    ax.set_ylabel("steps")
    ax.set_title("mm-fusion bench-engine")
    ax.legend()
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: str) -> None:
    from .plots import save_figure
    save_figure(fig, path, _log)


# ---------------------------------------------------------------- demo

def cmd_demo(args, cfg: RobotConfig) -> int:
    from .align import hop_grid_end
    from .cadence import CadenceMonitor
    from .engine import create_engine
    from .engine.stream import FusionStream
    from .synthetic import SyntheticSensors

    if args.duration <= 0:
        _err("--duration must be positive")
        return 2
    _quiet_exporter_logs()
    model = load_model(cfg)
    engine = create_engine(cfg, model, args.backend, log=_log)
    stream = FusionStream(engine, cfg.model)
    sensors = SyntheticSensors(cfg.model, cfg.seed)
    monitor = CadenceMonitor(cfg.control_rate_hz)
    period = 1.0 / cfg.control_rate_hz
    rate, hop = cfg.model.audio.sample_rate, cfg.model.audio.hop
    history = {"t": [], "action": [], "contribution": []}
    print(f"demo: synthetic camera/audio/imu/lidar at {cfg.control_rate_hz:.0f} Hz for {args.duration:.0f} s "
          f"(fusion={cfg.model.fusion.strategy})")
    start = time.perf_counter()
    next_tick, last_tick, last_report = start, start, start
    while True:
        now = time.perf_counter()
        if now - start >= args.duration:
            break
        if now < next_tick:
            time.sleep(next_tick - now)
            continue
        tick = time.perf_counter()
        t = tick - start
        # A sensor drops out for a while, so the demo shows masking at work.
        mask = np.ones(len(MODALITIES), np.float32)
        if 0.4 * args.duration < t < 0.6 * args.duration:
            mask[MODALITIES.index("camera")] = 0.0
        t0 = time.perf_counter()
        # The audio window ends on the hop grid, as the aligner's do, so the model's log-mel
        # frames carry over from tick to tick.
        audio_end = hop_grid_end(int(t * rate), hop)
        camera, audio = sensors.camera(t), sensors.audio(audio_end / rate)
        imu, lidar = sensors.imu(t), sensors.lidar(t)
        t1 = time.perf_counter()
        result = stream.step(camera, audio, imu, lidar, sensors.joint_vector(t), mask, max(tick - last_tick, 1e-4),
                             audio_end)
        t2 = time.perf_counter()
        monitor.record(tick, t2 - t1, {"sensors": t1 - t0, "infer": t2 - t1})
        history["t"].append(t)
        history["action"].append(result.action)
        history["contribution"].append(result.contribution)
        last_tick = tick
        next_tick += period
        if next_tick < time.perf_counter():  # fell behind: skip, never burst to catch up
            next_tick = time.perf_counter() + period
        if tick - last_report >= 1.0:
            print(monitor.report().line(), flush=True)
            last_report = tick
    report = monitor.report()
    actions = np.asarray(history["action"])
    print("summary:", report.line())
    print(f"summary: {report.total_ticks} ticks, {report.total_over_budget} over budget, "
          f"action range [{actions.min():.3f}, {actions.max():.3f}], all finite: {bool(np.isfinite(actions).all())}")
    if args.plot:
        _plot_demo(history, [n for n in MODALITIES], args.plot)
    engine.close()
    return 0


def _plot_demo(history: dict, modalities: list[str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(history["t"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, np.asarray(history["action"]))
    ax1.set_ylabel("action (7 DOF)")
    contrib = np.asarray(history["contribution"])
    ax2.stackplot(t, contrib.T, labels=modalities)
    ax2.set_ylabel("modality contribution")
    ax2.set_xlabel("time (s)")
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm-fusion", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help="ROS 2 parameters file (default: %(default)s)")
        return p

    p = add("export", "export the streaming step to ONNX")
    p.add_argument("--out", help="output directory (default: engine.artifact_dir)")
    p.set_defaults(func=cmd_export)

    p = add("build-engine", "build the TensorRT plan once (cached by ONNX hash, TensorRT, GPU, precision)")
    p.add_argument("--precision", choices=["fp32", "fp16"])
    p.add_argument("--force", action="store_true", help="rebuild even if the cached plan's key matches")
    p.set_defaults(func=cmd_build_engine)

    p = add("bench-engine", "latency of one streaming step per backend, against torch eager")
    p.add_argument("--backends", default="torch,onnxruntime", help="comma-separated (default: %(default)s)")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=20, help="interleaving rounds across backends")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--plot", help="write a latency histogram to this PNG")
    p.set_defaults(func=cmd_bench_engine)

    p = add("demo", "run a synthetic sensor stream through the model at the control rate")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--backend", help="override engine.backend")
    p.add_argument("--plot", help="write actions and modality contributions over time to this PNG")
    p.set_defaults(func=cmd_demo)

    from .replay import add_replay_commands  # make-bag, replay (bag replay, issue #4)
    add_replay_commands(add)
    from .live_demo import add_live_command  # live: the ROS 2 pipeline in separate processes (issue #3)
    add_live_command(add)
    from .sim.record import add_record_command  # record: expert demonstrations in the simulated cell
    add_record_command(add, SIM_CONFIG)
    from .remote.cli import add_remote_commands  # serve, keys: remote inference over ZeroMQ (issue #13)
    add_remote_commands(add)
    from .train import add_train_command, cmd_train  # train: behaviour cloning from bags (issue #11)
    add_train_command(add)
    sub.choices["train"].set_defaults(config=SIM_CONFIG, func=cmd_train)
    from .evaluate import add_eval_command  # eval: closed loop in the simulated cell
    add_eval_command(add, SIM_CONFIG)
    from .sim_demo import add_sim_demo_command  # sim-demo: the trained policy in the cell over ROS 2
    add_sim_demo_command(add, SIM_CONFIG)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _err(f"bad config: {exc}")
        return 2
    if getattr(args, "backend", None) is not None:
        from .engine import BACKENDS
        if args.backend not in ("auto", *BACKENDS):
            _err(f"unknown backend {args.backend!r}; choose from auto, {', '.join(BACKENDS)}")
            return 2
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, backend=args.backend))
    try:
        return args.func(args, cfg)
    except ConfigError as exc:
        _err(f"bad config: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
