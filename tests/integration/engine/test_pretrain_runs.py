"""Pre-training with the real DeepSpeed launcher and engine, real DALI, real TensorBoard files (CPU, gloo).

The reference is one uninterrupted two-rank ZeRO-2 run; the other runs are compared with it step by step.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, launcher_command, rank_env, wait_for

# Real DeepSpeed runs (two ranks for most): minutes in all. Each run has its own subprocess timeout (600 s);
# a test that kills, relaunches or pays for the reference run needs more than pytest.ini's default.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS, EVERY = 8, 3
COMMON = ["train.global_batch=16", "train.micro_batch=8", f"train.steps={STEPS}", f"checkpoint.every={EVERY}",
          "train.log_every=1", "train.eval_every=0", "train.eval_batches=2", "checkpoint.keep=5",
          "train.warmup=2"]


def pretrain_command(run_dir: Path, shards: Path, *overrides: str, ranks: int = 2) -> list[str]:
    args = ["--config", str(REPO / "pretrain/configs/tiny.yaml"), f"run.dir={run_dir}",
            f"data.train_shards=[{shards}/coco/train-*.tar]", f"data.val_shards=[{shards}/coco/test-*.tar]",
            *COMMON, *overrides]
    port = 29000 + (os.getpid() * 7 + len(str(run_dir))) % 900
    return launcher_command("pretrain", args, ranks, master_port=port)


def run(command: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env or rank_env(2), capture_output=True, text=True,
                            timeout=timeout)
    return result


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


@pytest.fixture(scope="module")
def reference(synthetic_world, tmp_path_factory):
    _, shards = synthetic_world
    run_dir = tmp_path_factory.mktemp("reference")
    result = run(pretrain_command(run_dir, shards))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir, shards, result


def test_reference_run_trains_logs_and_checkpoints(reference):
    run_dir, _, result = reference
    rows = metrics(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step, row in rows.items():
        # samples/s from the second step on: the first step's start-up and JIT builds are not timed
        for key in ("loss", "loss_mlm", "loss_itm", "acc_itm", "lr") + (("samples_per_s",) if step > 1 else ()):
            assert key in row, key
        assert step > 1 or "samples_per_s" not in row
        # the tiny recipe adds ITC (task.itc_weight=1) to the paper's MLM + ITM
        assert abs(row["loss"] - (row["loss_mlm"] + row["loss_itm"] + row.get("loss_itc", 0.0))) < 1e-4
    # linear warm-up over 2 steps, then linear decay to lr * min_lr_ratio
    assert rows[1]["lr"] < rows[2]["lr"] and rows[3]["lr"] > rows[STEPS]["lr"]
    ckpt_dir = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.glob("step-*")) == ["step-3", "step-6", "step-8"]
    assert (ckpt_dir / "latest").read_text() == "step-8"
    step = ckpt_dir / "step-8"
    assert (step / "COMPLETE").exists() and (step / "rank0.pt").exists() and (step / "rank1.pt").exists()
    meta = json.loads((step / "meta.json").read_text())
    assert meta["step"] == STEPS and meta["world_size"] == 2 and meta["samples_seen"] == STEPS * 16
    assert (run_dir / "config.yaml").exists() and (run_dir / "curves.png").stat().st_size > 0
    assert (run_dir / "manager_weights.png").stat().st_size > 0
    weights = json.loads((run_dir / "manager_weights.json").read_text())
    assert len(weights["text"]) == 2 and abs(sum(weights["text"][0]) - 1) < 1e-4  # 2 layers x N, rows sum to 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and "acc_itm" in summary  # the held-out evaluation ran


def test_tensorboard_event_files_hold_the_scalars(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = reference
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("loss", "loss/mlm", "loss/itm", "acc/itm", "lr", "samples_per_s", "grad_norm"):
        assert tag in tags, (tag, sorted(tags))
    losses = {e.step: e.value for e in events.Scalars("loss")}
    expected = metrics(run_dir)
    assert sorted(losses) == sorted(expected)
    assert all(abs(losses[s] - expected[s]["loss"]) < 1e-5 for s in losses)
    assert any(t.startswith("managers/") for t in events.Tags()["histograms"])


def test_sigkill_after_first_checkpoint_then_relaunch_is_exact(reference, tmp_path):
    ref_dir, shards, _ = reference
    run_dir = tmp_path / "killed"
    command = pretrain_command(run_dir, shards)
    process = subprocess.Popen(command, cwd=REPO, env=rank_env(2), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # past the first checkpoint (step 3) and into step 4+, then kill launcher and ranks without warning
        wait_for(lambda: (run_dir / "checkpoints/step-3/COMPLETE").exists() and
                  (run_dir / "metrics.jsonl").exists() and max(metrics(run_dir), default=0) >= EVERY + 1,
                  process, timeout=300)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = max(metrics(run_dir))
    assert EVERY < killed_at < STEPS
    result = run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    resumed, expected = metrics(run_dir), metrics(ref_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the lines past the checkpoint were replaced
    for step in range(EVERY + 1, STEPS + 1):
        for key in ("loss", "loss_mlm", "loss_itm", "acc_itm"):
            assert resumed[step][key] == expected[step][key], (step, key, resumed[step][key], expected[step][key])


def test_crash_during_a_save_resumes_from_the_checkpoint_before(synthetic_world, tmp_path):
    _, shards = synthetic_world
    run_dir = tmp_path / "crash"
    command = pretrain_command(run_dir, shards, ranks=1)
    env = dict(rank_env(1), MANAGERTOWER_FAULT="save:6")
    crashed = run(command, env=env)
    assert crashed.returncode != 0
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / ".tmp-step-6").exists() and not (ckpt_dir / "step-6").exists()
    assert (ckpt_dir / "latest").read_text() == "step-3"
    result = run(command, env=rank_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr and "step-3 at step 3" in result.stdout + result.stderr
    assert not (ckpt_dir / ".tmp-step-6").exists() and (ckpt_dir / "step-6" / "COMPLETE").exists()
    assert sorted(metrics(run_dir)) == list(range(1, STEPS + 1))


def test_changed_world_size_resumes_from_fp32_weights(reference, tmp_path):
    import shutil

    ref_dir, shards, _ = reference
    run_dir = tmp_path / "resized"
    shutil.copytree(ref_dir / "checkpoints", run_dir / "checkpoints")
    result = run(pretrain_command(run_dir, shards, f"train.steps={STEPS + 2}", ranks=1), env=rank_env(1))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size changed from 2 to 1" in result.stdout + result.stderr
    rows = metrics(run_dir)
    assert sorted(rows) == [STEPS + 1, STEPS + 2]
    # the weights carried over: the loss continues from the trained level, not from a fresh model's
    assert rows[STEPS + 1]["loss"] < metrics(ref_dir)[1]["loss"]


def test_export_writes_the_fp32_weights(reference, tmp_path):
    import torch

    from managertower.engine.checkpoint import fp32_state_dict
    from pretrain.__main__ import main as pretrain_main

    run_dir, _, _ = reference
    out = tmp_path / "model.pt"
    assert pretrain_main(["export", str(run_dir), "--out", str(out)]) == 0  # the door, in this process
    blob = torch.load(out, weights_only=False)
    assert blob["step"] == STEPS and blob["config"]["model"]["size"] == "tiny"
    direct = fp32_state_dict(run_dir / "checkpoints" / "step-8")
    assert set(blob["state_dict"]) == set(direct)
    assert any(k.startswith("model.text_managers.") for k in blob["state_dict"])
    for key, value in blob["state_dict"].items():
        assert value.dtype == torch.float32 or not value.is_floating_point()
        assert torch.equal(value, direct[key])


def test_zero3_trains_evaluates_draws_exports_and_resumes(synthetic_world, tmp_path):
    """ZeRO-3 on two CPU ranks: parameters partitioned outside the engine's forward (the evaluation, the manager
    pictures, the ITC temperature clamp after each step: DeepSpeed's full-parameter setter failed on the
    one-element temperature split over two ranks), the fp32 export and an exact-world resume."""
    import torch

    shards, run_dir = synthetic_world[1], tmp_path / "zero3"
    command = pretrain_command(run_dir, shards, "train.zero_stage=3", "train.steps=4", "checkpoint.every=2",
                               "train.eval_every=2")
    result = run(command)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ZeRO stage 3" in result.stdout + result.stderr
    assert (run_dir / "manager_weights.png").stat().st_size > 0
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4]
    export = tmp_path / "zero3.pt"
    from pretrain.__main__ import main as pretrain_main

    assert pretrain_main(["export", str(run_dir), "--out", str(export)]) == 0
    weights = torch.load(export, weights_only=False)["state_dict"]
    temperature = weights["itc_head.learned_temperature"]
    assert temperature.dtype == torch.float32 and 0.001 <= float(temperature) <= 0.5
    assert all(v.numel() > 0 for v in weights.values())  # gathered, not the empty ZeRO-3 placeholders
    result = run(pretrain_command(run_dir, shards, "train.zero_stage=3", "train.steps=6", "checkpoint.every=2",
                                  "train.eval_every=2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr and sorted(metrics(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_bad_configs_fail_before_anything_starts(synthetic_world, tmp_path, capsys):
    from pretrain.__main__ import main as pretrain_main

    _, shards = synthetic_world
    cases = {
        "train.stepz=3": "did you mean train.steps",
        "model.manager=average": "model.manager='average' is not one of",
        "train.global_batch=20": "not a multiple of train.micro_batch",
        "data.train_shards=[/nonexistent/x-*.tar]": "no shards match",
    }
    for override, message in cases.items():
        # the door in this process (what `python -m pretrain` exits with): one line, status 2, no traceback
        args = pretrain_command(tmp_path / "bad", shards, override, ranks=1)[3:]
        assert pretrain_main(args) == 2, override
        assert message in capsys.readouterr().err, override
    assert not (tmp_path / "bad" / "checkpoints").exists()
    # a global batch of 24 at micro batch 8 fits one rank (3 accumulation steps) but not two: a clear error
    result = run(pretrain_command(tmp_path / "bad2", shards, "train.micro_batch=8", "train.global_batch=24"),
                 timeout=300)
    assert result.returncode != 0
    assert "not divisible by micro_batch x world_size" in result.stdout + result.stderr
