"""CURVE key pairs for the policy server and its clients, and the server's allow-list.

Layout that ``mm-fusion keys DIR`` writes (ZeroMQ certificate files, ``zmq.auth.create_certificates``)::

    DIR/server.key               the server's public key: give it to every client (engine.remote.server_key)
    DIR/server.key_secret        the server's secret key: stays on the server
    DIR/allowed/NAME.key         the public keys the server accepts; delete one to revoke that client
    DIR/clients/NAME.key_secret  a client's key pair: copy it to that robot only (engine.remote.client_key)

The cryptography is ZeroMQ's own (curve25519 via libsodium/tweetnacl); this module only moves files.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeysError(ValueError):
    """A key file that is missing or unreadable, or a key directory without what it needs."""


def _chmod_secret(path: Path) -> None:
    os.chmod(path, 0o600)


def create_keys(directory: str | Path, clients: list[str]) -> dict[str, list[Path]]:
    """Make the server's key pair (unless it exists) and one pair per new client; returns what was written.

    An existing client name is refused rather than overwritten: a new secret would silently lock out the
    robot that has the old one.
    """
    import zmq.auth

    if not clients:
        raise KeysError("name at least one client")
    for name in clients:
        if not _NAME.match(name) or name == "server":
            raise KeysError(f"client name {name!r}: use 1-64 letters, digits, '_', '.', '-' (not 'server')")
    root = Path(directory)
    allowed, client_dir = root / "allowed", root / "clients"
    existing = [n for n in clients if (client_dir / f"{n}.key_secret").exists() or (allowed / f"{n}.key").exists()]
    if existing:
        raise KeysError(f"client key(s) {existing} already exist in {root}; pick new names (or delete the old files)")
    for d in (root, allowed, client_dir):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(client_dir, 0o700)
    written: dict[str, list[Path]] = {"server": [], "clients": []}
    if not (root / "server.key_secret").exists():
        public, secret = zmq.auth.create_certificates(str(root), "server")
        _chmod_secret(Path(secret))
        written["server"] += [Path(public), Path(secret)]
    for name in clients:
        public, secret = zmq.auth.create_certificates(str(client_dir), name)
        _chmod_secret(Path(secret))
        (allowed / f"{name}.key").write_bytes(Path(public).read_bytes())
        Path(public).unlink()   # the public half lives in allowed/; clients/ holds only what a robot gets
        written["clients"] += [allowed / f"{name}.key", Path(secret)]
    return written


def load_public(path: str | Path) -> bytes:
    """The z85 public key of a certificate file (public or secret)."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise KeysError(f"key file not found: {path}")
    try:
        public, _secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path}: not a ZeroMQ certificate file: {exc}") from None
    return public


def load_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a ``.key_secret`` file."""
    import zmq.auth

    path = Path(path)
    if not path.is_file():
        raise KeysError(f"key file not found: {path}")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as exc:
        raise KeysError(f"{path}: not a ZeroMQ certificate file: {exc}") from None
    if not secret:
        raise KeysError(f"{path} holds only a public key; a secret key file (.key_secret) is needed here")
    return public, secret


class AllowList:
    """The client public keys in ``DIR/allowed``, re-read when the directory changes.

    ``callback`` is the credentials provider ZeroMQ's ZAP authenticator calls for each CURVE handshake
    (on the authenticator's thread); the server calls ``reload`` about once a second. A key that was
    allowed and has since been deleted is refused as revoked, by name; every refusal is logged with the key (at most once a minute per key: a refused
    client's socket retries its handshake every reconnect interval).
    """

    LOG_EVERY_S = 60.0

    def __init__(self, directory: str | Path, log: Callable[[str], None] = print):
        self.directory = Path(directory)
        self.log = log
        self._lock = threading.Lock()
        self._keys: dict[bytes, str] = {}        # z85 public key -> name
        self._revoked: dict[bytes, str] = {}
        self._signature: tuple = ()
        self._logged: dict[bytes, float] = {}
        self.refused: dict[str, int] = {}        # key (z85, with the name if known) -> handshakes refused
        self.reload(force=True)

    def _listing(self) -> tuple:
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.directory.glob("*.key")))
        except OSError:
            return ()

    def reload(self, force: bool = False) -> list[str]:
        """Read the directory again if it changed; returns the names revoked by this reload."""
        signature = self._listing()
        if not force and signature == self._signature:
            return []
        keys: dict[bytes, str] = {}
        for path in sorted(self.directory.glob("*.key")):
            try:
                keys[load_public(path)] = path.stem
            except KeysError as exc:
                self.log(f"allow-list: ignoring {exc}")
        with self._lock:
            gone = {k: n for k, n in self._keys.items() if k not in keys}
            added = sorted(n for k, n in keys.items() if k not in self._keys)
            self._revoked.update(gone)
            for k in keys:
                self._revoked.pop(k, None)
            self._keys, self._signature = keys, signature
        if not force and (gone or added):
            self.log(f"allow-list reloaded: {len(keys)} key(s); revoked {sorted(gone.values())}, added {added}")
        return sorted(gone.values())

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._keys.values())

    def callback(self, domain: str, key: bytes) -> bool:
        now = time.monotonic()
        with self._lock:
            if key in self._keys:
                return True
            revoked = self._revoked.get(key)
        z85 = key.decode("ascii", "replace")
        label = f"revoked key '{revoked}' ({z85})" if revoked else f"unknown key {z85}"
        self.refused[label] = self.refused.get(label, 0) + 1
        if now - self._logged.get(key, -1e9) >= self.LOG_EVERY_S:
            self._logged[key] = now
            self.log(f"refused CURVE client: {label} ({self.refused[label]} handshake(s) so far)")
        return False
