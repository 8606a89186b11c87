"""The floor under remote inference's round trip (issue #13): a bare pyzmq DEALER/ROUTER echo between two
processes of exactly the bytes a step sends and gets back, with no work on either side.

    .venv/bin/python bench/zmq_floor.py [--config config/robot.yaml] [--steps 1000] [--out artifacts/zmq_floor.json]

The request is the default config's step request (a header frame, then one frame per input tensor), the
reply its step reply (a header, one frame per output tensor), as ``remote.wire`` lays them out; beside it
the same bytes in two frames (header + one packed buffer), over TCP on 127.0.0.1 and over ipc://. Whatever
the policy server and the remote engine add sits on top of these figures. Loopback only; each echo
process ends when told to, and is stopped by PID otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ECHO = """
import sys, zmq
ctx = zmq.Context(1)
sock = ctx.socket(zmq.ROUTER)
sock.bind(sys.argv[1])
reply = [bytes(int(n)) for n in sys.argv[2].split(",")]
print("ready", flush=True)
while True:
    msg = sock.recv_multipart(copy=False)
    if len(msg) == 2 and msg[1].bytes == b"stop":
        break
    sock.send_multipart([msg[0], *reply], copy=False)
"""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame_sizes(specs, header: int) -> list[int]:
    return [header] + [int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs]


def echo(endpoint: str, request: list[int], reply: list[int], steps: int) -> list[float]:
    import zmq

    from mm_fusion_ros import procs
    proc = subprocess.Popen([sys.executable, "-c", ECHO, endpoint, ",".join(map(str, reply))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("ready")
        ctx = zmq.Context(1)
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoint)
        frames = [np.zeros(n, np.uint8) for n in request]
        times = []
        for i in range(steps + 100):
            t = time.perf_counter()
            sock.send_multipart(frames, copy=False)
            sock.recv_multipart(copy=False)
            if i >= 100:    # after the connection and the caches have warmed up
                times.append(time.perf_counter() - t)
        sock.send_multipart([b"stop"])
        proc.wait(timeout=5)
        sock.close()
        ctx.term()
        return times
    finally:
        if proc.poll() is None:
            procs.stop_process(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="config/robot.yaml")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="each variant this many times, interleaved")
    parser.add_argument("--out", default="artifacts/zmq_floor.json")
    args = parser.parse_args()

    from mm_fusion_ros.config import load_config
    from mm_fusion_ros.model import input_specs, output_specs
    from mm_fusion_ros.remote import wire

    cfg = load_config(args.config)
    ins, outs = input_specs(cfg.model), output_specs(cfg.model)
    header_in = len(wire.fast_step_request(1, json.dumps("0" * 64), 5.0, wire.Layout(ins),
                                           {s.name: np.zeros(s.shape, s.dtype) for s in ins})[0])
    header_out = len(wire.fast_result_reply(1, json.dumps("0" * 64), 0.123, wire.Layout(outs),
                                            {s.name: np.zeros(s.shape, s.dtype) for s in outs})[0])
    request, reply = frame_sizes(ins, header_in), frame_sizes(outs, header_out)
    layouts = {"frame per tensor (wire v1)": (request, reply),
               "packed (header + one buffer)": ([request[0], sum(request[1:])], [reply[0], sum(reply[1:])])}
    tmp = Path(tempfile.mkdtemp(prefix="zmq_floor_"))
    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for transport in ("tcp", "ipc"):
            for name, (req, rep) in layouts.items():
                endpoint = (f"tcp://127.0.0.1:{free_port()}" if transport == "tcp" else f"ipc://{tmp}/echo{r}.ipc")
                times.setdefault(f"{transport}, {name}", []).extend(echo(endpoint, req, rep, args.steps))
    report = {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
              "request_bytes": sum(request), "reply_bytes": sum(reply),
              "request_frames": len(request), "reply_frames": len(reply),
              "echo": {k: {"p50_ms": 1e3 * float(np.median(v)), "p99_ms": 1e3 * float(np.quantile(v, 0.99)),
                           "n": len(v)} for k, v in times.items()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    for k, v in report["echo"].items():
        print(f"{k:40} p50 {v['p50_ms']:.3f} ms  p99 {v['p99_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
