"""cluster/slurm/pretrain.sbatch on the one-host SLURM cluster: a two-rank tiny pre-training run, and the two
requeue paths (SLURM's `scontrol requeue` from outside; SIGUSR1 before the time limit, when the job requeues
itself) each continuing from its checkpoint instead of starting over."""
from __future__ import annotations

import subprocess

import pytest

from cluster_helpers import (assert_finished, job_fields, latest_step, metrics, pretrain_args, resumed_steps,
                             run_env, submit, wait_for, wait_for_job)

pytestmark = pytest.mark.cluster

# Two CPU ranks on the one node; the batch task gets both CPUs.
SBATCH_OPTIONS = ["--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2", "--time=15"]
JOB_TIMEOUT = 300  # seconds: a run is under a minute here (mostly start-up), a requeue adds ~20 s of queueing
# A step takes ~0.3 s here, so the runs that are interrupted train long enough to be caught in the middle.
LONG_STEPS = 60


def _env(**extra):
    return run_env(MT_NPROC_PER_NODE="2", **extra)


def _running_at_step(job_id, run_dir, step):
    def check():
        fields = job_fields(job_id)
        if fields.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            pytest.fail(f"job {job_id} ended ({fields.get('JobState')}) before reaching step {step}")
        records = metrics(run_dir)
        return fields.get("JobState") == "RUNNING" and records and records[-1]["step"] >= step
    return check


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_pretrain_sbatch_two_ranks(slurm, slurm_jobs, shard_root, tmp_path, launcher):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = 6
    job = submit("cluster/slurm/pretrain.sbatch", pretrain_args(run_dir, shard_root, steps, 3), log,
                 _env(MT_LAUNCHER=launcher), SBATCH_OPTIONS)
    slurm_jobs.append(job)
    fields = wait_for_job(job, log, JOB_TIMEOUT)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", f"job {job}: {fields.get('JobState')} {fields.get('ExitCode')}\n{text[-5000:]}"
    assert "preflight: " in text and " 0 FAIL" in text  # the preflight table ran first
    assert "world size 2" in text, text[-3000:]  # two ranks trained together
    assert_finished(run_dir, steps, text)
    assert (run_dir / "checkpoints" / "step-3").is_dir() or latest_step(run_dir) == steps
    assert resumed_steps(text) == []


def test_scontrol_requeue_resumes_from_checkpoint(slurm, slurm_jobs, shard_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps, every = LONG_STEPS, 10
    job = submit("cluster/slurm/pretrain.sbatch", pretrain_args(run_dir, shard_root, steps, every), log,
                 _env(MT_PREFLIGHT="0"), SBATCH_OPTIONS)
    slurm_jobs.append(job)
    wait_for(_running_at_step(job, run_dir, every + 1), JOB_TIMEOUT, f"job {job} to train past step {every}",
             on_timeout=lambda: "\n" + (log.read_text()[-4000:] if log.exists() else ""))
    saved_before = latest_step(run_dir)
    assert saved_before and saved_before >= every
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    assert requeue.returncode == 0, requeue.stderr
    fields = wait_for_job(job, log, JOB_TIMEOUT)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields.get('JobState')}\n{text[-5000:]}"
    assert int(fields["Restarts"]) >= 1, "the job was not requeued"
    resumed = resumed_steps(text)
    assert resumed, f"the requeued job started over instead of resuming\n{text[-5000:]}"
    # SIGTERM from the requeue makes the ranks save at the next step boundary: at or after the last periodic save.
    assert resumed[0] >= saved_before, (resumed, saved_before)
    assert_finished(run_dir, steps, text)


def test_usr1_before_time_limit_saves_and_requeues_itself(slurm, slurm_jobs, shard_root, tmp_path):
    """What `#SBATCH --signal=B:USR1@180` does at the time limit, sent by hand: only a checkpoint saved on the
    signal can be resumed from, since the periodic interval (100) is longer than the run."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = LONG_STEPS
    job = submit("cluster/slurm/pretrain.sbatch", pretrain_args(run_dir, shard_root, steps, 1000), log,
                 _env(MT_PREFLIGHT="0"), SBATCH_OPTIONS)
    slurm_jobs.append(job)
    wait_for(_running_at_step(job, run_dir, 2), JOB_TIMEOUT, f"job {job} to train 2 steps",
             on_timeout=lambda: "\n" + (log.read_text()[-4000:] if log.exists() else ""))
    assert latest_step(run_dir) is None
    signal = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert signal.returncode == 0, signal.stderr
    fields = wait_for_job(job, log, JOB_TIMEOUT)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields.get('JobState')}\n{text[-5000:]}"
    assert int(fields["Restarts"]) == 1, f"expected one self-requeue\n{text[-5000:]}"
    assert "sent SIGUSR1 to rank process" in text and "requeueing job" in text
    resumed = resumed_steps(text)
    assert len(resumed) == 1 and 2 <= resumed[0] < steps, f"resumed from {resumed}\n{text[-5000:]}"
    assert_finished(run_dir, steps, text)
