"""``engine.backend: remote``: each step runs on a policy server (``mm-fusion serve``) over ZeroMQ.

Same interface as the in-process engines, so the Runtime, fusion_node, replay and eval use it
unchanged; the recurrent state still lives in the caller's ``FusionStream`` and travels with each
request. A step that gets no reply within ``engine.remote.timeout_ms``, finds no connection, or is
refused raises: the Runtime turns that into a rest command (the safety filter's non-finite path) and
counts it, and this engine counts it by cause for ``/diagnostics`` ("mm_fusion: engine": round-trip
times, misses, the server's model and backend).

No reconnect logic of our own: the DEALER socket reconnects by itself (every 100 ms at first, backing
off to 1 s), heartbeats find a peer that vanished without closing its connection, and ``IMMEDIATE``
keeps requests from queueing while no connection is up, so a tick during an outage fails at once
instead of waiting out its timeout, and no stale request is delivered when the server comes back.
A reply that arrives after its step gave up is recognised by its id and thrown away.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from ..remote import wire
from ..remote.endpoint import check_endpoint
from .base import Engine

OK, WARN, ERROR = 0, 1, 2
_RING = 4096        # round-trip times kept per diagnostics window


class RemoteError(RuntimeError):
    """A step that did not come back: ``cause`` is timeout, not_connected, refused.<code> or bad_reply."""

    def __init__(self, cause: str, message: str):
        super().__init__(message)
        self.cause = cause


class RemoteEngine(Engine):
    name = "remote"

    def __init__(self, cfg: Any, input_specs: tuple, output_specs: tuple, model: str,
                 log: Callable[[str], None] = print, handshake_s: float = 1.0):
        super().__init__(input_specs, output_specs)
        check_endpoint(cfg.endpoint, cfg.server_key, "engine.remote.endpoint")
        self.cfg, self.model, self.log = cfg, model, log
        self.endpoint = cfg.endpoint
        self.timeout_s = cfg.timeout_ms * 1e-3
        self._busy_poll_s = cfg.busy_poll_ms * 1e-3
        self._in, self._out = wire.Layout(input_specs), wire.Layout(output_specs)
        self._model_json = json.dumps(model)
        self._curve = None
        if cfg.server_key or cfg.client_key:
            from ..remote.keys import load_pair, load_public
            self._curve = (load_public(cfg.server_key), *load_pair(cfg.client_key))
        biggest = max(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in output_specs)
        self._max_frame = max(biggest, wire.MAX_HEADER_BYTES) + wire.FRAME_SLACK
        self._max_frames = 1 + len(output_specs)
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context(1)
        self._sock = self._open()
        self._id = 0
        self._lock = threading.Lock()           # the window below: run() on the control thread, status() elsewhere
        self._rtt = np.empty(_RING)
        self._server = np.empty(_RING)
        self._n = 0
        self._window_misses: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()   # requests, replies, misses.<cause>, late replies
        self.server_info: dict[str, Any] = {}
        self.last_error = ""
        self._failing = False
        try:
            self._handshake(handshake_s)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ socket

    def _open(self) -> Any:
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.immediate = 1
        sock.sndhwm = sock.rcvhwm = 4
        sock.reconnect_ivl, sock.reconnect_ivl_max = 100, 1000
        sock.heartbeat_ivl, sock.heartbeat_timeout, sock.heartbeat_ttl = 500, 1500, 1500
        sock.maxmsgsize = self._max_frame    # a reply frame above every output spec is refused by libzmq unread
        if self._curve is not None:
            sock.curve_serverkey, (sock.curve_publickey, sock.curve_secretkey) = self._curve[0], self._curve[1:]
        sock.connect(self.endpoint)
        return sock

    def _handshake(self, wait_s: float) -> None:
        """Ask the server which model it has; a different one is refused now, not on every tick."""
        deadline = time.monotonic() + wait_s
        while True:
            self._id += 1
            try:
                self._sock.send_multipart(wire.info_request(self._id), flags=self._zmq.NOBLOCK)
                break
            except self._zmq.Again:
                if time.monotonic() >= deadline:
                    self.log(f"remote engine: no connection to the policy server at {self.endpoint} yet "
                             f"(not started, unreachable, or refusing this client's key); ticks rest until it answers")
                    return
                time.sleep(0.01)
        header, _ = self._receive(self._id, max(deadline - time.monotonic(), 0.05))
        if header is None:
            self.log(f"remote engine: the policy server at {self.endpoint} did not answer yet; ticks rest until it does")
            return
        if header["kind"] != "info":
            raise RemoteError("bad_reply", f"policy server at {self.endpoint} answered the handshake with "
                                           f"{header['kind']}: {header.get('message', '')}")
        self.server_info = {"model": header["model"], "backend": header["backend"]}
        if header["model"] != self.model:
            raise RemoteError("refused.wrong_model",
                              f"the policy server at {self.endpoint} has model {header['model']} "
                              f"({header['backend']}), this robot's config and checkpoint give {self.model}: "
                              f"serve the same config and checkpoint")
        theirs = [(s["name"], s["dtype"], tuple(s["shape"])) for s in header["inputs"]]
        ours = [(s.name, np.dtype(s.dtype).name, tuple(s.shape)) for s in self.input_specs]
        if sorted(theirs) != sorted(ours):
            raise RemoteError("refused.bad_tensors", f"the policy server at {self.endpoint} takes {theirs}, "
                                                     f"this engine sends {ours}")
        self.log(f"remote engine: policy server at {self.endpoint} has this model ({header['backend']})"
                 + (", CURVE on" if self._curve else ""))

    def _receive(self, id: int, wait_s: float) -> tuple[dict | None, list[Any]]:
        """The reply to request ``id`` within ``wait_s`` (header, tensor frames); (None, []) on timeout."""
        zmq = self._zmq
        now = time.perf_counter()
        deadline = now + wait_s
        spin_until = min(now + self._busy_poll_s, deadline)
        while True:
            frames = None
            while frames is None and time.perf_counter() < spin_until:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    pass
            if frames is None:
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or not self._sock.poll(max(remaining * 1e3, 0.0), zmq.POLLIN):
                    return None, []
                frames = self._sock.recv_multipart(copy=False)
            if len(frames) > self._max_frames:
                self.counters["bad_reply"] += 1
                continue
            try:
                header = wire.decode_header(frames[0].buffer, "reply")
            except wire.WireError as exc:
                raise RemoteError("bad_reply", f"unreadable reply from {self.endpoint}: {exc}") from None
            if header["id"] != id:
                self.counters["late_replies"] += 1   # a step that already gave up; its tick has rested
                continue
            return header, frames[1:]

    # ------------------------------------------------------------ the step

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        zmq = self._zmq
        self._id += 1
        request = wire.fast_step_request(self._id, self._model_json, self.cfg.timeout_ms, self._in, inputs)
        start = time.perf_counter()
        self.counters["requests"] += 1
        try:
            self._sock.send_multipart(request, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise self._miss("not_connected", f"no connection to the policy server at {self.endpoint} "
                                              f"(not started, unreachable, or refusing this client's key)") from None
        header, frames = self._receive(self._id, self.timeout_s)
        rtt = time.perf_counter() - start
        if header is None:
            raise self._miss("timeout", f"no reply from the policy server at {self.endpoint} within "
                                        f"{self.cfg.timeout_ms:g} ms")
        if header["kind"] == "error":
            raise self._miss(f"refused.{header['code']}", f"the policy server refused the step: "
                                                          f"{header['code']}: {header['message']}")
        if header["kind"] != "result":
            raise self._miss("bad_reply", f"policy server answered a step with {header['kind']}")
        try:
            views = self._out.decode(header, frames)
        except wire.WireError as exc:
            raise self._miss("bad_reply", f"bad reply from {self.endpoint}: {exc}") from None
        # FusionStream keeps new_state and writes into it in place: a read-only frame is copied out.
        out = {name: v if v.flags.writeable else np.array(v) for name, v in views.items()}
        self._hit(rtt, header["server_ms"] * 1e-3)
        return out

    def _hit(self, rtt: float, server_s: float) -> None:
        self.counters["replies"] += 1
        with self._lock:
            i = self._n % _RING
            self._rtt[i], self._server[i] = rtt, server_s
            self._n += 1
        if self._failing:
            self._failing = False
            misses = sum(v for k, v in self.counters.items() if k.startswith("misses."))
            self.log(f"remote engine: the policy server at {self.endpoint} answers again "
                     f"({misses} missed steps so far)")

    def _miss(self, cause: str, message: str) -> RemoteError:
        self.counters[f"misses.{cause}"] += 1
        with self._lock:
            self._window_misses[cause] += 1
        self.last_error = message
        if not self._failing:   # the Runtime logs the failure too, but only the first and every 1000th
            self._failing = True
            self.log(f"remote engine: {message}; ticks rest until the server answers")
        return RemoteError(cause, message)

    # ------------------------------------------------------------ diagnostics

    def status(self) -> tuple[int, str, dict[str, str]]:
        with self._lock:
            n = min(self._n, _RING)
            rtt, server = self._rtt[:n].copy(), self._server[:n].copy()
            self._n = 0
            misses, self._window_misses = self._window_misses, Counter()
        values = {"endpoint": self.endpoint, "curve": str(self._curve is not None),
                  "timeout_ms": f"{self.cfg.timeout_ms:g}", "model": self.model[:16],
                  "server_backend": str(self.server_info.get("backend", "")),
                  "window_replies": str(n), "window_misses": str(sum(misses.values())),
                  "total_requests": str(self.counters["requests"]), "total_replies": str(self.counters["replies"]),
                  "late_replies": str(self.counters["late_replies"])}
        if n:
            values.update({"rtt_p50_ms": f"{1e3 * np.median(rtt):.3f}", "rtt_p99_ms": f"{1e3 * np.quantile(rtt, 0.99):.3f}",
                           "rtt_max_ms": f"{1e3 * rtt.max():.3f}", "server_p50_ms": f"{1e3 * np.median(server):.3f}"})
        values.update({k: str(v) for k, v in sorted(self.counters.items()) if k.startswith("misses.")})
        if self._failing:
            return ERROR, f"remote: {self.last_error}", values
        if misses:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(misses.items()))
            return WARN, f"remote: {sum(misses.values())} missed steps ({detail})", values
        if not n:
            return WARN, f"remote: no step in this window ({self.endpoint})", values
        return OK, f"remote {self.endpoint}: rtt p50 {values['rtt_p50_ms']} ms, p99 {values['rtt_p99_ms']} ms", values

    def describe(self) -> str:
        server = self.server_info.get("backend")
        return (f"remote {self.endpoint} ({'CURVE' if self._curve else 'no CURVE'}, timeout "
                f"{self.cfg.timeout_ms:g} ms" + (f", server: {server})" if server else ")"))

    def close(self) -> None:
        if self._ctx is not None:
            self._sock.close(0)
            self._ctx.term()
            self._ctx = None
