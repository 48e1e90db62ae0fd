"""Fixtures of the cluster tests, imported by each test module (helpers live in cluster_helpers.py).

Not a conftest.py: other test folders `from conftest import ...` the top-level one, and a second module named
conftest would shadow it. A session fixture imported into several modules is set up once per module, so the
expensive ones memoise their work for the session. The services come from `bash cluster/ci/setup_services.sh`;
a test that needs one skips, saying which, only where it is absent."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cluster_helpers import NODES, PYTHON, REPO, job_fields, run_env, slurm_missing, ssh_nodes_missing


_memo: dict[str, object] = {}


@pytest.fixture(scope="session")
def slurm():
    reason = slurm_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ssh_nodes():
    reason = ssh_nodes_missing()
    if reason:
        pytest.skip(reason)
    return NODES


@pytest.fixture(scope="session")
def deepspeed_cpu_ops():
    """DeepSpeed compiles its CPU shared-memory collective op the first time a rank starts on a machine (about a
    minute on two busy cores, cached in ~/.cache/torch_extensions); do it once here, not inside a timed job."""
    if "ops" in _memo:
        return
    build = subprocess.run(
        [PYTHON, "-c", "import importlib; importlib.import_module('deepspeed.comm.torch').build_shm_op()"],
        env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, f"building DeepSpeed's CPU op failed:\n{build.stdout[-2000:]}{build.stderr[-3000:]}"
    _memo["ops"] = True


@pytest.fixture(scope="session")
def shard_root(tmp_path_factory, deepspeed_cpu_ops) -> Path:
    """The synthetic world, sharded: SHARD_ROOT/coco/train-*.tar is what pre-training reads."""
    if "shards" not in _memo:
        from managertower.data import synthetic

        base = tmp_path_factory.mktemp("cluster_world")
        synthetic.write_world(str(base / "raw"), seed=0, size="small")
        synthetic.shard_world(str(base / "raw"), str(base / "shards"), workers=1, summary=False)
        assert sorted((base / "shards" / "coco").glob("train-*.tar")), "shard_world wrote no coco train shards"
        _memo["shards"] = base / "shards"
    return _memo["shards"]


@pytest.fixture
def slurm_jobs():
    """Job ids a test submits; any still queued or running at the end are cancelled."""
    jobs: list[str] = []
    yield jobs
    for job_id in jobs:
        if job_fields(job_id).get("JobState") in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING",
                                                   "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED"):
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
