"""Shared test set-up: CPU DeepSpeed, offline transformers, and one synthetic world per session."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed JIT-compiles C++ ops (its CPU shared-memory collective at every process-group start, cpu_adam for
# offload: a minute or two each on 2 cores) into TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, one
# folder for every environment: a build against another environment's torch headers is rebuilt there, and the
# other one's again on its next run. Each virtual environment keeps its own beside it (as `make` does), so every
# process of the suite, the cluster tests' ranks and SLURM jobs included, loads one build.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs SLURM / sshd / pdsh (installed by cluster/ci/setup_services.sh)")
    config.addinivalue_line("markers", "slow: a multi-minute test (real multi-rank training, the learning and "
                                       "fine-tuning accuracy tests, SLURM / pdsh); `pytest -m 'not slow' tests` "
                                       "is the fast tier")


# The slow tier in files that do not mark their own tests: every test under these folders (SLURM, sshd, pdsh),
# and single tests by module basename (basenames are unique across tests/) and name.
CLUSTER_TESTS = REPO / "tests" / "cluster"
SLOW_FOLDERS = (CLUSTER_TESTS,)
SLOW_TESTS = {
    # two ranks under the DeepSpeed launcher on the demo-sized world: killed and relaunched; two batches
    "test_finetune_jobs.py": {"test_killed_job_resumes_from_its_checkpoint_and_a_finished_one_is_skipped",
                              "test_jobs_share_one_launch_with_the_figures_of_a_launch_of_their_own"},
}
# pytest.ini's `timeout` (900 s, set-up included) holds for every other test; a timeout guards against a hang,
# it is no performance bound. More for the tests that wait on long set-up: the cluster tests (DeepSpeed's CPU op
# build, up to 900 s once per session, then SLURM jobs waited on for up to 300 s each, four waits in the requeue
# test), the killed fine-tuning job (up to 400 s to its first checkpoint, 600 s for the relaunch), the shared
# launch (two batches of two-rank jobs) and the
# fine-tuning accuracy test (demo_pretrained: up to 1500 s for the two-rank pre-training, then its export and
# five fine-tuning jobs).
FOLDER_TIMEOUTS = {CLUSTER_TESTS: 2700}
TEST_TIMEOUTS = {"test_finetune_jobs.py": {
    "test_killed_job_resumes_from_its_checkpoint_and_a_finished_one_is_skipped": 1800,
    "test_jobs_share_one_launch_with_the_figures_of_a_launch_of_their_own": 1800,
    "test_finetuning_from_a_pretrained_checkpoint_reaches_the_targets": 3600}}


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.path)).resolve()
        name = getattr(item, "originalname", item.name)
        if any(folder in path.parents for folder in SLOW_FOLDERS) or name in SLOW_TESTS.get(path.name, ()):
            item.add_marker(pytest.mark.slow)
        seconds = TEST_TIMEOUTS.get(path.name, {}).get(name) or \
            next((t for folder, t in FOLDER_TIMEOUTS.items() if folder in path.parents), None)
        if seconds and item.get_closest_marker("timeout") is None:  # a test's own timeout mark wins
            item.add_marker(pytest.mark.timeout(seconds))


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


@pytest.fixture(scope="session")
def demo_pretrained(demo_shards, tmp_path_factory) -> Path:
    """The demo's pre-training, once per session: pretrain/configs/tiny.yaml unchanged (2 local ranks under the
    DeepSpeed launcher, 300 steps at global batch 64) on the demo world's COCO shards. Returns the run folder;
    its fp32 export is RUN/export/model_fp32.pt (what the demo's fine-tuning batch starts from)."""
    run_dir = tmp_path_factory.mktemp("demo_pretrain") / "run"
    command = launcher_command("pretrain", [
        "--config", str(REPO / "pretrain/configs/tiny.yaml"), f"run.dir={run_dir}",
        f"data.train_shards=[{demo_shards}/coco/train-*.tar]", f"data.val_shards=[{demo_shards}/coco/test-*.tar]",
        "run.progress=false"], ranks=2, master_port=29600 + os.getpid() % 300)
    result = subprocess.run(command, cwd=REPO, env=rank_env(2), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from pretrain.__main__ import main as pretrain_main

    export = run_dir / "export" / "model_fp32.pt"
    assert pretrain_main(["export", str(run_dir), "--out", str(export)]) == 0  # the door, in this process
    return run_dir


# managertower is imported inside the helpers: the environment above is set before anything imports it
def rank_env(ranks: int = 2) -> dict:
    from managertower import launch

    return launch.rank_env(ranks)


def launcher_command(module: str, args: list[str], ranks: int, master_port: int) -> list[str]:
    from managertower import launch

    return launch.launcher_command(module, args, ranks, master_port=master_port)


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
