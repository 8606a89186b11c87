"""The remote-inference wire format, version 1: a JSON header, then raw little-endian tensor buffers.

One message is one ZeroMQ multipart message::

    frame 0      header: a UTF-8 JSON object, at most MAX_HEADER_BYTES
    frame 1..n   one frame per entry of header["tensors"], in that order: the array's bytes, C order,
                 little-endian, exactly prod(shape) * itemsize bytes

Header kinds (every key is required, no other key is allowed)::

    request  {"v": 1, "kind": "step", "id": int, "model": str, "timeout_ms": number, "tensors": [spec...]}
    request  {"v": 1, "kind": "info", "id": int}
    reply    {"v": 1, "kind": "result", "id": int, "model": str, "server_ms": number, "tensors": [spec...]}
    reply    {"v": 1, "kind": "info", "id": int, "model": str, "backend": str, "inputs": [spec...],
              "outputs": [spec...]}
    reply    {"v": 1, "kind": "error", "id": int | null, "code": str, "message": str, "model": str}

    spec     {"name": str, "dtype": one of DTYPES, "shape": [int...]}

``model`` is the model fingerprint (``engine.model_fingerprint``: code, config and weights; the
``model_sha256`` that ``mm-fusion export`` writes beside model.onnx). ``timeout_ms`` is the request's
deadline, counted on the server from the moment it read the request (the two hosts share no clock);
a request still queued after it is dropped, not served late. Error codes are ERROR_CODES.

Nothing on the wire is executed or turned into an object other than the plain JSON types and numpy
arrays of the DTYPES below: no pickle, no eval, no class names. Every size is checked against the
header (and, on the server, against the model's tensor specs) before a buffer is touched, and arrays
are views of the received frames (``np.frombuffer``, read-only), not copies.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Sequence

import numpy as np

PROTOCOL = 1

MAX_HEADER_BYTES = 16 * 1024
MAX_TENSORS = 32
MAX_NAME = 64
MAX_DIMS = 8
MAX_MESSAGE = 256           # characters of an error message kept from the wire
ID_MAX = 2**63 - 1
FRAME_SLACK = 1024          # bytes a transport adds to a frame (CURVE: MAC, nonce, command), for size limits

# Fixed-size types only, always little-endian on the wire.
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in
          ("uint8", "int8", "int32", "int64", "float16", "float32", "float64")}

ERROR_CODES = (
    "bad_header",      # not JSON, wrong keys or types, unknown kind
    "bad_version",     # another protocol version
    "bad_tensors",     # frame count or sizes do not match the header, or the header's tensors do not match the model
    "wrong_model",     # the request is for another model fingerprint
    "overloaded",      # this client's (or the server's) queue is full
    "engine_error",    # the engine raised
)


class WireError(ValueError):
    """A message that breaks the format. ``code`` is one of ERROR_CODES; ``id`` the request's, if it was read."""

    def __init__(self, code: str, message: str, id: int | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.id = code, message, id


# ---------------------------------------------------------------- header schema

_SPEC = {"name": str, "dtype": str, "shape": list}
_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("request", "step"): {"v": int, "kind": str, "id": int, "model": str, "timeout_ms": float, "tensors": list},
    ("request", "info"): {"v": int, "kind": str, "id": int},
    ("reply", "result"): {"v": int, "kind": str, "id": int, "model": str, "server_ms": float, "tensors": list},
    ("reply", "info"): {"v": int, "kind": str, "id": int, "model": str, "backend": str, "inputs": list,
                        "outputs": list},
    ("reply", "error"): {"v": int, "kind": str, "id": (int, type(None)), "code": str, "message": str, "model": str},
}


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        raise WireError("bad_header", f"duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")
    return out


def _no_constant(name: str) -> Any:
    raise WireError("bad_header", f"{name} is not allowed in a header")


def _is(value: Any, tp: Any) -> bool:
    types_ = tp if isinstance(tp, tuple) else (tp,)
    if isinstance(value, bool):          # JSON true/false are not numbers here
        return bool in types_
    if float in types_ and isinstance(value, int):
        return True
    return isinstance(value, types_)


def _check_keys(obj: dict, schema: dict[str, Any], what: str, id: int | None) -> None:
    missing = sorted(set(schema) - set(obj))
    extra = sorted(set(obj) - set(schema))
    if missing or extra:
        raise WireError("bad_header", f"{what}: missing keys {missing}, unknown keys {extra}", id)
    for key, tp in schema.items():
        if not _is(obj[key], tp):
            raise WireError("bad_header", f"{what}: {key!r} has the wrong type ({type(obj[key]).__name__})", id)


def parse_spec(obj: Any, what: str, id: int | None = None) -> tuple[str, np.dtype, tuple[int, ...]]:
    """One tensor entry of a header -> (name, dtype, shape), or WireError naming what is wrong."""
    if not isinstance(obj, dict):
        raise WireError("bad_header", f"{what} must be an object", id)
    _check_keys(obj, _SPEC, what, id)
    name, dtype, shape = obj["name"], obj["dtype"], obj["shape"]
    if not 0 < len(name) <= MAX_NAME or not name.isprintable():
        raise WireError("bad_header", f"{what}: name must be 1-{MAX_NAME} printable characters", id)
    if dtype not in DTYPES:
        raise WireError("bad_tensors", f"tensor {name!r}: dtype {dtype[:32]!r} is not one of {sorted(DTYPES)}", id)
    if len(shape) > MAX_DIMS or not all(_is(d, int) and 0 <= d <= 2**31 for d in shape):
        raise WireError("bad_tensors", f"tensor {name!r}: shape must be at most {MAX_DIMS} sizes in [0, 2^31]", id)
    return name, DTYPES[dtype], tuple(shape)


def decode_header(frame: bytes | memoryview, side: str = "request") -> dict:
    """Frame 0 -> the validated header dict. ``side`` is "request" (what a server reads) or "reply"."""
    raw = bytes(frame)
    if not raw:
        raise WireError("bad_header", "empty header frame")
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError("bad_header", f"header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except WireError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError("bad_header", f"not a UTF-8 JSON object: {str(exc)[:120]}") from None
    if not isinstance(obj, dict):
        raise WireError("bad_header", f"header must be a JSON object, got {type(obj).__name__}")
    id = obj.get("id") if _is(obj.get("id"), int) and 0 <= obj.get("id") <= ID_MAX else None
    if obj.get("v") != PROTOCOL or isinstance(obj.get("v"), bool):
        raise WireError("bad_version", f"protocol version {str(obj.get('v'))[:16]!r}; this side speaks {PROTOCOL}", id)
    kind = obj.get("kind")
    schema = _SCHEMAS.get((side, kind)) if isinstance(kind, str) else None
    if schema is None:
        kinds = sorted(k for s, k in _SCHEMAS if s == side)
        raise WireError("bad_header", f"unknown {side} kind {str(kind)[:32]!r}; expected one of {kinds}", id)
    _check_keys(obj, schema, f"{kind} header", id)
    if obj["id"] is not None and not 0 <= obj["id"] <= ID_MAX:
        raise WireError("bad_header", f"id must be in [0, 2^63)", None)
    for key in ("timeout_ms", "server_ms"):
        if key in obj and not (math.isfinite(obj[key]) and obj[key] >= 0):
            raise WireError("bad_header", f"{key} must be a non-negative number", id)
    if "tensors" in obj and len(obj["tensors"]) > MAX_TENSORS:
        raise WireError("bad_tensors", f"{len(obj['tensors'])} tensors (at most {MAX_TENSORS})", id)
    return obj


# ---------------------------------------------------------------- tensors

def spec_json(name: str, dtype: Any, shape: Sequence[int]) -> dict:
    return {"name": name, "dtype": np.dtype(dtype).name, "shape": [int(d) for d in shape]}


def decode_tensors(header: dict, frames: Sequence[Any], expected: Iterable[Any] | None = None) -> dict[str, np.ndarray]:
    """The arrays of a step request or result: read-only views of ``frames`` (the frames after the header).

    ``expected`` (TensorSpecs: name, shape, dtype) makes the header's tensors match them exactly, names
    and all, before any frame is looked at: a server never reads a buffer sized by a client's header alone.
    """
    id = header.get("id")
    entries = [parse_spec(t, f"tensors[{i}]", id) for i, t in enumerate(header["tensors"])]
    names = [name for name, _, _ in entries]
    if len(set(names)) != len(names):
        raise WireError("bad_tensors", f"tensor names repeat: {names}", id)
    if expected is not None:
        want = {s.name: (np.dtype(s.dtype).newbyteorder("<"), tuple(s.shape)) for s in expected}
        missing, extra = sorted(set(want) - set(names)), sorted(set(names) - set(want))
        if missing or extra:
            raise WireError("bad_tensors", f"tensors must be exactly {sorted(want)}; missing {missing}, "
                                           f"unexpected {extra[:8]}", id)
        for name, dtype, shape in entries:
            if (dtype, shape) != want[name]:
                wd, ws = want[name]
                raise WireError("bad_tensors", f"tensor {name!r} is {dtype.name}{list(shape)}, the model takes "
                                               f"{wd.name}{list(ws)}", id)
    if len(frames) != len(entries):
        raise WireError("bad_tensors", f"header lists {len(entries)} tensors, message has {len(frames)} "
                                       f"buffer frames", id)
    out = {}
    for (name, dtype, shape), frame in zip(entries, frames):
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        need = math.prod(shape) * dtype.itemsize
        if buf.nbytes != need:
            raise WireError("bad_tensors", f"tensor {name!r} ({dtype.name}{list(shape)}) needs {need} bytes, "
                                           f"its frame has {buf.nbytes}", id)
        array = np.frombuffer(buf, dtype=dtype).reshape(shape)
        out[name] = array if dtype.isnative else array.astype(dtype.newbyteorder("="))
    return out


class Layout:
    """A fixed list of tensors (an engine's inputs or its outputs), worked out once.

    Client and server exchange the same names, dtypes and shapes every tick: the header's "tensors"
    entries are serialised once here and a received header is compared with them as a whole (a
    C-level list comparison), so the per-tick cost is a few microseconds rather than the
    field-by-field checks ``decode_tensors`` makes, which remain for naming what is wrong.
    """

    def __init__(self, specs: Iterable[Any]):
        self.specs = tuple(specs)
        self.names = [s.name for s in self.specs]
        self.dtypes = [DTYPES[np.dtype(s.dtype).name] for s in self.specs]
        self.shapes = [tuple(int(d) for d in s.shape) for s in self.specs]
        self.nbytes = [math.prod(shape) * dt.itemsize for shape, dt in zip(self.shapes, self.dtypes)]
        self.entries = [spec_json(n, dt, shape) for n, dt, shape in zip(self.names, self.dtypes, self.shapes)]
        self.json = json.dumps(self.entries, separators=(",", ":"))
        self._native = all(dt.isnative for dt in self.dtypes)

    def frames(self, arrays: dict[str, np.ndarray]) -> list[Any]:
        out = []
        for name, dtype, shape in zip(self.names, self.dtypes, self.shapes):
            a = arrays[name]
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == shape and a.flags.c_contiguous):
                a = np.ascontiguousarray(a, dtype=dtype)
                if a.shape != shape:
                    raise WireError("bad_tensors", f"tensor {name!r} has shape {list(a.shape)}, expected {list(shape)}")
            out.append(memoryview(a).cast("B") if a.size else b"")
        return out

    def decode(self, header: dict, frames: Sequence[Any]) -> dict[str, np.ndarray]:
        """Read-only views of ``frames``, which must hold exactly these tensors (WireError naming what differs)."""
        if header["tensors"] != self.entries or not self._native:
            return decode_tensors(header, frames, self.specs)
        if len(frames) != len(self.names):
            raise WireError("bad_tensors", f"header lists {len(self.names)} tensors, message has {len(frames)} "
                                           f"buffer frames", header["id"])
        out = {}
        for name, dtype, shape, need, frame in zip(self.names, self.dtypes, self.shapes, self.nbytes, frames):
            buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            if buf.nbytes != need:
                raise WireError("bad_tensors", f"tensor {name!r} ({dtype.name}{list(shape)}) needs {need} bytes, "
                                               f"its frame has {buf.nbytes}", header["id"])
            out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
        return out


def tensor_frames(arrays: dict[str, np.ndarray], order: Iterable[str] | None = None) -> tuple[list[dict], list[Any]]:
    """(header "tensors" entries, buffer frames) for ``arrays``; little-endian C-order buffers, no copy if
    the arrays already are."""
    specs, frames = [], []
    for name in order if order is not None else arrays:
        a = np.asarray(arrays[name])
        if a.dtype.name not in DTYPES:
            raise WireError("bad_tensors", f"tensor {name!r}: dtype {a.dtype} cannot be sent; allowed {sorted(DTYPES)}")
        a = np.ascontiguousarray(a, dtype=DTYPES[a.dtype.name])
        specs.append(spec_json(name, a.dtype, a.shape))
        frames.append(memoryview(a).cast("B") if a.size else b"")
    return specs, frames


def encode(header: dict, frames: Sequence[Any] = ()) -> list[Any]:
    data = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise WireError("bad_header", f"header of {len(data)} bytes (at most {MAX_HEADER_BYTES})")
    return [data, *frames]


def step_request(id: int, model: str, timeout_ms: float, arrays: dict[str, np.ndarray],
                 order: Iterable[str] | None = None) -> list[Any]:
    specs, frames = tensor_frames(arrays, order)
    return encode({"v": PROTOCOL, "kind": "step", "id": id, "model": model, "timeout_ms": float(timeout_ms),
                   "tensors": specs}, frames)


def fast_step_request(id: int, model_json: str, timeout_ms: float, layout: Layout,
                      arrays: dict[str, np.ndarray]) -> list[Any]:
    """``step_request`` for arrays of ``layout``, the header formatted rather than serialised
    (``model_json``: ``json.dumps(model)``); the same bytes on the wire."""
    header = (f'{{"v":{PROTOCOL},"kind":"step","id":{int(id)},"model":{model_json},'
              f'"timeout_ms":{float(timeout_ms)!r},"tensors":{layout.json}}}')
    return [header.encode(), *layout.frames(arrays)]


def fast_result_reply(id: int, model_json: str, server_ms: float, layout: Layout,
                      arrays: dict[str, np.ndarray]) -> list[Any]:
    header = (f'{{"v":{PROTOCOL},"kind":"result","id":{int(id)},"model":{model_json},'
              f'"server_ms":{float(server_ms)!r},"tensors":{layout.json}}}')
    return [header.encode(), *layout.frames(arrays)]


def info_request(id: int) -> list[Any]:
    return encode({"v": PROTOCOL, "kind": "info", "id": id})


def result_reply(id: int, model: str, server_ms: float, arrays: dict[str, np.ndarray],
                 order: Iterable[str] | None = None) -> list[Any]:
    specs, frames = tensor_frames(arrays, order)
    return encode({"v": PROTOCOL, "kind": "result", "id": id, "model": model, "server_ms": float(server_ms),
                   "tensors": specs}, frames)


def info_reply(id: int, model: str, backend: str, inputs: Iterable[Any], outputs: Iterable[Any]) -> list[Any]:
    return encode({"v": PROTOCOL, "kind": "info", "id": id, "model": model, "backend": backend,
                   "inputs": [spec_json(s.name, s.dtype, s.shape) for s in inputs],
                   "outputs": [spec_json(s.name, s.dtype, s.shape) for s in outputs]})


def error_reply(id: int | None, code: str, message: str, model: str) -> list[Any]:
    assert code in ERROR_CODES, code
    return encode({"v": PROTOCOL, "kind": "error", "id": id, "code": code, "message": message[:MAX_MESSAGE],
                   "model": model})
