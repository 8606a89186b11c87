"""Writing rosbag2 bags that never appear half-written under their final name.

A bag is written into a hidden temporary folder next to its destination and
moved into place only when it was closed cleanly; a crash or an exception
leaves no partial bag where a test, a CI job or Foxglove would pick it up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import TracebackType

from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys.store import Typestore

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
BAG_VERSION = 9  # rosbag2 metadata version of Jazzy and Kilted


class BagWriteError(RuntimeError):
    """The destination exists, the storage is unknown, or a topic was not declared."""


class BagWriter:
    """``with BagWriter(path, typestore) as bag: bag.add_topic(...); bag.write(...)``.

    Messages are serialized with ``typestore``; ``write_raw`` takes CDR bytes as they are.
    """

    def __init__(self, path: str | Path, typestore: Typestore, storage: str = "mcap", overwrite: bool = False,
                 custom_data: dict[str, str] | None = None):
        if storage not in STORAGES:
            raise BagWriteError(f"unknown bag storage {storage!r}; choose from {sorted(STORAGES)}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise BagWriteError(f"{self.path} exists already; choose another path or remove it")
        self.typestore = typestore
        self.storage = storage
        self.overwrite = overwrite
        self.custom_data = dict(custom_data or {})
        # The bag folder's own name must be the final one: the storage file inside is named after it.
        self._staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        self._writer: Writer | None = None
        self._connections: dict[str, object] = {}
        self.counts: dict[str, int] = {}

    # ------------------------------------------------------------ lifecycle

    def open(self) -> "BagWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._staging.exists():  # left by an earlier crashed run of this very process id
            shutil.rmtree(self._staging)
        self._staging.mkdir()
        self._writer = Writer(self._staging / self.path.name, version=BAG_VERSION,
                              storage_plugin=STORAGES[self.storage])
        for key, value in self.custom_data.items():
            self._writer.set_custom_data(key, value)
        self._writer.open()
        return self

    def close(self) -> Path:
        """Finish the bag and move it to its final name."""
        writer, self._writer = self._writer, None
        if writer is None:
            raise BagWriteError("bag writer is not open")
        try:
            writer.close()
            if self.path.exists():
                if not self.overwrite:
                    raise BagWriteError(f"{self.path} appeared while the bag was being written; not replacing it")
                shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
            os.replace(self._staging / self.path.name, self.path)
        finally:
            shutil.rmtree(self._staging, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.abort()
            except Exception:  # noqa: BLE001 - the files are removed below either way
                pass
        shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> "BagWriter":
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ------------------------------------------------------------ topics and messages

    def add_topic(self, topic: str, msgtype: str) -> None:
        if self._writer is None:
            raise BagWriteError("open the bag before adding topics")
        if topic in self._connections:
            raise BagWriteError(f"topic {topic} was already added")
        if msgtype not in self.typestore.fielddefs:
            raise BagWriteError(f"message type {msgtype} of topic {topic} is not in the type store")
        self._connections[topic] = self._writer.add_connection(topic, msgtype, typestore=self.typestore)
        self.counts[topic] = 0

    def write(self, topic: str, t_ns: int, msg: object) -> None:
        """Serialize ``msg`` and write it with bag timestamp ``t_ns`` (receive time)."""
        self.write_raw(topic, t_ns, self.typestore.serialize_cdr(msg, msg.__msgtype__))

    def write_raw(self, topic: str, t_ns: int, data: bytes | memoryview) -> None:
        if self._writer is None:
            raise BagWriteError("bag writer is not open")
        conn = self._connections.get(topic)
        if conn is None:
            raise BagWriteError(f"topic {topic} was not added to the bag")
        self._writer.write(conn, int(t_ns), data)
        self.counts[topic] += 1
