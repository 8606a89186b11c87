"""Which ZeroMQ endpoints stay on this machine, and the rule that nothing else goes without CURVE keys.

Standard library only: the config layer checks ``engine.remote.endpoint`` with it at load.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

_TCP = re.compile(r"^tcp://(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d+|\*)$")
_ANY = re.compile(r"^(tcp|ipc|inproc)://.+")


class InsecureEndpointError(ValueError):
    """A non-loopback address without CURVE keys."""


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost; anything else may be a network."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = _TCP.match(endpoint)
    if not m:
        return False   # wildcards, interface names, source-address forms: assume a network
    host = m.group("host").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False   # a host name could resolve to any address


def endpoint_problem(endpoint: str, keys: Any) -> str:
    """Why ``endpoint`` may not be used with ``keys`` (falsy: none), or "" when it may."""
    if not _ANY.match(endpoint):
        return f"{endpoint!r}: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    if not keys and not is_loopback(endpoint):
        return (f"{endpoint!r} is not a loopback address and no CURVE keys are given: anyone on that network "
                f"could send the arm commands or read its sensors. Make keys with `mm-fusion keys DIR`, or use "
                f"tcp://127.0.0.1:PORT")
    return ""


def check_endpoint(endpoint: str, keys: Any, what: str) -> None:
    problem = endpoint_problem(endpoint, keys)
    if problem:
        raise InsecureEndpointError(f"{what} {problem}")
