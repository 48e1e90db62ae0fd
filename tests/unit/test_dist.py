"""Start-up housekeeping of the CPU ranks: DeepSpeed's shared-memory all-reduce buffers left in /dev/shm."""
from __future__ import annotations

import mmap
import os
import time

from managertower.dist import SHM_BUFFER_PREFIX, remove_stale_shm_buffers


def _buffer(folder, name, age_s):
    path = folder / f"{SHM_BUFFER_PREFIX}{name}"
    path.write_bytes(b"\0" * 4096)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def test_only_old_unmapped_buffers_are_removed(tmp_path):
    stale = _buffer(tmp_path, "0_127.0.0.1_29001_0", age_s=3600)
    fresh = _buffer(tmp_path, "0_127.0.0.1_29002_0", age_s=0)  # a job starting right now
    in_use = _buffer(tmp_path, "0_127.0.0.1_29003_0", age_s=3600)  # mapped by a live process (this one)
    other = tmp_path / "not_a_deepspeed_buffer"
    other.write_bytes(b"x")
    os.utime(other, (0, 0))
    with open(in_use, "r+b") as handle, mmap.mmap(handle.fileno(), 4096):
        removed = remove_stale_shm_buffers(str(tmp_path), min_age_s=60)
    assert removed == [str(stale)]
    assert not stale.exists() and fresh.exists() and in_use.exists() and other.exists()
    assert remove_stale_shm_buffers(str(tmp_path / "missing")) == []
