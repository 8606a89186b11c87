"""The policy server: one model behind a ZeroMQ ROUTER socket (``mm-fusion serve``).

The step stays stateless here: a request carries the step's inputs and the recurrent state, the
reply the outputs and the new state (``wire`` has the format), so a restarted server, or a second one
behind the same address, loses nothing, and any number of robots can share one server.

Threads: the I/O thread owns the ROUTER socket. It reads every request as it comes, checks it
(header, model fingerprint, tensor names, dtypes, shapes and sizes against the model's specs) and
answers what is wrong at once; a good request joins its client's queue. Workers (one engine each)
take the oldest request of the next client in turn, so a client that sends a burst waits behind its
own requests, never in front of another's, and one client's requests are served one at a time, in
order. A request that waited longer than its ``timeout_ms`` is dropped and counted: its client has
already given up on it. Replies go back through the I/O thread; a client that does not read its
replies fills its own pipe (high-water mark) and loses replies, counted, without holding anyone up.

Bounds: frames per message and bytes per frame (``MAXMSGSIZE``: libzmq disconnects a peer that
announces a bigger frame, before allocating it), queued requests per client and in all, and the
high-water marks of each peer's pipes.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import wire
from .endpoint import InsecureEndpointError, check_endpoint, is_loopback

__all__ = ["InsecureEndpointError", "PolicyServer", "is_loopback"]

@dataclass
class _Job:
    ident: bytes
    id: int
    arrays: dict[str, np.ndarray]
    arrival: float
    timeout_s: float
    frames: list[Any]          # the received frames the arrays are views of


class _Scheduler:
    """Per-client FIFO queues served round-robin, at most one request per client in flight."""

    def __init__(self, per_client: int, total: int):
        self.per_client, self.total = per_client, total
        self._queues: dict[bytes, deque[_Job]] = {}
        self._ready: deque[bytes] = deque()
        self._busy: set[bytes] = set()
        self._count = 0
        self._cond = threading.Condition()

    def put(self, job: _Job) -> bool:
        with self._cond:
            q = self._queues.get(job.ident)
            if self._count >= self.total or (q is not None and len(q) >= self.per_client):
                return False
            if q is None:
                q = self._queues[job.ident] = deque()
            q.append(job)
            self._count += 1
            if len(q) == 1 and job.ident not in self._busy:
                self._ready.append(job.ident)
                self._cond.notify()
            return True

    def take(self, timeout: float) -> _Job | None:
        with self._cond:
            if not self._ready and not self._cond.wait_for(lambda: self._ready, timeout):
                return None
            ident = self._ready.popleft()
            self._busy.add(ident)
            self._count -= 1
            return self._queues[ident].popleft()

    def done(self, ident: bytes) -> None:
        with self._cond:
            self._busy.discard(ident)
            if self._queues.get(ident):
                self._ready.append(ident)   # to the back: the other clients go first
                self._cond.notify()
            else:
                self._queues.pop(ident, None)

    def queued(self) -> int:
        with self._cond:
            return self._count


class PolicyServer:
    """Serve ``engines`` (one per worker thread, all of the same model) on ``bind``.

    ``keys`` is a directory made by ``mm-fusion keys``: CURVE on, with ``keys/server.key_secret`` and the
    allow-list ``keys/allowed/``. Without keys only a loopback address is accepted (InsecureEndpointError).
    """

    def __init__(self, engines: Sequence[Any], model: str, bind: str, *, keys: str | Path | None = None,
                 backend: str = "", log: Callable[[str], None] = print, queue_per_client: int = 4,
                 max_queued: int = 256, hwm: int = 32):
        if not engines:
            raise ValueError("a server needs at least one engine")
        check_endpoint(bind, keys, "bind address")
        self.engines = list(engines)
        self.input_specs = tuple(self.engines[0].input_specs)
        self.output_specs = tuple(self.engines[0].output_specs)
        self._in, self._out = wire.Layout(self.input_specs), wire.Layout(self.output_specs)
        self._model_json = json.dumps(model)
        self.model, self.bind, self.backend, self.log = model, bind, backend or self.engines[0].describe(), log
        self.keys = Path(keys) if keys else None
        self.endpoint = bind
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self._scheduler = _Scheduler(queue_per_client, max_queued)
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._hwm = hwm
        self._max_frames = 1 + wire.MAX_TENSORS
        biggest = max(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in self.input_specs)
        # CURVE frames carry a MAC, a nonce and a command name on top of the data (libzmq checks the
        # size on the wire): a few hundred bytes of slack keep the largest tensor under the limit.
        self._max_frame_bytes = max(biggest, wire.MAX_HEADER_BYTES) + wire.FRAME_SLACK
        self._logged: Counter[str] = Counter()
        self.allow_list = None
        self._curve_pair: tuple[bytes, bytes] | None = None
        self._auth = None
        self._ctx = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> "PolicyServer":
        import zmq

        ctx = self._ctx = zmq.Context()
        try:
            if self.keys is not None:
                self._setup_curve(ctx)
            router = self._make_router()
            router.bind(self.bind)
            self.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
            wake_recv = ctx.socket(zmq.PULL)
            wake_recv.bind(f"inproc://results-{id(self)}")
        except Exception:
            self._close_ctx()
            raise
        self._router, self._wake_recv = router, wake_recv
        # One engine: the I/O thread steps it itself. Handing each request to a worker thread and the
        # reply back costs two thread wake-ups, about a third of the whole loopback round trip here.
        self._inline = self.engines[0] if len(self.engines) == 1 else None
        self._threads = [threading.Thread(target=self._io_loop, name="policy-io", daemon=True)]
        for i, engine in enumerate(self.engines if self._inline is None else ()):
            wake = ctx.socket(zmq.PUSH)
            wake.linger = 0
            wake.connect(f"inproc://results-{id(self)}")
            self._threads.append(threading.Thread(target=self._worker, args=(engine, wake), name=f"policy-worker-{i}",
                                                  daemon=True))
        self._warm = threading.Barrier(len(self.engines) + 1)   # each engine warms up on its own thread
        for t in self._threads:
            t.start()
        try:
            self._warm.wait(timeout=300.0)
        except threading.BrokenBarrierError:
            self.log("WARNING: a worker's warm-up step did not finish in 300 s; serving anyway")
        curve = (f"CURVE on, {len(self.allow_list.names())} client key(s) allowed" if self.allow_list
                 else "no CURVE (loopback only)")
        self.log(f"serving model {self.model[:16]} ({self.backend}, {len(self.engines)} worker(s)) on "
                 f"{self.endpoint}; {curve}")
        return self

    def _make_router(self) -> Any:
        import zmq

        router = self._ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.router_mandatory = 1   # a full or vanished peer raises instead of silently eating the reply
        router.rcvhwm = router.sndhwm = self._hwm
        router.maxmsgsize = self._max_frame_bytes
        if self._curve_pair is not None:
            router.curve_server = True
            router.curve_publickey, router.curve_secretkey = self._curve_pair
        return router

    def _rebind(self, poller: Any) -> None:
        """A new ROUTER on the same address: CURVE checks keys only at the handshake, so revoking a key means
        every client handshakes again (about one reconnect interval, 100 ms, without replies)."""
        import zmq

        poller.unregister(self._router)
        self._router.close(0)
        for _ in range(200):
            try:
                router = self._make_router()
                router.bind(self.endpoint)
                break
            except zmq.ZMQError:   # the old listener is closed asynchronously; its port frees in a moment
                router.close(0)
                time.sleep(0.01)
        else:
            raise RuntimeError(f"could not bind {self.endpoint} again after revoking keys")
        self._router = router
        poller.register(router, zmq.POLLIN)
        self.count("rebinds")

    def _setup_curve(self, ctx: Any) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        from .keys import AllowList, KeysError, load_pair

        public, secret = load_pair(self.keys / "server.key_secret")
        if not (self.keys / "allowed").is_dir():
            raise KeysError(f"{self.keys / 'allowed'}: no allow-list directory (made by `mm-fusion keys`)")
        self.allow_list = AllowList(self.keys / "allowed", log=self.log)
        if not self.allow_list.names():
            self.log(f"WARNING: {self.keys / 'allowed'} holds no client key: every client will be refused")
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self.allow_list)
        self._curve_pair = (public, secret)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5.0)
        self._threads = []
        self._close_ctx()

    def _close_ctx(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def __enter__(self) -> "PolicyServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def wait(self) -> None:
        """Block until stop() (from a signal handler, another thread)."""
        while not self._stop.wait(0.5):
            pass

    # ------------------------------------------------------------ accounting

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def snapshot(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self.stats)
        out["queued"] = self._scheduler.queued()
        if self.allow_list is not None:
            out.update({f"refused {k}": v for k, v in self.allow_list.refused.items()})
        return out

    def _note(self, code: str, message: str) -> None:
        """Log the first of each kind of bad request and every 1000th: a flood must not flood the log."""
        self._logged[code] += 1
        n = self._logged[code]
        if n == 1 or n % 1000 == 0:
            self.log(f"refused request ({code}, {n} so far): {message}")

    # ------------------------------------------------------------ I/O thread

    def _io_loop(self) -> None:
        import zmq

        if self._inline is not None:
            self._warm_up(self._inline)
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        next_keys = time.monotonic() + 1.0
        self._since, self._stepped = time.monotonic(), False
        while not self._stop.is_set():
            if self.allow_list is not None and time.monotonic() >= next_keys:
                next_keys = time.monotonic() + 1.0
                if self.allow_list.reload():
                    self._rebind(poller)
            busy = self._inline is not None and self._scheduler.queued()
            try:
                events = dict(poller.poll(0 if busy else 100))
            except zmq.ZMQError:
                break
            if self._wake_recv in events:
                self._flush_results()
            if self._router in events:
                for _ in range(64):   # then look at the results again
                    if not self._read_one():
                        self._since, self._stepped = time.monotonic(), False
                        break
            if self._inline is not None:
                job = self._scheduler.take(timeout=0.0)
                if job is not None:
                    self._stepped = True
                    try:
                        frames = self._serve(self._inline, job)
                        if frames is not None:
                            self._send(job.ident, frames)
                    finally:
                        self._scheduler.done(job.ident)
                    if not self._router.poll(0):   # nothing came in during the step
                        self._since, self._stepped = time.monotonic(), False
        self._router.close(0)
        self._wake_recv.close(0)

    def _flush_results(self) -> None:
        import zmq

        while True:
            try:
                self._wake_recv.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                ident, frames = self._results.get_nowait()
            except queue.Empty:
                return
            self._send(ident, frames)

    def _send(self, ident: bytes, frames: list[Any]) -> None:
        import errno

        import zmq

        try:
            self._router.send_multipart([ident, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.count("reply_dropped_full")       # the client is not reading: its loss, nobody else's
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self.count("reply_dropped_gone")       # it disconnected (or restarted) meanwhile

    def _read_one(self) -> bool:
        import zmq

        try:
            ident = self._router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        frames, extra = [], 0
        more = ident.more
        while more:
            frame = self._router.recv(copy=False)
            more = frame.more
            if len(frames) < self._max_frames:
                frames.append(frame)
            else:
                extra += 1   # read and let go, never kept
        self._handle(ident.bytes, frames, extra)
        return True

    def _handle(self, ident: bytes, frames: list[Any], extra: int) -> None:
        # The socket was empty at _since. Without a step since then the I/O thread was polling, and this
        # request arrived just now; after an (inline) step it may have sat in libzmq's queue for all of it,
        # so its wait counts from _since: over-counted by up to one step, never under-counted.
        arrival = self._since if self._stepped else time.monotonic()
        self.count("received")
        try:
            if extra:
                raise wire.WireError("bad_tensors", f"message of {len(frames) + extra} frames "
                                                    f"(at most {self._max_frames})")
            if not frames:
                raise wire.WireError("bad_header", "message without a header frame")
            header = wire.decode_header(frames[0].buffer, "request")
            if header["kind"] == "info":
                self.count("info")
                self._send(ident, wire.info_reply(header["id"], self.model, self.backend, self.input_specs,
                                                  self.output_specs))
                return
            if header["model"] != self.model:
                raise wire.WireError("wrong_model", f"this server has model {self.model} ({self.backend}); the "
                                                    f"request is for {header['model'][:80]!r}", header["id"])
            arrays = self._in.decode(header, frames[1:])
            job = _Job(ident, header["id"], arrays, arrival, header["timeout_ms"] * 1e-3, frames)
            if not self._scheduler.put(job):
                raise wire.WireError("overloaded", f"queue full ({self._scheduler.per_client} per client, "
                                                   f"{self._scheduler.total} in all)", header["id"])
        except wire.WireError as exc:
            self.count(f"error.{exc.code}")
            self._note(exc.code, exc.message)
            self._send(ident, wire.error_reply(exc.id, exc.code, exc.message, self.model))

    # ------------------------------------------------------------ workers

    def _warm_up(self, engine: Any) -> None:
        # An engine's first step on a thread pays for lazy initialisation (about 35 ms in torch): on its
        # own thread, before start() returns, so that no client's tick pays it.
        try:
            engine.step({s.name: np.zeros(s.shape, s.dtype) for s in self.input_specs})
        except Exception as exc:  # noqa: BLE001 - the first real request reports it too
            self.log(f"WARNING: warm-up step failed: {type(exc).__name__}: {exc}")
        try:
            self._warm.wait(timeout=300.0)
        except threading.BrokenBarrierError:
            pass

    def _serve(self, engine: Any, job: _Job) -> list[Any] | None:
        """The reply frames for ``job``, or None when it expired in the queue."""
        if time.monotonic() - job.arrival > job.timeout_s:
            self.count("expired")   # its client has given up; serving it late would only delay the next
            return None
        start = time.perf_counter()
        try:
            out = engine.step(job.arrays)
            frames = wire.fast_result_reply(job.id, self._model_json, 1e3 * (time.perf_counter() - start),
                                            self._out, out)
        except Exception as exc:  # noqa: BLE001 - one bad step must not stop the server
            self.count("error.engine_error")
            self._note("engine_error", f"{type(exc).__name__}: {exc}")
            return wire.error_reply(job.id, "engine_error", f"{type(exc).__name__}: {exc}", self.model)
        self.count("served")
        return frames

    def _worker(self, engine: Any, wake: Any) -> None:
        self._warm_up(engine)
        while not self._stop.is_set():
            job = self._scheduler.take(timeout=0.1)
            if job is None:
                continue
            try:
                frames = self._serve(engine, job)
                if frames is not None:
                    # Queued before done(): the client's next reply can never overtake this one.
                    self._results.put((job.ident, frames))
                    wake.send(b"", copy=True)
            finally:
                self._scheduler.done(job.ident)
        wake.close(0)
