"""``mm-fusion serve`` (a policy server for a GPU box) and ``mm-fusion keys`` (its CURVE key pairs)."""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any, Callable


def _err(msg: str) -> None:
    print(f"mm-fusion: {msg}", file=sys.stderr)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_serve(args: Any, cfg: Any) -> int:
    from ..engine import create_engine, model_fingerprint, resolve_backend
    from ..runtime import load_model
    from .endpoint import InsecureEndpointError, check_endpoint
    from .keys import KeysError
    from .server import PolicyServer

    if args.workers < 1:
        _err("--workers must be at least 1")
        return 2
    try:
        check_endpoint(args.bind, args.keys, "--bind")   # before minutes of engine building, not after
    except InsecureEndpointError as exc:
        _err(str(exc))
        return 2
    if args.checkpoint:
        cfg = dataclasses.replace(cfg, checkpoint=args.checkpoint)
    if resolve_backend(cfg.engine.backend) == "remote":
        _err("engine.backend is 'remote': a server runs the model itself; pass --backend auto (or torch, "
             "onnxruntime, tensorrt, compiled)")
        return 2
    model = load_model(cfg)
    engines = [create_engine(cfg, model, log=_log) for _ in range(args.workers)]
    fingerprint = model_fingerprint(model)
    try:
        server = PolicyServer(engines, fingerprint, args.bind, keys=args.keys, log=_log,
                              queue_per_client=args.queue)
        server.start()
    except (InsecureEndpointError, KeysError) as exc:
        _err(str(exc))
        return 2

    def stop(signum: int, _frame: Any) -> None:
        server._stop.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    print(f"ready {server.endpoint} model {fingerprint}", flush=True)   # a line for scripts that start us
    last: dict[str, int] = {}
    try:
        while not server._stop.wait(args.stats_period):
            stats = server.snapshot()
            if stats != last:
                _log("stats: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())))
                last = stats
    finally:
        server.stop()
        _log("stopped; " + ", ".join(f"{k} {v}" for k, v in sorted(server.snapshot().items())))
    return 0


def cmd_keys(args: Any, cfg: Any) -> int:
    from .keys import KeysError, create_keys

    try:
        written = create_keys(args.dir, args.client or ["robot"])
    except KeysError as exc:
        _err(str(exc))
        return 2
    for path in written["server"]:
        print(f"wrote {path}")
    for path in written["clients"]:
        print(f"wrote {path}")
    print(f"server: mm-fusion serve --keys {args.dir} --bind tcp://ADDRESS:5555; clients: engine.remote.server_key "
          f"{args.dir}/server.key, engine.remote.client_key {args.dir}/clients/NAME.key_secret; revoke a client by "
          f"deleting {args.dir}/allowed/NAME.key")
    return 0


def add_remote_commands(add: Callable[[str, str], Any]) -> None:
    p = add("serve", "serve the model to remote engines and PolicyClients over ZeroMQ (CURVE with --keys)")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555",
                   help="ZeroMQ address (default: %(default)s); not loopback only with --keys")
    p.add_argument("--keys", help="key directory from `mm-fusion keys`: CURVE on, clients in DIR/allowed/")
    p.add_argument("--checkpoint", help="override the config's checkpoint")
    p.add_argument("--backend", help="override engine.backend (auto, torch, onnxruntime, tensorrt, compiled)")
    p.add_argument("--workers", type=int, default=1, help="engines stepping in parallel (default: %(default)s)")
    p.add_argument("--queue", type=int, default=4, help="requests queued per client (default: %(default)s)")
    p.add_argument("--stats-period", type=float, default=10.0, help="seconds between stats lines")
    p.set_defaults(func=cmd_serve)

    p = add("keys", "make CURVE key pairs for `serve --keys` and its clients")
    p.add_argument("dir", help="key directory (the server's pair is kept if it exists)")
    p.add_argument("--client", action="append", help="client name (repeatable; default: robot)")
    p.set_defaults(func=cmd_keys)
