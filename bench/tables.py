"""The modality and strategy tables of issue #11: each row a `make train` of its own, then `mm-fusion eval`.

    .venv/bin/python bench/tables.py list
    .venv/bin/python bench/tables.py run ROW [ROW ...] [--episodes 200] [--seed 1000] [--workers 2]
    .venv/bin/python bench/tables.py render            # the two tables as Markdown, from what `run` wrote

A row is the shipped recipe (`make train`: demonstrations, round 0, two DAgger rounds, the head refits) with
one thing changed: the inputs the network may use (`--modalities`, the others masked at train and test time)
or the fusion strategy (`--strategy`). The demonstrations and their cache are shared (they do not depend on the
policy); the DAgger rounds are the row's own policy's. Where a row leaves out the camera or the microphone,
the targets that train what is read off them go too (the camera's pretraining and position targets, the cue
belief's): `mm-fusion train` refuses them without their sensor.

`run` writes, per row, under ``artifacts/tables/``: ``ROW.pt`` (the policy), ``ROW.train.log`` (make's
output), ``ROW.eval.json`` (`mm-fusion eval`'s report) and ``ROW.json``: the command, the wall time of the
whole `make train`, the peak training memory (the largest of its stages'), the parameters, the ONNX Runtime
step's p50 on one thread (300 steps after 30 of warm-up, the policy's exported graph, zero inputs: the graph
is flat, so its cost does not depend on the values) and the eval summary. Every row is evaluated on the same
seeds (``--seed``, ``--episodes``); seeds 1000-1199 were never trained on. A row takes ~50 min of this 2-core
machine for `make train` plus the eval; run rows one at a time, nothing else on the cores, or the times say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", "44")
os.environ.setdefault("MUJOCO_GL", "osmesa")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = REPO / "artifacts" / "tables"
SENSORS = ("camera", "audio", "imu", "lidar")
STRATEGIES = ("early", "late", "hybrid", "hierarchical", "bilinear", "adaptive")
SHIPPED_STRATEGY = "hybrid"   # config/sim.yaml's: the "all inputs" row is also the strategy table's hybrid row
# The design's claimed success rates (../shared/design.md), beside what we measure.
CLAIMED = {"hierarchical": 87.2, "hybrid": 86.7, "late": 84.1, "early": 82.3}


def rows() -> dict[str, dict]:
    """Row name -> {"table", "label", "modalities" (None: all five), "strategy" (None: the config's)}."""
    out = {"all": {"table": "modalities", "label": "all five inputs", "modalities": None, "strategy": None}}
    for s in SENSORS:
        out[f"only_{s}"] = {"table": "modalities", "label": f"{s} alone (with joint states)",
                            "modalities": (s, "joint_state"), "strategy": None}
    for s in SENSORS:
        out[f"without_{s}"] = {"table": "modalities", "label": f"all but {s}",
                               "modalities": tuple(m for m in (*SENSORS, "joint_state") if m != s), "strategy": None}
    for s in STRATEGIES:
        if s != SHIPPED_STRATEGY:
            out[f"strategy_{s}"] = {"table": "strategies", "label": s, "modalities": None, "strategy": s}
    return out


def make_args(row: dict, policy: Path) -> list[str]:
    """The `make train` command line of a row."""
    mods = row["modalities"] or (*SENSORS, "joint_state")
    targets = ["--phase-target-weight", "1"]
    if "camera" in mods:
        targets += ["--camera-target-weight", "1", "--keypoint-target-weight", "1"]
    if "audio" in mods:
        targets += ["--cue-target-weight", "1"]
    if row["modalities"]:
        targets += ["--modalities", ",".join(row["modalities"])]
    if row["strategy"]:
        targets += ["--strategy", row["strategy"]]
    return ["make", "train", f"POLICY={policy}", f"TRAIN_TARGETS={' '.join(targets)}",
            f"CAMERA_PRETRAIN={3000 if 'camera' in mods else 0}"]


def onnx_step_p50_ms(checkpoint: Path, steps: int = 300) -> float:
    import tempfile

    import numpy as np

    from mm_fusion_ros.engine.export import export_onnx
    from mm_fusion_ros.engine.onnxruntime_engine import OnnxRuntimeEngine
    from mm_fusion_ros.model import input_specs, load_checkpoint, output_specs

    model = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, tmp)
        engine = OnnxRuntimeEngine(path, input_specs(model.cfg), output_specs(model.cfg), threads=1)
        inputs = {s.name: np.zeros(s.shape, dtype=s.dtype) for s in input_specs(model.cfg)}
        inputs["dt"][:] = 0.01
        for _ in range(30):
            engine.run(inputs)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.run(inputs)
            times.append(time.perf_counter() - t0)
        engine.close()
    return round(1e3 * float(np.median(times)), 3)


def peak_memory_mb(checkpoints: list[Path]) -> float | None:
    from mm_fusion_ros.model import read_checkpoint
    peaks = [(read_checkpoint(p).get("training") or {}).get("peak_memory_mb") for p in checkpoints if p.is_file()]
    peaks = [p for p in peaks if p is not None]
    return round(max(peaks), 1) if peaks else None


def run_row(name: str, row: dict, episodes: int, seed: int, workers: int,
            trained: tuple[Path, float, tuple[Path, ...]] | None = None) -> dict:
    """Train (or, with ``trained``: (a checkpoint that this row's `make train` already wrote, its minutes, its
    round checkpoints), adopt) and evaluate one row."""
    import shutil

    from mm_fusion_ros.files import write_json_atomic
    from mm_fusion_ros.model import load_checkpoint

    OUT.mkdir(parents=True, exist_ok=True)
    policy = OUT / f"{name}.pt"
    args = make_args(row, policy.relative_to(REPO))
    if trained is None:
        print(f"tables: {name}: {shlex.join(args)}", flush=True)
        log_path = OUT / f"{name}.train.log"
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        train_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"tables: {name}: make train failed ({done.returncode}); see {log_path}")
    else:
        shutil.copyfile(trained[0], policy)
        train_s = 60 * trained[1]
    eval_json = OUT / f"{name}.eval.json"
    eval_args = [str(REPO / ".venv" / "bin" / "mm-fusion"), "eval", "--config", "config/sim.yaml", "--checkpoint",
                 str(policy.relative_to(REPO)), "--episodes", str(episodes), "--seed", str(seed), "--workers",
                 str(workers), "--out", str(eval_json.relative_to(REPO))]
    print(f"tables: {name}: {shlex.join(eval_args)}", flush=True)
    t1 = time.perf_counter()
    subprocess.run(eval_args, cwd=REPO, check=True)
    eval_s = time.perf_counter() - t1
    report = json.loads(eval_json.read_text())
    model = load_checkpoint(policy)
    result = {
        "row": name, **row, "make_train": shlex.join(args), "eval": shlex.join(eval_args),
        "adopted_from": str(trained[0]) if trained else None,
        "train_min": round(train_s / 60, 1), "eval_min": round(eval_s / 60, 1),
        # The rounds' checkpoints are this row's only where it was just trained here.
        "peak_memory_mb": peak_memory_mb([REPO / "artifacts" / "policy_round0.pt",
                                          REPO / "artifacts" / "policy_round1.pt", policy] if trained is None
                                         else [*trained[2], policy]),
        "peak_memory_stages": "all" if trained is None or trained[2] else "final only",
        "parameters": sum(p.numel() for p in model.parameters()),
        "onnx_step_p50_ms": onnx_step_p50_ms(policy),
        "summary": report["summary"], "seeds": report["seeds"],
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json_atomic(OUT / f"{name}.json", result)
    s = report["summary"]
    print(f"tables: {name}: {s['successes']}/{s['episodes']} in {result['train_min']} min of make train", flush=True)
    return result


def _rate(summary: dict) -> str:
    lo, hi = summary["success_ci95"]
    return (f"{summary['successes']}/{summary['episodes']} ({100 * summary['success_rate']:.1f} %, "
            f"CI {100 * lo:.1f}-{100 * hi:.1f} %)")


def render() -> str:
    done = {p.stem: json.loads(p.read_text()) for p in sorted(OUT.glob("*.json"))
            if not p.name.endswith(".eval.json")}
    lines = ["Modalities (`bench/tables.py run ROW`; the row's `make train` command is in its JSON):", "",
             "| row | success (95 % CI) | failures | make train |", "|---|---|---|---|"]
    for name, row in rows().items():
        if row["table"] != "modalities":
            continue
        r = done.get(name)
        lines.append(f"| {row['label']} | {_rate(r['summary']) if r else 'not run'} | "
                     f"{', '.join(f'{k} {v}' for k, v in r['summary']['failure_reasons'].items()) if r else ''}"
                     f" | {str(r['train_min']) + ' min' if r else ''} |")
    lines += ["", "Strategies:", "", "| strategy | claimed (design) | success (95 % CI) | ONNX Runtime step p50 | "
              "parameters | peak training memory | make train |", "|---|---|---|---|---|---|---|"]
    for s in STRATEGIES:
        r = done.get("all" if s == SHIPPED_STRATEGY else f"strategy_{s}")
        claimed = f"{CLAIMED[s]} %" if s in CLAIMED else "-"
        if r:
            lines.append(f"| {s} | {claimed} | {_rate(r['summary'])} | {r['onnx_step_p50_ms']} ms | "
                         f"{r['parameters']:,} | {r['peak_memory_mb']} MB"
                         f"{' (final stage only)' if r.get('peak_memory_stages') == 'final only' else ''} | "
                         f"{r['train_min']} min |")
        else:
            lines.append(f"| {s} | {claimed} | not run | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the rows and their make train commands")
    r = sub.add_parser("run", help="train and evaluate rows, one after the other")
    r.add_argument("rows", nargs="+")
    r.add_argument("--episodes", type=int, default=200)
    r.add_argument("--seed", type=int, default=1000)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--trained", type=Path, help="one row only: a checkpoint its `make train` command already "
                   "wrote (e.g. the shipped policy for 'all'), evaluated without training again")
    r.add_argument("--train-min", type=float, help="with --trained: how long that make train took (minutes)")
    r.add_argument("--trained-rounds", type=Path, nargs="*", default=[],
                   help="with --trained: that make train's round checkpoints (policy_round0.pt, policy_round1.pt), "
                        "whose stages' peak memory the row reports with the final one's")
    sub.add_parser("render", help="the tables as Markdown")
    args = p.parse_args(argv)
    table = rows()
    if args.command == "list":
        for name, row in table.items():
            print(f"{name:24s} {shlex.join(make_args(row, Path('artifacts/tables') / f'{name}.pt'))}")
        return 0
    if args.command == "render":
        print(render())
        return 0
    unknown = [n for n in args.rows if n not in table]
    if unknown:
        print(f"tables: unknown row(s) {', '.join(unknown)}; `list` names them", file=sys.stderr)
        return 2
    if args.seed < 1000 or args.seed + args.episodes > 2000:
        print("tables: evaluation seeds must lie in 1000-1999 (training uses 0-199 and 2000-2299)", file=sys.stderr)
        return 2
    if (args.trained is None) != (args.train_min is None) or (args.trained and len(args.rows) != 1):
        print("tables: --trained and --train-min go together, with one row", file=sys.stderr)
        return 2
    if args.trained_rounds and not args.trained:
        print("tables: --trained-rounds goes with --trained", file=sys.stderr)
        return 2
    for path in ([args.trained] if args.trained else []) + list(args.trained_rounds):
        if not path.is_file():
            print(f"tables: --trained: no checkpoint at {path}", file=sys.stderr)
            return 2
    for name in args.rows:
        run_row(name, table[name], args.episodes, args.seed, args.workers,
                (args.trained, args.train_min, tuple(args.trained_rounds)) if args.trained else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
