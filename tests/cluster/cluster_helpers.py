"""Helpers of the cluster tests: skips that say which service is missing, the tiny pre-training command line,
reading a run, and bounded waits on SLURM jobs and processes.

The services come from `bash cluster/ci/setup_services.sh` (run as root; CI runs it before `make test`).
Every run here is the real thing: the `pretrain` module under the DeepSpeed launcher, torchrun, SLURM, pdsh/ssh,
on the CPU with gloo (DS_ACCELERATOR=cpu), one thread per rank.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
NODES = ("mt-node1", "mt-node2")
SETUP_HINT = "run `bash cluster/ci/setup_services.sh` as root to install and start it"
# DeepSpeed JIT-compiles a CPU collective op on first use; anything else on the machine that loads it with other
# flags (another environment's torch headers) recompiles it under a lock in ~/.cache (a minute or more on two
# cores). The cluster tests use the environment's own folder, which tests/conftest.py sets for the whole suite.
TORCH_EXTENSIONS_DIR = (os.environ.get("MT_TEST_TORCH_EXTENSIONS_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
                        or "/tmp/managertower-cluster-tests/torch_extensions")


# --- environment -------------------------------------------------------------------------------------------
def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=TORCH_EXTENSIONS_DIR,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PATH=os.pathsep.join([str(Path(PYTHON).parent), env.get("PATH", "/usr/bin:/bin"), "/usr/sbin", "/sbin"]),
    )
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(extra)
    return env


def _quiet(command: list[str], timeout: float = 20) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None


# --- skips: only where a system package or service is absent ---------------------------------------------------
def slurm_missing() -> str | None:
    for tool in ("sbatch", "scontrol", "squeue", "scancel"):
        if not shutil.which(tool):
            return f"SLURM is not installed ({tool} not on PATH); {SETUP_HINT}"
    ping = _quiet(["scontrol", "ping"])
    if ping is None or "UP" not in ping.stdout:
        return f"SLURM is installed but slurmctld does not answer `scontrol ping`; {SETUP_HINT}"
    nodes = _quiet(["sinfo", "-h", "-o", "%T"])
    if nodes is None or not re.search(r"idle|mix|alloc|comp", nodes.stdout):
        return f"SLURM has no usable node (sinfo: {nodes.stdout.strip() if nodes else '?'}); {SETUP_HINT}"
    return None


def ssh_nodes_missing() -> str | None:
    for tool in ("ssh", "pdsh"):
        if not shutil.which(tool):
            return f"{tool} is not installed; {SETUP_HINT}"
    for node in NODES:
        probe = _quiet(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", node, "true"])
        if probe is None or probe.returncode != 0:
            detail = probe.stderr.strip().splitlines()[-1] if probe and probe.stderr.strip() else "no answer"
            return f"sshd with key authentication is not reachable as `ssh {node}` ({detail}); {SETUP_HINT}"
    return None


# --- data ---------------------------------------------------------------------------------------------------
def pretrain_args(run_dir: Path, shard_root: Path, steps: int, every: int, *extra: str) -> list[str]:
    """`--config tiny.yaml key=value ...` for a run of a few seconds per step on two CPU cores."""
    return [
        "--config", str(REPO / "pretrain/configs/tiny.yaml"),
        f"run.dir={run_dir}",
        f"data.train_shards=[{shard_root}/coco/train-*.tar]",
        f"data.val_shards=[{shard_root}/coco/test-*.tar]",
        f"train.steps={steps}",
        f"checkpoint.every={every}",
        "train.global_batch=8",
        "train.micro_batch=4",
        "train.log_every=1",
        "train.eval_batches=1",
        "data.num_threads=1",
        "run.tensorboard=false",
        "run.progress=false",
        *extra,
    ]


# --- reading a run ------------------------------------------------------------------------------------------
def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return records


def latest_step(run_dir: Path) -> int | None:
    """The step of checkpoints/latest (`step-N`), or None before the first complete checkpoint."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    match = re.search(r"(\d+)$", latest.read_text().strip())
    return int(match.group(1)) if match else None


def resumed_steps(log: str) -> list[int]:
    """The steps the run resumed from, in order, from the training log ('resumed from ... at step N')."""
    return [int(step) for step in re.findall(r"resumed from \S+ at step (\d+)", log)]


def assert_finished(run_dir: Path, steps: int, log: str = "") -> list[dict]:
    """The run reached `steps`: metrics.jsonl holds one training record per step up to it, each with a loss,
    never going back (a resumed run drops the lines past its checkpoint), and checkpoints/latest is step-N."""
    tail = f"\n--- log tail ---\n{log[-4000:]}" if log else ""
    training = [record for record in metrics(run_dir) if "loss" in record]  # evaluation records have no loss
    assert training, f"no training records in {run_dir}/metrics.jsonl{tail}"
    logged = [record["step"] for record in training]
    assert logged == list(range(logged[0], steps + 1)) and logged[0] == 1, \
        f"metrics.jsonl training steps are not 1..{steps} once each: {logged}{tail}"
    assert latest_step(run_dir) == steps, f"checkpoints/latest is step {latest_step(run_dir)}, expected {steps}{tail}"
    assert (run_dir / "checkpoints" / f"step-{steps}").is_dir()
    return training


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process launched under MT_LAUNCH_TAG=tag (launchers and ranks on every loopback node,
    which are not in the test's process group: they hang off sshd)."""
    import signal as signals

    from cluster.signal_ranks import _environ

    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and (_environ(int(entry)) or {}).get("MT_LAUNCH_TAG") == tag:
            try:
                os.kill(int(entry), signals.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5, on_timeout=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{on_timeout()}")


# --- SLURM ----------------------------------------------------------------------------------------------------
def job_fields(job_id: str) -> dict[str, str]:
    shown = _quiet(["scontrol", "show", "job", "-o", job_id])
    if shown is None or shown.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")


def array_task_states(job_id: str, count: int) -> list[str] | None:
    """The JobState of each of an array job's `count` tasks once all have ended, else None (for wait_for)."""
    shown = _quiet(["scontrol", "show", "job", "-o", job_id], timeout=30)
    if shown is None:
        return None
    states = [dict(item.split("=", 1) for item in line.split() if "=" in item).get("JobState")
              for line in shown.stdout.splitlines() if line.strip()]
    return states if len(states) == count and all(state in ENDED for state in states) else None


def submit(script: str, args: list[str], log: Path, env: dict[str, str], sbatch_options: list[str] = ()) -> str:
    command = ["sbatch", "--parsable", f"--output={log}", *sbatch_options, str(REPO / script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert result.returncode == 0, f"sbatch failed: {result.stderr}"
    return result.stdout.strip().split(";")[0]


def wait_for_job(job_id: str, log: Path, timeout: float, states=ENDED) -> dict:
    """Poll `scontrol show job` (there is no accounting database, so no sacct) until the job is in `states`.
    On timeout the job is cancelled and the test fails with the log tail."""
    def done():
        fields = job_fields(job_id)
        return fields if fields.get("JobState") in states else None

    def cancel_and_show():
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)
        text = log.read_text() if log.exists() else "(no log)"
        return f"; job {job_id} fields {job_fields(job_id)}\n--- log tail ---\n{text[-5000:]}"

    return wait_for(done, timeout, f"job {job_id} to reach {states}", interval=1.0, on_timeout=cancel_and_show)
