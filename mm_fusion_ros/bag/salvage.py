"""Reading what can still be read from a damaged MCAP file.

A recorder killed mid-run leaves an MCAP without its summary and footer, and a
bad disk or copy leaves chunks whose records do not parse; rosbags refuses both
outright. This walks the file record by record (MCAP's framing is ``op: u8,
length: u64, body``), keeps every schema, channel and message that parses, and
stops at the first record that runs past the end of the file. Chunks are
validated one by one: a chunk whose checksum fails is skipped whole; one whose
inner records stop parsing keeps the messages before the damage.

Memory is bounded by one chunk. Messages are yielded chunk by chunk, each chunk
sorted by log time, which is the bag's receive-time order for every rosbag2
writer (they write in arrival order).
"""

from __future__ import annotations

import mmap
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

MAGIC = b"\x89MCAP0\r\n"
OP_SCHEMA, OP_CHANNEL, OP_MESSAGE, OP_CHUNK, OP_FOOTER, OP_DATA_END = 0x03, 0x04, 0x05, 0x06, 0x02, 0x0F
KNOWN_OPS = set(range(0x01, 0x10))


def _decompressors() -> dict:
    out = {"": lambda data, size: bytes(data)}
    try:
        import lz4.frame
        out["lz4"] = lambda data, size: lz4.frame.decompress(bytes(data))
    except ImportError:  # pragma: no cover - rosbags depends on lz4
        pass
    try:
        from backports import zstd  # what rosbags uses before Python 3.14
    except ImportError:  # pragma: no cover
        try:
            from compression import zstd  # type: ignore[no-redef]
        except ImportError:
            zstd = None
    if zstd is not None:
        out["zstd"] = lambda data, size: zstd.decompress(bytes(data))
    return out


DECOMPRESSORS = _decompressors()


class SalvageError(ValueError):
    """The file is not an MCAP file at all."""


@dataclass(frozen=True)
class SalvagedChannel:
    id: int
    topic: str
    msgtype: str
    msgdef_encoding: str   # "ros2msg", "ros2idl" or "" when the file carries no definition
    msgdef: str


@dataclass
class SalvageScan:
    """What one pass found: channels, message counts and the damage, in words."""

    channels: dict[int, SalvagedChannel] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)
    start_ns: int | None = None
    end_ns: int | None = None
    problems: list[str] = field(default_factory=list)


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: memoryview, pos: int = 0, end: int | None = None):
        self.buf, self.pos, self.end = buf, pos, len(buf) if end is None else end

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.end:
            raise ValueError(f"needs {n} bytes at offset {self.pos}, only {self.end - self.pos} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return bytes(self.take(self.u32())).decode("utf-8")


def _records(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, memoryview]]:
    """(offset, op, body) for each whole record; raises ValueError at the first one that is not."""
    while pos < end:
        if end - pos < 9:
            raise ValueError(f"{end - pos} stray bytes at offset {pos}")
        op = buf[pos]
        if op not in KNOWN_OPS:
            raise ValueError(f"unknown record type 0x{op:02x} at offset {pos}")
        (length,) = struct.unpack_from("<Q", buf, pos + 1)
        if pos + 9 + length > end:
            problem = f"record 0x{op:02x} at offset {pos} needs {length} bytes, only {end - pos - 9} left"
            if op == OP_CHUNK:  # a cut chunk may still hold whole messages before the cut
                yield pos, op, buf[pos + 9:end]
            raise ValueError(problem)
        yield pos, op, buf[pos + 9:pos + 9 + length]
        pos += 9 + length


class McapSalvage:
    """``scan()`` once for channels and counts, then ``messages()`` for (channel, log_time_ns, data)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self.path.open("rb")
        size = self.path.stat().st_size
        if size < len(MAGIC) or self._file.read(len(MAGIC)) != MAGIC:
            self._file.close()
            raise SalvageError(f"{self.path} is not an MCAP file (no MCAP magic at its start)")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._buf = memoryview(self._map)
        self._schemas: dict[int, tuple[str, str, str]] = {}
        self.result = SalvageScan()

    def close(self) -> None:
        self._buf.release()
        self._map.close()
        self._file.close()

    # ------------------------------------------------------------ records

    def _record(self, op: int, body: memoryview, with_data: bool) -> tuple[int, int, bytes] | None:
        """A schema or channel is registered; a message is returned; other records are skipped.
        The same in a chunk as at the top level of the file."""
        if op == OP_SCHEMA:
            self._schema(body)
        elif op == OP_CHANNEL:
            self._channel(body)
        elif op == OP_MESSAGE:
            return self._message(body, with_data)
        return None

    def _schema(self, body: memoryview) -> None:
        cur = _Cursor(body)
        sid = cur.u16()
        name, encoding = cur.string(), cur.string()
        data = bytes(cur.take(cur.u32())).decode("utf-8", errors="replace")
        self._schemas.setdefault(sid, (name, encoding, data))

    def _channel(self, body: memoryview) -> None:
        cur = _Cursor(body)
        cid, sid = cur.u16(), cur.u16()
        topic = cur.string()
        cur.string()  # message encoding: cdr for every ROS 2 bag
        if cid in self.result.channels or sid not in self._schemas:
            return
        name, encoding, data = self._schemas[sid]
        self.result.channels[cid] = SalvagedChannel(cid, topic, name, encoding, data)

    def _chunk_records(self, offset: int, body: memoryview, problems: list[str]) -> memoryview | None:
        cur = _Cursor(body)
        cur.u64(), cur.u64()
        size, crc = cur.u64(), cur.u32()
        compression = cur.string()
        length = cur.u64()
        if cur.end - cur.pos < length:
            if compression:
                problems.append(f"chunk at byte {offset}: cut short; a compressed chunk cannot be read in part")
                return None
            return cur.buf[cur.pos:cur.end]   # uncompressed and cut: its records up to the cut
        data = cur.take(length)
        if compression not in DECOMPRESSORS:
            problems.append(f"chunk at byte {offset}: unsupported compression {compression!r}; skipped")
            return None
        try:
            raw = DECOMPRESSORS[compression](data, size)
        except Exception as exc:  # noqa: BLE001 - any codec failure means the chunk is damaged
            problems.append(f"chunk at byte {offset}: does not decompress ({exc}); skipped")
            return None
        if len(raw) != size or (crc and zlib.crc32(raw) != crc):
            problems.append(f"chunk at byte {offset}: checksum or size mismatch; skipped")
            return None
        return memoryview(raw)

    def _walk(self, with_messages: bool) -> Iterator[list[tuple[int, int, bytes]]]:
        """Yield each chunk's (or loose run's) messages, sorted by log time; record damage in ``result``."""
        buf, problems = self._buf, []
        end = len(buf)
        loose: list[tuple[int, int, bytes]] = []
        try:
            for offset, op, body in _records(buf, len(MAGIC), end):
                if op in (OP_FOOTER, OP_DATA_END):
                    break
                if op in (OP_SCHEMA, OP_CHANNEL, OP_MESSAGE):
                    message = self._record(op, body, with_messages)
                    if message is not None:
                        loose.append(message)
                elif op == OP_CHUNK:
                    try:
                        inner = self._chunk_records(offset, body, problems)
                    except ValueError as exc:
                        problems.append(f"chunk at byte {offset}: header does not parse ({exc}); skipped")
                        continue
                    if inner is None:
                        continue
                    msgs: list[tuple[int, int, bytes]] = []
                    try:
                        for _, iop, ibody in _records(inner, 0, len(inner)):
                            message = self._record(iop, ibody, with_messages)
                            if message is not None:
                                msgs.append(message)
                    except (ValueError, struct.error, UnicodeDecodeError) as exc:
                        problems.append(f"chunk at byte {offset}: damaged ({exc}); kept the {len(msgs)} "
                                        "message(s) before the damage")
                    if msgs:
                        yield sorted(msgs, key=lambda m: m[1])
        except ValueError as exc:
            problems.append(f"file damaged or truncated: {exc}; read up to there")
        if loose:
            yield sorted(loose, key=lambda m: m[1])
        for p in problems:
            if p not in self.result.problems:
                self.result.problems.append(p)

    @staticmethod
    def _message(body: memoryview, with_data: bool) -> tuple[int, int, bytes]:
        if len(body) < 22:
            raise ValueError(f"message record of {len(body)} bytes is shorter than its header")
        cid, _seq, log_time, _pub = struct.unpack_from("<HIQQ", body, 0)
        return cid, log_time, bytes(body[22:]) if with_data else b""

    # ------------------------------------------------------------ public

    def scan(self) -> SalvageScan:
        r = self.result
        for msgs in self._walk(with_messages=False):
            for cid, t, _ in msgs:
                r.counts[cid] = r.counts.get(cid, 0) + 1
                r.start_ns = t if r.start_ns is None else min(r.start_ns, t)
                r.end_ns = t if r.end_ns is None else max(r.end_ns, t)
        return r

    def messages(self) -> Iterator[tuple[SalvagedChannel, int, bytes]]:
        for msgs in self._walk(with_messages=True):
            for cid, t, data in msgs:
                channel = self.result.channels.get(cid)
                if channel is not None:
                    yield channel, t, data
