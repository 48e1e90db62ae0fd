"""cluster/slurm/pretrain.sbatch on the one-host SLURM cluster: a two-rank tiny pre-training run under each
per-node launcher, and the two requeue paths (SIGUSR1 before the time limit, when the job requeues itself;
`scontrol requeue` from outside), each continuing from its checkpoint instead of starting over."""
from __future__ import annotations

import json
import re
import subprocess

import pytest

from cluster_fixtures import deepspeed_cpu_ops, shard_root, slurm, slurm_jobs  # noqa: F401 (pytest fixtures)
from cluster_helpers import (PYTHON, REPO, array_task_states, assert_finished, job_fields, latest_step, metrics,
                             pretrain_args, resumed_steps, run_env, submit, wait_for, wait_for_job)

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


def test_requeue_on_usr1_and_on_scontrol_requeue_resumes_from_checkpoint(slurm, slurm_jobs, shard_root, tmp_path):
    """One job, interrupted twice while it trains, finishing on its third start:
    1. SIGUSR1 to the batch shell, what `#SBATCH --signal=B:USR1@180` sends before the time limit (sent here by
       hand): the ranks save at the next step boundary and exit, the job requeues itself. The periodic interval
       (1000) is longer than the run, so resuming at all proves the checkpoint was saved on the signal.
    2. `scontrol requeue` from outside (what an admin or preemption does): SLURM sends SIGTERM to every
       process, the ranks save and exit, SLURM requeues the job.
    Each start resumes from the step the previous one saved instead of starting over."""
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    steps = LONG_STEPS
    job = submit("cluster/slurm/pretrain.sbatch", pretrain_args(run_dir, shard_root, steps, 1000), log,
                 _env(MT_PREFLIGHT="0"), SBATCH_OPTIONS)
    slurm_jobs.append(job)
    show_log = lambda: "\n" + (log.read_text()[-5000:] if log.exists() else "(no log)")  # noqa: E731

    # 1. the time-limit warning
    wait_for(_running_at_step(job, run_dir, 2), JOB_TIMEOUT, f"job {job} to train 2 steps", on_timeout=show_log)
    assert latest_step(run_dir) is None
    usr1 = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True, timeout=30)
    assert usr1.returncode == 0, usr1.stderr
    wait_for(lambda: int(job_fields(job).get("Restarts", 0)) >= 1, JOB_TIMEOUT, f"job {job} to requeue itself",
             on_timeout=show_log)
    first_save = latest_step(run_dir)
    assert first_save is not None and 2 <= first_save < steps, f"saved on SIGUSR1 at {first_save}{show_log()}"

    # 2. scontrol requeue, once the second start trains past the step it resumed from
    wait_for(_running_at_step(job, run_dir, first_save + 2), JOB_TIMEOUT, f"job {job} to train again",
             on_timeout=show_log)
    requeue = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    assert requeue.returncode == 0, requeue.stderr

    fields = wait_for_job(job, log, JOB_TIMEOUT)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", f"{fields.get('JobState')}\n{text[-5000:]}"
    assert int(fields["Restarts"]) == 2, f"expected two requeues, got {fields['Restarts']}\n{text[-5000:]}"
    assert "sent SIGUSR1 to rank process" in text and f"requeueing job {job}" in text
    assert "DUE TO JOB REQUEUE" in text
    resumed = resumed_steps(text)
    assert len(resumed) == 2, f"expected two resumes, the log shows {resumed}\n{text[-5000:]}"
    assert resumed[0] == first_save, (resumed, first_save)
    assert first_save + 2 <= resumed[1] < steps, f"the second start did not resume where it stopped: {resumed}"
    assert_finished(run_dir, steps, text)


def test_dataprep_array_parts_make_one_complete_folder(slurm, shard_root, tmp_path):
    """cluster/slurm/dataprep_array.sbatch: two array tasks each convert their part of the synthetic COCO into
    one output folder; the merged manifest is complete and every shard verifies."""
    raw, out, log = shard_root.parent / "raw" / "coco", tmp_path / "coco", tmp_path / "dataprep-%a.out"
    job = submit("cluster/slurm/dataprep_array.sbatch", ["coco", "--root", str(raw), "--out", str(out),
                                                         "--samples-per-shard", "50"],
                 log, run_env(), ["--array=0-1", "--cpus-per-task=1", "--time=10"])

    states = wait_for(lambda: array_task_states(job, 2), 180, f"array job {job}", interval=1.0)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("dataprep-*.out")))
    assert states == ["COMPLETED", "COMPLETED"], f"{states}\n{logs[-4000:]}"
    assert "part 0/2" in logs and "part 1/2" in logs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and not manifest["missing_parts"] and manifest["samples"] > 0, manifest
    verify = subprocess.run([PYTHON, "-m", "dataprep", "verify", str(out)], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=run_env())
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_finetune_batch_submits_one_array_and_collects_one_table(slurm, slurm_jobs, shard_root, tmp_path):
    """`python -m finetune.batch JOBS --submit`: one array task per job (cluster/slurm/finetune_array.sbatch),
    submitted from outside the repository; each task trains its job, records its row and rebuilds results.json/md
    under the batch's lock, so the table ends with every job's row."""
    out, log = tmp_path / "batch", tmp_path / "finetune-%a.out"
    steps = 4
    jobs_file = tmp_path / "jobs.yaml"
    lines = [f"out: {out}", "init_from: none", "num_gpus: 1", "seeds: [0]",
             f'overrides: ["run.progress=false", "run.tensorboard=false", "train.steps={steps}", '
             f'"checkpoint.every={steps}", "train.global_batch=8", "train.micro_batch=8", "data.num_threads=1"]',
             "jobs:"]
    for task, split in (("nlvr2", "dev"), ("snli_ve", "dev")):
        lines += [f"  - task: {task}", f"    config: finetune/configs/tiny_{task}.yaml",
                  f'    overrides: ["task.train_shards=[{shard_root}/{task}/train-*.tar]", '
                  f'"task.eval_shards=[{shard_root}/{task}/{split}-*.tar]"]']
    jobs_file.write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [PYTHON, "-m", "finetune.batch", str(jobs_file), "--submit", "--max-parallel", "1",
         "--sbatch-args", f"--output={log} --cpus-per-task=2 --time=10"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=run_env())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--array=0-1%1" in result.stdout
    job = re.search(r"submitted array job (\d+)", result.stdout).group(1)
    slurm_jobs.append(job)

    logs = lambda: "".join(p.read_text() for p in sorted(tmp_path.glob("finetune-*.out")))  # noqa: E731
    states = wait_for(lambda: array_task_states(job, 2), 2 * JOB_TIMEOUT, f"array job {job}", interval=1.0,
                      on_timeout=lambda: logs()[-4000:])
    assert states == ["COMPLETED", "COMPLETED"], f"{states}\n{logs()[-4000:]}"
    assert "array task 0" in logs() and "array task 1" in logs()
    rows = json.loads((out / "results.json").read_text())
    assert sorted((r["task"], r["split"], r["metric"]) for r in rows) == [("nlvr2", "dev", "accuracy"),
                                                                          ("snli_ve", "dev", "accuracy")]
    for row in rows:
        summary = json.loads((out / f"{row['task']}-seed0" / "summary.json").read_text())
        assert summary["steps"] == summary["total_steps"] == steps
        assert row["value"] == summary["accuracy"] and 0.0 <= row["value"] <= 1.0
    table = (out / "results.md").read_text()
    assert "| nlvr2 | dev | accuracy |" in table and "| snli_ve | dev | accuracy |" in table
