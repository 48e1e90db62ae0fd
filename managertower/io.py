"""Files written whole or not at all: a temporary name beside the target, fsync, then an atomic rename.

    atomic_write("RUN/summary.json", text)          # str or bytes
    atomic_write_json("out/manifest.json", payload, sort_keys=True)

A reader never sees half a file: a crash leaves the previous version (or none) and, at worst, a stale
`.tmp-*` file.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, data: str | bytes, *, mode: int | None = None) -> Path:
    """Write `data` to `path` through `path.tmp-HOST-PID` and `os.replace`; `mode` sets the permission bits
    before the rename (e.g. 0o600 for a file holding secrets). The host name keeps writers on different nodes
    of a shared filesystem (every node's hostfile, SLURM array tasks) off each other's temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 1, sort_keys: bool = False,
                      mode: int | None = None) -> Path:
    return atomic_write(path, json.dumps(payload, indent=indent, sort_keys=sort_keys, default=str) + "\n", mode=mode)
