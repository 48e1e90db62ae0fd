"""Shared test set-up: CPU DeepSpeed, offline transformers, and one synthetic world per session."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs SLURM / sshd / pdsh (installed by cluster/ci/setup_services.sh)")
    config.addinivalue_line("markers", "slow: a multi-minute test (real multi-rank training)")


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory):
    """The 'small' synthetic world, raw and sharded: (raw_root, shard_root)."""
    from managertower.data.synthetic import shard_world, write_world

    root = tmp_path_factory.mktemp("world")
    write_world(root / "raw", seed=0, size="small")
    shard_world(root / "raw", root / "shards", workers=1, summary=False)
    return root / "raw", root / "shards"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """The 'demo'-sized synthetic world sharded (for tests that must learn): the shard root."""
    from managertower.data.synthetic import shard_world, write_world

    root = tmp_path_factory.mktemp("demo_world")
    write_world(root / "raw", seed=0, size="demo")
    shard_world(root / "raw", root / "shards", workers=2, summary=False)
    return root / "shards"


def rank_env(ranks: int = 2) -> dict:
    from managertower.demo import rank_env as _rank_env

    return _rank_env(ranks)


def wait_for(predicate, process, timeout: float) -> None:
    """Poll `predicate` until it holds; fail if `process` ends first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended (code {process.returncode}) before the awaited state")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")
