"""Output files that are never seen half written: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: str | Path, data: object, *, sort_keys: bool = False, indent: int | None = 2) -> Path:
    """``data`` as JSON at ``path``, replaced in one rename (values JSON cannot hold are written as text)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, default=str) + "\n")
    os.replace(tmp, path)
    return path
