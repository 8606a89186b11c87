"""Remote inference over ZeroMQ (issue #13): the wire format, the policy server under bad input, CURVE,
deadlines, the remote engine through the Runtime (parity with the local engine, a server that goes away
and comes back), the ROS-free PolicyClient, and the serve/keys commands. Loopback only."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
import zmq

from mm_fusion_ros import cli
from mm_fusion_ros.client import PolicyClient
from mm_fusion_ros.config import MODALITIES, ConfigError, RobotConfig, config_from_dict, config_to_dict
from mm_fusion_ros.engine import Engine, create_engine, model_fingerprint
from mm_fusion_ros.engine.remote_engine import RemoteEngine, RemoteError
from mm_fusion_ros.remote import wire
from mm_fusion_ros.remote.endpoint import InsecureEndpointError, is_loopback
from mm_fusion_ros.remote.keys import create_keys
from mm_fusion_ros.remote.server import PolicyServer
from mm_fusion_ros.runtime import ERROR, OK, load_model
from mm_fusion_ros.safety import NONFINITE_REASON
from test_runtime import PERIOD, T0, Sensors

ANY_PORT = "tcp://127.0.0.1:*"


def make_config(**remote) -> RobotConfig:
    cfg = RobotConfig()
    cfg = dataclasses.replace(cfg, engine=dataclasses.replace(
        cfg.engine, backend="torch", remote=dataclasses.replace(cfg.engine.remote, **remote)))
    cfg.validate()
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)   # the test machine's two cores are shared by client, server and the suite
    return load_model(make_config())


@pytest.fixture(scope="module")
def fingerprint(model):
    return model_fingerprint(model)


def torch_engine(model) -> Engine:
    return create_engine(make_config(), model, "torch", log=lambda _: None)


class Switchable(Engine):
    """An engine that can be made slow or made to fail, around a real one."""

    name = "switchable"

    def __init__(self, inner: Engine):
        super().__init__(inner.input_specs, inner.output_specs)
        self.inner, self.delay_s, self.fail = inner, 0.0, False

    def run(self, inputs):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("device lost")
        return self.inner.run(inputs)


def inputs_for(engine: Engine, seed: int) -> dict[str, np.ndarray]:
    """Valid inputs for any set of specs: derived from the specs, so a new modality needs no change here."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in engine.input_specs:
        if np.dtype(s.dtype) == np.uint8:
            out[s.name] = rng.integers(0, 256, s.shape, dtype=np.uint8)
        else:
            out[s.name] = rng.uniform(0.0, 1.0, s.shape).astype(s.dtype)
    out["dt"][:] = 0.01
    return out


def remote_engine(endpoint: str, fingerprint: str, engine: Engine, logs: list | None = None, **remote) -> RemoteEngine:
    cfg = dataclasses.replace(RobotConfig().engine.remote, endpoint=endpoint, **{"timeout_ms": 2000.0, **remote})
    return RemoteEngine(cfg, engine.input_specs, engine.output_specs, fingerprint,
                        log=(logs.append if logs is not None else lambda _: None))


class RawClient:
    """A DEALER socket speaking the wire format by hand (or not at all)."""

    def __init__(self, ctx, endpoint: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, frames):
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float = 5.0):
        if not self.sock.poll(timeout_s * 1e3):
            return None
        frames = self.sock.recv_multipart(copy=False)
        header = wire.decode_header(frames[0].buffer, "reply")
        arrays = wire.decode_tensors(header, frames[1:]) if header["kind"] == "result" else {}
        return header, arrays


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# ---------------------------------------------------------------- the wire format

def test_wire_round_trip_is_zero_copy_and_the_fast_path_writes_the_same_bytes(model):
    engine = torch_engine(model)
    x = inputs_for(engine, 0)
    layout = wire.Layout(engine.input_specs)
    fast = wire.fast_step_request(7, json.dumps("ab" * 32), 4.5, layout, x)
    slow = wire.step_request(7, "ab" * 32, 4.5, x, layout.names)
    assert bytes(fast[0]) == bytes(slow[0])
    frames = [zmq.Frame(bytes(f)) for f in fast]
    header = wire.decode_header(frames[0].buffer)
    assert (header["kind"], header["id"], header["timeout_ms"]) == ("step", 7, 4.5)
    got = layout.decode(header, frames[1:])
    for name, value in x.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value)
        # A view of the received frame, not a copy.
        assert np.shares_memory(np.frombuffer(frames[1 + layout.names.index(name)].buffer, np.uint8), got[name])


@pytest.mark.parametrize("raw, code", [
    (b"", "bad_header"),
    (b"\xff\xfe not utf8", "bad_header"),
    (b"[1, 2]", "bad_header"),
    (b'{"v": 1, "kind": "info", "id": 1, "id": 2}', "bad_header"),           # duplicate key
    (b'{"v": 1, "kind": "info", "id": NaN}', "bad_header"),
    (b'{"v": 1, "kind": "info", "id": true}', "bad_header"),                  # a bool is not an id
    (b'{"v": 1, "kind": "info", "id": 1, "extra": 0}', "bad_header"),
    (b'{"v": 1, "kind": "info"}', "bad_header"),
    (b'{"v": 1, "kind": "__import__", "id": 1}', "bad_header"),
    (b'{"v": 2, "kind": "info", "id": 1}', "bad_version"),
    (b'{"v": 1, "kind": "info", "id": -1}', "bad_header"),
    (b"[" * 5000 + b"]" * 5000, "bad_header"),                                 # deep nesting
    (b'{"v": 1, "kind": "info", "id": 1, "pad": "' + b"x" * wire.MAX_HEADER_BYTES + b'"}', "bad_header"),
])
def test_bad_headers_are_refused_with_a_code(raw, code):
    with pytest.raises(wire.WireError) as info:
        wire.decode_header(raw)
    assert info.value.code == code


def test_tensor_headers_must_match_the_model_and_their_frames(model):
    engine = torch_engine(model)
    x = inputs_for(engine, 1)
    layout = wire.Layout(engine.input_specs)
    first = layout.names[0]

    def refused(header_edit=None, frames_edit=None) -> str:
        frames = wire.step_request(1, "m", 5.0, x, layout.names)
        header = json.loads(bytes(frames[0]))
        if header_edit:
            header_edit(header)
        buffers = [bytes(f) for f in frames[1:]]
        if frames_edit:
            buffers = frames_edit(buffers)
        with pytest.raises(wire.WireError) as info:
            layout.decode(wire.decode_header(json.dumps(header).encode()), buffers)
        return f"{info.value.code}: {info.value.message}"

    def set_spec(i, key, value):
        return lambda h: h["tensors"][i].__setitem__(key, value)

    assert "float64" in refused(set_spec(1, "dtype", "float64")) and layout.names[1] in refused(set_spec(1, "dtype", "float64"))
    assert "object" in refused(set_spec(0, "dtype", "object"))             # not a wire dtype at all
    assert "the model takes" in refused(set_spec(0, "shape", [1, 2, 3]))
    assert "missing" in refused(lambda h: h["tensors"].pop())
    assert "unexpected ['bogus']" in refused(set_spec(0, "name", "bogus"))
    assert "buffer frames" in refused(frames_edit=lambda b: b[:-1])       # a frame short
    assert f"tensor '{first}'" in refused(frames_edit=lambda b: [b[0][:-1], *b[1:]])   # truncated buffer
    assert f"tensor '{first}'" in refused(frames_edit=lambda b: [b[0] + b"x" * 10, *b[1:]])


def test_loopback_is_told_from_network_addresses():
    assert all(map(is_loopback, ["tcp://127.0.0.1:5555", "tcp://127.3.2.1:1", "tcp://localhost:5555",
                                 "tcp://[::1]:5555", "ipc:///tmp/x.sock", "inproc://x", "tcp://127.0.0.1:*"]))
    assert not any(map(is_loopback, ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.10:5555",
                                     "tcp://gpu-box.local:5555", "tcp://eth0:5555", "tcp://[::]:5555",
                                     "tcp://10.0.0.1;127.0.0.1:5555"]))


# ---------------------------------------------------------------- the server

@pytest.mark.parametrize("bind", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://192.168.1.10:5555",
                                  "tcp://gpu-box.local:5555"])
def test_server_refuses_a_network_address_without_keys(model, fingerprint, bind):
    with pytest.raises(InsecureEndpointError, match="not a loopback address"):
        PolicyServer([torch_engine(model)], fingerprint, bind)   # refused before any socket exists
    assert cli.main(["serve", "--bind", bind]) == 2


def test_garbage_from_several_clients_gets_errors_while_every_valid_request_is_served(model, fingerprint, zctx):
    engine = torch_engine(model)
    reference = torch_engine(model)
    with PolicyServer([engine], fingerprint, ANY_PORT, log=lambda _: None) as server:
        good = [RawClient(zctx, server.endpoint) for _ in range(3)]
        bad = [RawClient(zctx, server.endpoint) for _ in range(2)]
        x = inputs_for(engine, 2)
        layout = wire.Layout(engine.input_specs)
        valid = wire.step_request(0, fingerprint, 5000.0, x, layout.names)
        wrong_dtype = json.loads(bytes(valid[0]))
        wrong_dtype["tensors"][1]["dtype"] = "float64"
        rng = np.random.default_rng(0)
        garbage = [
            ([rng.bytes(200)], "bad_header"),
            ([bytes(valid[0])[:40]], "bad_header"),                                   # truncated header
            ([json.dumps(wrong_dtype).encode(), *valid[1:]], "bad_tensors"),
            ([bytes(valid[0]), *valid[1:-1]], "bad_tensors"),                          # a frame missing
            ([bytes(valid[0]), bytes(valid[1]) + b"\0" * 1000, *valid[2:]], "bad_tensors"),   # oversize frame
            ([bytes(valid[0])] + [b""] * 200, "bad_tensors"),                          # too many frames
            (wire.step_request(0, "not-this-model", 5000.0, x, layout.names), "wrong_model"),
        ]
        expected: dict[int, tuple[int, dict]] = {}
        codes: list[str] = []
        for round_ in range(6):
            for c, client in enumerate(good):
                seed = 10 * round_ + c
                xi = inputs_for(engine, seed)
                rid = 1000 * c + round_
                expected[rid] = (c, reference.step(xi))
                client.send(wire.step_request(rid, fingerprint, 5000.0, xi, layout.names))
            for frames, code in garbage:
                bad[round_ % 2].send(frames)
                codes.append(code)
        for _ in range(1000):
            bad[0].send([b""])
        got_codes = []
        for client in bad:
            while (reply := client.recv(timeout_s=2.0)) is not None:
                assert reply[0]["kind"] == "error" and reply[0]["model"] == fingerprint
                got_codes.append(reply[0]["code"])
        # Each got an error reply, or (a client that sends 1000 without reading) lost it, counted.
        assert not Counter(got_codes) - Counter(codes + ["bad_header"] * 1000)
        assert len(got_codes) + server.snapshot().get("reply_dropped_full", 0) == len(codes) + 1000
        assert Counter(codes) <= Counter(got_codes)   # the interleaved ones were all answered
        for c, client in enumerate(good):
            for _ in range(6):
                header, arrays = client.recv()
                assert header["kind"] == "result", header
                owner, want = expected.pop(header["id"])
                assert owner == c
                for name, value in want.items():
                    assert np.array_equal(arrays[name], value), name
        assert not expected
        stats = server.snapshot()
        assert stats["served"] == 18 and stats["error.bad_header"] == 1000 + 12
        assert stats["error.wrong_model"] == 6


def test_a_frame_above_the_size_limit_disconnects_that_client_only(model, fingerprint, zctx):
    engine = torch_engine(model)
    with PolicyServer([engine], fingerprint, ANY_PORT, log=lambda _: None) as server:
        hog, fine = RawClient(zctx, server.endpoint), RawClient(zctx, server.endpoint)
        hog.send([b"x" * (64 * 1024 * 1024)])     # libzmq drops the peer on the size prefix, before allocating
        layout = wire.Layout(engine.input_specs)
        fine.send(wire.step_request(5, fingerprint, 5000.0, inputs_for(engine, 3), layout.names))
        header, _ = fine.recv()
        assert header["kind"] == "result" and header["id"] == 5
        assert hog.recv(timeout_s=0.5) is None
        assert server.snapshot()["received"] == 1


def test_requests_older_than_their_deadline_are_dropped_not_served_late(model, fingerprint, zctx):
    slow = Switchable(torch_engine(model))
    with PolicyServer([slow], fingerprint, ANY_PORT, log=lambda _: None, queue_per_client=8) as server:
        slow.delay_s = 0.1
        client = RawClient(zctx, server.endpoint)
        layout = wire.Layout(slow.input_specs)
        x = inputs_for(slow, 4)
        for rid in range(5):   # all at once: the first is served, the rest wait behind it past 30 ms
            client.send(wire.step_request(rid, fingerprint, 30.0, x, layout.names))
        replies = []
        while (reply := client.recv(timeout_s=1.0)) is not None:
            replies.append(reply[0]["id"])
        assert replies == [0]
        assert server.snapshot()["expired"] == 4 and server.snapshot()["served"] == 1


@pytest.mark.parametrize("busy_poll_ms", [0.0, 20.0])   # sleeping in poll, or spinning first for 20 of the 50 ms
def test_remote_engine_times_out_counts_the_miss_and_drops_the_late_reply(model, fingerprint, busy_poll_ms):
    slow = Switchable(torch_engine(model))
    with PolicyServer([slow], fingerprint, ANY_PORT, log=lambda _: None) as server:
        logs: list[str] = []
        engine = remote_engine(server.endpoint, fingerprint, slow, logs, timeout_ms=50.0, busy_poll_ms=busy_poll_ms)
        x = inputs_for(slow, 5)
        assert engine.step(x)["action"].shape == slow.output_specs[0].shape
        slow.delay_s = 0.3
        with pytest.raises(RemoteError, match="within 50 ms") as info:
            engine.step(x)
        assert info.value.cause == "timeout"
        slow.delay_s = 0.0
        time.sleep(0.4)   # the late reply arrives meanwhile
        out = engine.step(x)
        assert np.array_equal(out["action"], slow.step(x)["action"])
        assert engine.counters["late_replies"] == 1 and engine.counters["misses.timeout"] == 1
        level, message, values = engine.status()
        assert level == 1 and "1 missed steps (timeout 1)" in message and values["misses.timeout"] == "1"
        assert any("within 50 ms" in line for line in logs) and any("answers again" in line for line in logs)
        slow.fail = True
        with pytest.raises(RemoteError, match="device lost") as info:
            engine.step(x)
        assert info.value.cause == "refused.engine_error"
        engine.close()


def test_a_server_with_another_model_is_refused_at_the_handshake_naming_both(model, fingerprint):
    engine = torch_engine(model)
    with PolicyServer([engine], fingerprint, ANY_PORT, log=lambda _: None) as server:
        with pytest.raises(RemoteError, match=f"has model {fingerprint}.*give {'0' * 64}"):
            remote_engine(server.endpoint, "0" * 64, engine)


# ---------------------------------------------------------------- CURVE

def test_curve_wrong_key_gets_nothing_and_a_revoked_key_is_refused_by_name(model, fingerprint, tmp_path, zctx):
    keys = tmp_path / "keys"
    create_keys(keys, ["arm1", "arm2"])
    engine = torch_engine(model)
    logs: list[str] = []
    x = inputs_for(engine, 6)
    with PolicyServer([engine], fingerprint, ANY_PORT, keys=keys, log=logs.append) as server:
        curve = {"server_key": str(keys / "server.key")}
        arm1 = remote_engine(server.endpoint, fingerprint, engine, client_key=str(keys / "clients/arm1.key_secret"),
                             **curve)
        arm2 = remote_engine(server.endpoint, fingerprint, engine, client_key=str(keys / "clients/arm2.key_secret"),
                             **curve)
        assert np.array_equal(arm1.step(x)["action"], engine.step(x)["action"])
        assert arm2.step(x)["action"].shape == engine.output_specs[0].shape

        # A key pair the server never allowed, and a plain client without CURVE: no reply either way.
        stranger = tmp_path / "stranger"
        create_keys(stranger, ["intruder"])
        intruder = remote_engine(server.endpoint, fingerprint, engine, timeout_ms=200.0, **curve,
                                 client_key=str(stranger / "clients/intruder.key_secret"))
        with pytest.raises(RemoteError) as info:
            intruder.step(x)
        assert info.value.cause == "not_connected"
        plain = RawClient(zctx, server.endpoint)
        plain.send(wire.info_request(1))
        assert plain.recv(timeout_s=0.5) is None
        assert wait_until(lambda: any("refused CURVE client: unknown key" in line for line in logs))

        # Revoked while connected: the server makes every client handshake again, and arm2's is refused.
        (keys / "allowed" / "arm2.key").unlink()
        assert wait_until(lambda: any("refused CURVE client: revoked key 'arm2'" in line for line in logs))
        arm2_public = (keys / "clients/arm2.key_secret").read_text().split('public-key = "')[1].split('"')[0]
        assert any(arm2_public in line for line in logs if "revoked key 'arm2'" in line)
        with pytest.raises(RemoteError):
            arm2.step(x)
        assert wait_until(lambda: _steps(arm1, x))   # the allowed client is back after its reconnect
        assert server.snapshot()["rebinds"] == 1
        for e in (arm1, arm2, intruder):
            e.close()


def _steps(engine: RemoteEngine, x) -> bool:
    try:
        engine.step(x)
        return True
    except RemoteError:
        return False


def test_keys_command_writes_pairs_and_never_overwrites(tmp_path):
    keys = tmp_path / "k"
    assert cli.main(["keys", str(keys), "--client", "arm1"]) == 0
    server_key = (keys / "server.key").read_bytes()
    assert (keys / "allowed/arm1.key").is_file() and not (keys / "clients/arm1.key").exists()
    assert os.stat(keys / "server.key_secret").st_mode & 0o077 == 0
    assert os.stat(keys / "clients/arm1.key_secret").st_mode & 0o077 == 0
    assert cli.main(["keys", str(keys), "--client", "arm1"]) == 2          # would lock out arm1
    assert cli.main(["keys", str(keys), "--client", "arm2"]) == 0
    assert (keys / "server.key").read_bytes() == server_key and (keys / "allowed/arm2.key").is_file()


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("remote, key", [
    ({"endpoint": "tcp://10.0.0.5:5555"}, "engine.remote.endpoint"),
    ({"endpoint": "http://127.0.0.1:5555"}, "engine.remote.endpoint"),
    ({"timeout_ms": 0.0}, "engine.remote.timeout_ms"),
    ({"busy_poll_ms": 6.0}, "engine.remote.busy_poll_ms"),     # longer than the 5 ms deadline
    ({"busy_poll_ms": -1.0}, "engine.remote.busy_poll_ms"),
    ({"server_key": "keys/server.key"}, "engine.remote.server_key"),
])
def test_remote_config_is_validated_naming_the_key(remote, key):
    params = config_to_dict(RobotConfig())
    params["engine"]["remote"].update(remote)
    with pytest.raises(ConfigError, match=key):
        config_from_dict(params)


def test_a_network_endpoint_is_accepted_with_keys():
    params = config_to_dict(RobotConfig())
    params["engine"].update(backend="remote")
    params["engine"]["remote"].update(endpoint="tcp://10.0.0.5:5555", server_key="s.key", client_key="c.key_secret")
    assert config_from_dict(params).engine.remote.endpoint == "tcp://10.0.0.5:5555"


# ---------------------------------------------------------------- through the Runtime

class Tee:
    """What test_runtime.Sensors needs of a runtime (cfg, add), feeding the same samples to several clients."""

    def __init__(self, *clients: PolicyClient):
        self.clients = clients
        self.cfg = clients[0].cfg

    def add(self, sample, now: float) -> bool:
        return all([c.add(sample, now) for c in self.clients])


def test_remote_and_local_give_identical_outputs_over_200_ticks_with_modalities_dropping(model, fingerprint):
    with PolicyServer([torch_engine(model)], fingerprint, ANY_PORT, log=lambda _: None) as server:
        local = PolicyClient(make_config(), engine=torch_engine(model), log=lambda _: None)
        remote = PolicyClient(make_config(), endpoint=server.endpoint, timeout_ms=5000.0, log=lambda _: None)
        assert remote.runtime.engine.name == "remote"
        for c in (local, remote):
            c.enable()
        sensors = Sensors(Tee(local, remote), T0 - 1.1)
        masks = []
        for i in range(200):
            # Camera out for ticks 40-79, audio for 110-149 (the audio frame cache resyncs when it returns).
            sensors.stopped = ({"camera"} if 40 <= i < 80 else set()) | ({"audio"} if 110 <= i < 150 else set())
            t = T0 + i * PERIOD
            sensors.until(t)
            a, b = local.step(t), remote.step(t)
            ra, rb = local.last, remote.last
            assert not a.failed and not b.failed
            assert np.array_equal(a.values, b.values) and a.commanded == b.commanded and a.reasons == b.reasons
            for field in ("raw_action", "fused_state", "attention", "contribution", "mask"):
                assert np.array_equal(getattr(ra, field), getattr(rb, field)), (i, field)
            masks.append(rb.mask.copy())
        assert np.array_equal(local.runtime.stream.state, remote.runtime.stream.state)
        masks = np.array(masks)
        cam, audio = MODALITIES.index("camera"), MODALITIES.index("audio")
        assert masks[:40, cam].all() and not masks[55:80, cam].any() and masks[90:, cam].all()
        assert not masks[125:150, audio].any() and masks[160:, audio].all()
        assert remote.runtime.stream.counters["audio_frame_resyncs"] >= 2
        statuses = {s.name: s for s in remote.status()}
        engine = statuses["mm_fusion: engine"]
        assert engine.level == OK and engine.values["window_replies"] == "200" and engine.values["window_misses"] == "0"
        assert float(engine.values["rtt_p50_ms"]) > 0
        local.close()
        remote.close()


def test_a_server_that_goes_away_costs_rest_ticks_and_the_runtime_resumes_when_it_is_back(model, fingerprint):
    engine = torch_engine(model)
    server = PolicyServer([engine], fingerprint, ANY_PORT, log=lambda _: None).start()
    endpoint = server.endpoint
    logs: list[str] = []
    client = PolicyClient(make_config(), endpoint=endpoint, timeout_ms=500.0, log=logs.append)
    client.enable()
    sensors = Sensors(Tee(client), T0 - 1.1)
    i = 0

    def tick():
        nonlocal i
        t = T0 + i * PERIOD
        i += 1
        sensors.until(t)
        return client.step(t)

    try:
        for _ in range(20):
            tick()
            assert np.isfinite(client.last.raw_action).all()
        server.stop()
        down = tick()                          # the very next tick rests
        assert NONFINITE_REASON in down.reasons and np.array_equal(down.values, client.runtime.safety.rest_command)
        assert not np.isfinite(client.last.raw_action).any()
        for _ in range(5):
            assert NONFINITE_REASON in tick().reasons
        statuses = {s.name: s for s in client.status()}
        assert statuses["mm_fusion: engine"].level == ERROR and "policy server" in statuses["mm_fusion: engine"].message
        assert statuses["mm_fusion: safety"].level == ERROR
        assert client.runtime.counters["infer_errors"] == 6
        server = PolicyServer([engine], fingerprint, endpoint, log=lambda _: None).start()
        assert wait_until(lambda: NONFINITE_REASON not in tick().reasons, timeout=10.0)
        assert np.isfinite(client.last.raw_action).all()
        assert any("answers again" in line for line in logs)
        assert {s.name: s for s in client.status()}["mm_fusion: engine"].level != ERROR
    finally:
        server.stop()
        client.close()


def test_several_clients_share_one_server_each_served_in_order(model, fingerprint):
    engine = torch_engine(model)
    reference, lock = torch_engine(model), threading.Lock()
    errors: list[str] = []
    with PolicyServer([engine, torch_engine(model)], fingerprint, ANY_PORT, log=lambda _: None) as server:

        def client(seed: int):
            try:
                remote = remote_engine(server.endpoint, fingerprint, engine)
                for k in range(15):
                    x = inputs_for(engine, 100 * seed + k)
                    with lock:
                        want = reference.step(x)
                    if not np.array_equal(remote.step(x)["new_state"], want["new_state"]):
                        errors.append(f"client {seed} step {k} differs")
                remote.close()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(repr(exc))

        threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert server.snapshot()["served"] == 60
