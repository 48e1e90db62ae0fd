"""Whole runs against hostile files and careless users: real `python -m pretrain` processes (one rank, and two
under the DeepSpeed launcher), real signals, real checkpoint files damaged by hand.

The reference is one finished one-rank run of 6 steps (checkpoints at 3 and 6, a metrics line every 2 steps, so
the window of step 4 spans the checkpoint at step 3); most tests start from a copy of it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, rank_env, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS, EVERY, LOG_EVERY = 6, 3, 2
COMMON = ["train.global_batch=16", "train.micro_batch=8", f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
          f"train.log_every={LOG_EVERY}", "train.eval_every=0", "train.eval_batches=2", "checkpoint.keep=5",
          "train.warmup=2", "run.progress=false", "run.tensorboard=false"]
TIMING = ("samples_per_s", "tokens_per_s", "mfu")  # wall-clock figures: the only ones two runs may differ in
GRACE_S = 3  # MT_STOP_GRACE_S for the stop tests


def command(run_dir: Path, shards: Path, *overrides: str, ranks: int = 1) -> list[str]:
    args = ["--config", str(REPO / "pretrain/configs/tiny.yaml"), f"run.dir={run_dir}",
            f"data.train_shards=[{shards}/coco/train-*.tar]", f"data.val_shards=[{shards}/coco/test-*.tar]",
            *COMMON, *overrides]
    if ranks == 1:
        return [sys.executable, "-m", "pretrain", *args]
    port = 29000 + (os.getpid() * 11 + len(str(run_dir))) % 900
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            "--module", "pretrain", *args]


def env(ranks: int = 1, **extra: str) -> dict:
    # One intra-op thread per rank, as the two-rank tests have on two cores: with two, these one-rank runs differed
    # in the last bit from run to run on a loaded machine, and the runs here are compared bitwise.
    return {**rank_env(ranks), "OMP_NUM_THREADS": "1", "MT_STOP_GRACE_S": str(GRACE_S), **extra}


def run(cmd: list[str], environ: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout)


def start(cmd: list[str], log: Path, environ: dict) -> subprocess.Popen:
    """A run in the background in its own session, its output into `log`."""
    return subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def records(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


def without_timing(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING}


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def finished(synthetic_world, tmp_path_factory):
    _, shards = synthetic_world
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run(command(run_dir, shards))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(records(run_dir)) == [2, 4, 6]
    return run_dir, shards


# --- 1. a weights file that would run code ----------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_hostile_weights_files_are_refused_and_nothing_in_them_runs(finished, tmp_path):
    run_dir, shards = finished
    marker = tmp_path / "marker"
    # checkpoint.init_from (finetune --from) an exported-looking .pt
    weights = tmp_path / "model_fp32.pt"
    torch.save({"state_dict": {"model.text_proj.weight": torch.zeros(2)}, "config": _Payload(marker)}, weights)
    result = run(command(tmp_path / "a", shards, f"checkpoint.init_from={weights}"))
    assert_one_line_error(result, str(weights), "builtins.exec", "refused")
    # checkpoint.resume=PATH: a copied checkpoint one of whose DeepSpeed files was swapped, its record made to match
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run_dir / "checkpoints" / "step-3", elsewhere / "step-3")
    model_states = elsewhere / "step-3" / "mp_rank_00_model_states.pt"
    state = torch.load(model_states, weights_only=True)
    torch.save({**state, "ds_version": _Payload(marker)}, model_states)
    from managertower.engine.checkpoint import COMPLETE, completion_record
    (elsewhere / "step-3" / COMPLETE).write_text(json.dumps(completion_record(elsewhere / "step-3", 3)))
    result = run(command(tmp_path / "b", shards, f"checkpoint.resume={elsewhere / 'step-3'}"))
    assert_one_line_error(result, str(model_states), "builtins.exec", "refused")
    assert not marker.exists()


# --- 2 and 5. stopping a run that is blocked; the run folder's lock ---------------------------------------------


def sigterm_and_wait(process) -> tuple[int, float]:
    """SIGTERM to a run; (its exit code, seconds it took to exit)."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=GRACE_S + 30)
    return code, time.monotonic() - sent


def kill_if_running(process) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_a_second_run_on_a_busy_folder_fails_at_once_and_sigterm_stops_a_starved_loader(synthetic_world, tmp_path):
    _, shards = synthetic_world
    run_dir, log = tmp_path / "run", tmp_path / "first.log"
    # the loader delivers nothing for step 2 (MANAGERTOWER_FAULT stalls it there): the run is blocked, not stepping
    first = start(command(run_dir, shards), log, env(MANAGERTOWER_FAULT="loader:2"))
    try:
        wait_for(lambda: "stalls in loader at step 2" in log.read_text(), first, timeout=300)
        second = run(command(run_dir, shards), timeout=120)
        assert_one_line_error(second, f"run.dir {run_dir} is in use by another run", f"pid {first.pid}", "host ",
                              "started ")
        code, took = sigterm_and_wait(first)
    finally:
        kill_if_running(first)
    text = log.read_text()
    assert code == 128 + signal.SIGTERM, text[-3000:]  # not 0: the run did not finish
    assert took < GRACE_S + 15, took
    assert f"no step boundary within {GRACE_S} s of SIGTERM" in text and "Traceback" not in text, text[-3000:]
    assert not (run_dir / "checkpoints").exists()  # nothing saved from the middle of a step


def test_sigterm_during_a_stalled_evaluation_exits_non_zero_within_seconds(synthetic_world, tmp_path):
    _, shards = synthetic_world
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    process = start(command(run_dir, shards, "train.eval_every=2"), log, env(MANAGERTOWER_FAULT="eval:2"))
    try:
        wait_for(lambda: "stalls in eval at step 2" in log.read_text(), process, timeout=300)
        code, took = sigterm_and_wait(process)
    finally:
        kill_if_running(process)
    text = log.read_text()
    assert code == 143 and took < GRACE_S + 15 and "Traceback" not in text, (code, took, text[-3000:])
    assert sorted(records(run_dir)) == [2]


def test_sigint_at_a_step_boundary_saves_a_checkpoint_and_exits_non_zero(synthetic_world, tmp_path):
    _, shards = synthetic_world
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    process = start(command(run_dir, shards, "train.steps=40", "train.log_every=1", "checkpoint.every=100"), log,
                    env())
    try:
        wait_for(lambda: (run_dir / "metrics.jsonl").exists() and max(records(run_dir), default=0) >= 2, process,
                 timeout=300)
        process.send_signal(signal.SIGINT)  # Ctrl-C
        code = process.wait(timeout=120)
    finally:
        kill_if_running(process)
    text = log.read_text()
    assert code == 128 + signal.SIGINT, text[-3000:]
    stopped_at = max(records(run_dir))
    assert 2 <= stopped_at < 40
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step-{stopped_at}"
    assert (run_dir / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").exists()
    assert f"SIGINT received: checkpoint saved at step {stopped_at}" in text and "Traceback" not in text
    assert json.loads((run_dir / "summary.json").read_text())["preempted"]  # not taken for a finished run


def test_sigterm_to_a_two_rank_run_with_one_rank_stuck_ends_every_process(synthetic_world, tmp_path):
    """Rank 1's loader stalls at step 3; rank 0 waits for it inside a collective (in C++, where Python's signal
    handlers do not run). SIGTERM to the whole launch, as SLURM or Ctrl-C sends it: every process ends, non-zero,
    within seconds of the grace."""
    _, shards = synthetic_world
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    launcher = start(command(run_dir, shards, "train.log_every=1", ranks=2), log,
                     env(2, MANAGERTOWER_FAULT="loader:3@1"))
    try:
        wait_for(lambda: "rank 1 stalls in loader at step 3" in log.read_text(), launcher, timeout=400)
        time.sleep(2)  # rank 0 is now waiting for rank 1
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "--local_rank" in " ".join(
            p.cmdline())]
        assert len(ranks) == 2, ranks
        sent = time.monotonic()
        os.killpg(launcher.pid, signal.SIGTERM)
        gone, alive = psutil.wait_procs(ranks, timeout=GRACE_S + 30)
        took = time.monotonic() - sent
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    text = log.read_text()
    assert not alive and took < GRACE_S + 20, (took, text[-3000:])
    assert launcher.returncode != 0 and "Traceback" not in text, text[-4000:]


# --- 3. resuming with changed settings --------------------------------------------------------------------------
def test_resume_refuses_settings_it_cannot_apply_and_applies_sound_ones(finished, tmp_path):
    source, shards = finished
    run_dir = copy_run(source, tmp_path / "run")
    config_before, metrics_before = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    result = run(command(run_dir, shards, "train.lr=0.5", "train.weight_decay=0.3"))
    error = assert_one_line_error(result, "settings a resumed run cannot change", "train.lr: ", " -> 0.5",
                                  "train.weight_decay: 0.01 -> 0.3", "run.dir", "checkpoint.resume=none")
    assert "train.steps" not in error
    assert (run_dir / "config.yaml").read_text() == config_before  # nothing claims the new values
    assert (run_dir / "metrics.jsonl").read_text() == metrics_before
    # more steps and other logging and keeping: applied, and said
    result = run(command(run_dir, shards, f"train.steps={STEPS + 2}", "train.log_every=1", "checkpoint.keep=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ("resuming with changed settings: checkpoint.keep: 5 -> 2, train.log_every: 2 -> 1, train.steps: 6 -> 8"
            in result.stdout)
    assert f"steps: {STEPS + 2}" in (run_dir / "config.yaml").read_text()
    assert sorted(records(run_dir)) == [2, 4, 6, 7, 8]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == ["step-6", "step-8"]


# --- 4. rotation keeps the newest written ------------------------------------------------------------------------
def test_after_resuming_from_an_older_step_rotation_keeps_the_checkpoint_just_written(finished, tmp_path):
    from managertower.engine.checkpoint import find_resume

    source, shards = finished
    run_dir = copy_run(source, tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    # back to step 3, a checkpoint every 2 steps, keep 1; the process dies while saving step 6 (after step 4's)
    result = run(command(run_dir, shards, f"checkpoint.resume={checkpoints / 'step-3'}", "checkpoint.every=2",
                         "checkpoint.keep=1"), env(MANAGERTOWER_FAULT="save:6"))
    assert result.returncode != 0 and "resumed from" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-4"]  # the older-written 3 and 6 rotated out
    assert (checkpoints / "latest").read_text() == "step-4" and (checkpoints / "step-4" / "COMPLETE").exists()
    assert find_resume(checkpoints) == checkpoints / "step-4"


# --- 6. damaged checkpoints --------------------------------------------------------------------------------------
def test_a_truncated_file_in_the_newest_checkpoint_resumes_from_the_one_before(finished, tmp_path):
    source, shards = finished
    run_dir = copy_run(source, tmp_path / "run")
    model_states = run_dir / "checkpoints" / "step-6" / "mp_rank_00_model_states.pt"
    size = model_states.stat().st_size
    model_states.write_bytes(model_states.read_bytes()[:size // 2])  # a copy cut short; COMPLETE still there
    result = run(command(run_dir, shards))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (f"step-6 is damaged (mp_rank_00_model_states.pt has {size // 2} of its {size} bytes): passed over"
            in result.stdout), result.stdout[-3000:]
    assert "step-3 at step 3" in result.stdout
    assert sorted(records(run_dir)) == [2, 4, 6]  # and it finished again from there
    assert (run_dir / "checkpoints" / "step-6" / "mp_rank_00_model_states.pt").stat().st_size == size


# --- 7. the first logged window after a resume ------------------------------------------------------------------
def test_the_first_window_logged_after_a_resume_matches_the_uninterrupted_run(finished, tmp_path):
    """A metrics line every 2 steps and a checkpoint every 3: the line of step 4 spans the checkpoint at step 3.
    The run dies while saving step 6 and resumes from step 3; every line (but the wall-clock figures) must be the
    uninterrupted run's, bit for bit."""
    reference, shards = finished
    run_dir = tmp_path / "run"
    crashed = run(command(run_dir, shards), env(MANAGERTOWER_FAULT="save:6"))
    assert crashed.returncode != 0 and (run_dir / "checkpoints" / "step-3" / "COMPLETE").exists()
    result = run(command(run_dir, shards))
    assert result.returncode == 0 and "step-3 at step 3" in result.stdout, result.stderr[-3000:]
    resumed, expected = records(run_dir), records(reference)
    assert sorted(resumed) == sorted(expected) == [2, 4, 6]
    for step in (4, 6):
        assert without_timing(resumed[step]) == without_timing(expected[step]), step
