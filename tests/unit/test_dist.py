"""Start-up housekeeping of the CPU ranks: DeepSpeed's shared-memory all-reduce buffers left in /dev/shm."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from conftest import REPO
from managertower import dist
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


def test_cpu_ranks_do_not_build_deepspeeds_shared_memory_all_reduce(tmp_path):
    """The CPU accelerator's shm all-reduce serves only DeepSpeed's inference_all_reduce: dist.init leaves it
    unbuilt and unloaded (a native build on a fresh machine, a load in every rank, ~69 MB of /dev/shm each)."""
    script = tmp_path / "init.py"
    script.write_text(
        "import os\n"
        f"os.environ.update(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1', "
        f"MASTER_PORT='{dist.free_port()}', DS_ACCELERATOR='cpu')\n"
        "from managertower import dist\n"
        "dist.init()\n"
        "import deepspeed.comm.comm as comm, torch\n"
        "assert torch.distributed.get_backend() == 'gloo'\n"
        "print('shm op', comm.cdb.shm_comm_op)\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            cwd=str(REPO), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shm op None" in result.stdout and "built successfully" not in result.stdout
