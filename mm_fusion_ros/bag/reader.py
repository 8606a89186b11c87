"""Reading rosbag2 bags in receive-time order, keeping what can be read.

``BagReader(path)`` takes a bag folder (``metadata.yaml`` + storage files), a
folder whose recording was interrupted before ``metadata.yaml`` was written, or
a single ``.mcap`` / ``.db3`` file. Anything else is refused with a
``BagError`` that names the path and what was expected.

What goes wrong in real bags, and what happens:

- a truncated or damaged MCAP file: read record by record (``salvage``), the
  damage described in ``problems``; also when the damage shows up mid-read;
- a damaged SQLite file: the messages before the damage, the error in ``problems``;
- a topic whose type is in neither the pinned distribution, audio_common_msgs,
  nor the bag's own definitions: listed in ``unknown_types``, its messages skipped;
- a message whose bytes do not deserialize: ``decode`` raises ``DecodeError``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rosbags.interfaces import MessageDefinitionFormat
from rosbags.rosbag2 import Reader
from rosbags.typesys import get_types_from_idl, get_types_from_msg
from rosbags.typesys.store import Typestore

from .salvage import McapSalvage, SalvageError
from .typestore import DEFAULT_DISTRO, audio_flavour_for, make_typestore, typestore_with

STORAGE_SUFFIXES = {".mcap": "mcap", ".db3": "sqlite3"}


class BagError(ValueError):
    """The path is not a readable rosbag2 bag."""


class DecodeError(ValueError):
    """One message's bytes do not match its type."""


@dataclass(frozen=True)
class TopicInfo:
    name: str
    msgtype: str
    count: int


@dataclass(frozen=True)
class BagMessage:
    topic: str
    msgtype: str
    t_ns: int          # bag timestamp: when the recorder received it
    data: bytes        # CDR, with its 4-byte encapsulation header


@dataclass(frozen=True)
class _Source:
    """One storage, read either by rosbags or, when damaged, by the salvage walker."""

    path: Path
    storage: str
    reader: Reader | None
    salvage: McapSalvage | None


def _definitions(msgtype: str, fmt: object, text: str) -> dict:
    """Field definitions a bag carries for ``msgtype`` (and the types it uses)."""
    if not text:
        return {}
    if fmt in (MessageDefinitionFormat.MSG, "ros2msg"):
        return get_types_from_msg(text, msgtype)
    sep = "=" * 80 + "\n"
    types: dict = {}
    if text.startswith(f"{sep}IDL: "):
        for part in text.split(sep)[1:]:
            _hdr, idl = part.split("\n", 1)
            types.update(get_types_from_idl(idl))
    else:
        types.update(get_types_from_idl(text))
    return types


class BagReader:
    def __init__(self, path: str | Path, distro: str = DEFAULT_DISTRO, audio: str = "auto",
                 log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self.problems: list[str] = []
        self.unknown_types: dict[str, str] = {}
        self._sources: list[_Source] = []
        try:
            self._open_sources()
            self._load_connections(distro, audio)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ opening

    def _problem(self, text: str) -> None:
        self.problems.append(text)
        self.log(f"bag {self.path}: {text}")

    def _open_sources(self) -> None:
        path = self.path
        if not path.exists():
            raise BagError(f"{path}: no such bag (the path does not exist)")
        if path.is_dir() and (path / "metadata.yaml").is_file():
            storage_files = sorted(p for p in path.iterdir() if p.suffix in STORAGE_SUFFIXES)
            try:
                reader = Reader(path)
                reader.open()
                storage = "mcap" if any(p.suffix == ".mcap" for p in storage_files) else "sqlite3"
                self._sources.append(_Source(path, storage, reader, None))
                return
            except Exception as exc:  # noqa: BLE001 - rosbags raises several types for damaged bags
                if not storage_files:
                    raise BagError(f"{path}: not a readable rosbag2 bag: {exc}") from None
                self._problem(f"rosbags cannot open it ({exc}); reading its storage files one by one")
            files = storage_files
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in STORAGE_SUFFIXES)
            if not files:
                raise BagError(f"{path}: not a rosbag2 bag (a folder without metadata.yaml or .mcap/.db3 files)")
            self._problem("no metadata.yaml (the recording was probably interrupted); "
                          f"reading {len(files)} storage file(s) directly")
        elif path.suffix in STORAGE_SUFFIXES:
            files = [path]
        else:
            raise BagError(f"{path}: not a rosbag2 bag (expected a bag folder with metadata.yaml, "
                           "or a .mcap or .db3 file)")
        for file in files:
            self._sources.append(self._open_file(file))

    def _open_file(self, file: Path) -> _Source:
        storage = STORAGE_SUFFIXES[file.suffix]
        try:
            reader = Reader(file)
            reader.open()
            return _Source(file, storage, reader, None)
        except Exception as exc:  # noqa: BLE001
            if storage != "mcap":
                raise BagError(f"{file}: not a readable {storage} bag file: {exc}") from None
            first_error = exc
        try:
            salvage = McapSalvage(file)
        except SalvageError as exc:
            raise BagError(str(exc)) from None
        scan = salvage.scan()
        self._problem(f"{file.name}: {first_error}; read record by record instead")
        for p in scan.problems:
            self._problem(f"{file.name}: {p}")
        if not scan.channels:
            salvage.close()
            raise BagError(f"{file}: damaged beyond use (no readable topics)")
        return _Source(file, storage, None, salvage)

    def _load_connections(self, distro: str, audio: str) -> None:
        counts: dict[tuple[str, str], int] = {}
        overrides: dict = {}
        starts, ends = [], []
        for src in self._sources:
            if src.reader is not None:
                for conn in src.reader.connections:
                    key = (conn.topic, conn.msgtype)
                    counts[key] = counts.get(key, 0) + conn.msgcount
                    overrides.update(self._bag_definitions(conn.msgtype, conn.msgdef.format, conn.msgdef.data))
                if src.reader.message_count:
                    starts.append(src.reader.start_time)
                    ends.append(src.reader.end_time - 1)
            else:
                scan = src.salvage.result
                for cid, ch in scan.channels.items():
                    key = (ch.topic, ch.msgtype)
                    counts[key] = counts.get(key, 0) + scan.counts.get(cid, 0)
                    overrides.update(self._bag_definitions(ch.msgtype, ch.msgdef_encoding, ch.msgdef))
                if scan.start_ns is not None:
                    starts.append(scan.start_ns)
                    ends.append(scan.end_ns)
        msgtypes = {msgtype for _, msgtype in counts}
        flavour = audio_flavour_for(msgtypes) if audio == "auto" else audio
        base = make_typestore(distro, flavour)
        differing = {k: v for k, v in overrides.items() if base.fielddefs.get(k) != v}
        self.typestore: Typestore = typestore_with(distro, flavour, differing) if differing else base
        self.audio_flavour = flavour
        self.distro = distro
        self.topics: dict[str, TopicInfo] = {}
        for (topic, msgtype), count in sorted(counts.items()):
            if topic in self.topics:
                self._problem(f"topic {topic} has two types ({self.topics[topic].msgtype}, {msgtype}); "
                              f"using {self.topics[topic].msgtype}")
                continue
            self.topics[topic] = TopicInfo(topic, msgtype, count)
            if msgtype not in self.typestore.fielddefs:
                self.unknown_types[topic] = msgtype
                self._problem(f"topic {topic} has type {msgtype}, unknown to ROS 2 {distro}, audio_common_msgs "
                              f"and the bag's own definitions; its {count} message(s) are skipped")
        self.start_ns = min(starts) if starts else 0
        self.end_ns = max(ends) if ends else 0

    def _bag_definitions(self, msgtype: str, fmt: object, text: str) -> dict:
        try:
            return _definitions(msgtype, fmt, text)
        except Exception as exc:  # noqa: BLE001 - a bad definition costs one type, not the bag
            self._problem(f"the bag's definition of {msgtype} does not parse ({exc}); using the default")
            return {}

    # ------------------------------------------------------------ reading

    @property
    def duration_s(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e9

    @property
    def message_count(self) -> int:
        return sum(t.count for t in self.topics.values())

    def messages(self, topics: Iterable[str] | None = None, start_ns: int | None = None) -> Iterator[BagMessage]:
        """Messages of ``topics`` (default: all of known type) in receive-time order, from ``start_ns``."""
        wanted = set(self.topics if topics is None else topics) - set(self.unknown_types)
        streams = [self._source_messages(src, wanted, start_ns) for src in self._sources]
        if len(streams) == 1:
            yield from streams[0]
        else:
            yield from heapq.merge(*streams, key=lambda m: m.t_ns)

    def _source_messages(self, src: _Source, wanted: set[str], start_ns: int | None) -> Iterator[BagMessage]:
        if src.salvage is not None:
            yield from self._salvaged(src.salvage, wanted, start_ns, resume_after=None)
            return
        conns = [c for c in src.reader.connections if c.topic in wanted and self.topics[c.topic].msgtype == c.msgtype]
        if not conns:
            return
        last: tuple[int, int] | None = None  # (t_ns, messages yielded at that t) to resume after damage
        try:
            for conn, t_ns, data in src.reader.messages(conns, start=start_ns):
                last = (t_ns, last[1] + 1) if last and last[0] == t_ns else (t_ns, 1)
                yield BagMessage(conn.topic, conn.msgtype, t_ns, bytes(data))
        except Exception as exc:  # noqa: BLE001 - damage found while reading (rosbags, struct, sqlite errors)
            files = [src.path] if src.path.is_file() else sorted(src.path.glob("*.mcap"))
            if src.storage != "mcap" or not files:
                self._problem(f"read stopped by damage after {last[0] / 1e9 if last else 'the start'} s: {exc}; "
                              "replaying what was read")
                return
            self._problem(f"damage found while reading ({exc}); reading on record by record")
            for file in files:
                salvage = McapSalvage(file)
                salvage.scan()
                for p in salvage.result.problems:
                    self._problem(f"{file.name}: {p}")
                try:
                    yield from self._salvaged(salvage, wanted, start_ns, resume_after=last)
                finally:
                    salvage.close()

    def _salvaged(self, salvage: McapSalvage, wanted: set[str], start_ns: int | None,
                  resume_after: tuple[int, int] | None) -> Iterator[BagMessage]:
        skip_at = dict([resume_after]) if resume_after else {}
        for channel, t_ns, data in salvage.messages():
            if channel.topic not in wanted or (start_ns is not None and t_ns < start_ns):
                continue
            if resume_after is not None:
                if t_ns < resume_after[0]:
                    continue
                if skip_at.get(t_ns, 0) > 0:
                    skip_at[t_ns] -= 1
                    continue
            yield BagMessage(channel.topic, self.topics[channel.topic].msgtype, t_ns, data)

    def decode(self, msg: BagMessage) -> object:
        try:
            return self.typestore.deserialize_cdr(msg.data, msg.msgtype)
        except Exception as exc:  # noqa: BLE001 - rosbags raises struct, index and serde errors alike
            raise DecodeError(f"{msg.topic} ({msg.msgtype}) at {msg.t_ns / 1e9:.6f} s: "
                              f"bytes do not deserialize: {exc}") from None

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        sources, self._sources = self._sources, []
        for src in sources:
            try:
                if src.reader is not None:
                    src.reader.close()
                if src.salvage is not None:
                    src.salvage.close()
            except Exception:  # noqa: BLE001 - closing a damaged file must not hide the real error
                pass

    def __enter__(self) -> "BagReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
