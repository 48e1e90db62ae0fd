"""Fine-tuning end to end with the real engine, DALI and the DeepSpeed launcher, on the synthetic world (CPU).

- A job killed with SIGKILL mid-way (launcher and both gloo ranks) and relaunched through the batch runner
  continues from its checkpoint; a finished job is skipped.
- Consecutive two-rank jobs share one launch, and a job that runs after others there has the figures it has as the
  first job of a launch (in fresh processes).
- (slow) From the demo's pre-trained checkpoint (the session's `demo_pretrained` run, exported to fp32), the demo's
  fine-tuning recipes (finetune/configs/tiny_*.yaml, unchanged, on 2 ranks) reach every target on the held-out
  split: VQAv2 >= 2 x the majority-answer score, NLVR2 >= 0.65, SNLI-VE >= 0.55, Flickr30K and COCO retrieval
  R@1 >= 5 x chance both ways.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, rank_env, wait_for

RANKS = 2
TASKS = ("vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")
EVAL_SPLIT = {"vqav2": "val", "nlvr2": "dev", "snli_ve": "dev", "flickr30k": "test", "coco": "test"}


def jobs_yaml(path: Path, out: Path, shards: Path, init_from: str, tasks, num_gpus: int, overrides=(),
              names=None) -> Path:
    lines = [f"out: {out}", f"init_from: {init_from}", f"num_gpus: {num_gpus}", "seeds: [0]",
             f"overrides: {json.dumps(['run.progress=false', *overrides])}", "jobs:"]
    for task, name in zip(tasks, names or [None] * len(tasks)):
        split = EVAL_SPLIT[task]
        lines += [f"  - task: {task}", f"    config: {REPO}/finetune/configs/tiny_{task}.yaml",
                  f"    overrides: [\"task.train_shards=[{shards}/{task}/train-*.tar]\", "
                  f"\"task.eval_shards=[{shards}/{task}/{split}-*.tar]\"]"] + ([f"    name: {name}"] if name else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def metric_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows if "loss" in row}


# ------------------------------------------------------------------------------------------ kill + resume


def test_killed_job_resumes_from_its_checkpoint_and_a_finished_one_is_skipped(demo_shards, tmp_path, capsys):
    steps, every = 8, 3
    out = tmp_path / "batch"
    jobs = jobs_yaml(tmp_path / "jobs.yaml", out, demo_shards, "none", ["snli_ve"], num_gpus=2,
                     overrides=[f"train.steps={steps}", f"checkpoint.every={every}", "train.log_every=1",
                                "checkpoint.keep=5", "data.example_pool=16"])  # the pool resumes too
    command = [sys.executable, "-m", "finetune.batch", str(jobs)]
    run_dir = out / "snli_ve-seed0"
    process = subprocess.Popen(command, cwd=REPO, env=rank_env(2), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # past the first checkpoint and into the next steps, then kill batch, launcher and ranks at once
        wait_for(lambda: (run_dir / f"checkpoints/step-{every}/COMPLETE").exists()
                  and (run_dir / "metrics.jsonl").exists() and max(metric_rows(run_dir), default=0) >= every + 1,
                  process, timeout=400)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    killed_at = max(metric_rows(run_dir))
    assert every < killed_at < steps and not (run_dir / "summary.json").exists()
    result = subprocess.run(command, cwd=REPO, env=rank_env(2), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed_from = max(s for s in (every, 2 * every) if (run_dir / f"checkpoints/step-{s}").exists() and s <= killed_at)
    assert f"resumed from {run_dir / 'checkpoints' / f'step-{resumed_from}'}" in result.stdout
    rows = metric_rows(run_dir)
    assert sorted(rows) == list(range(1, steps + 1))  # metrics.jsonl continues from the checkpoint step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == steps and "accuracy" in summary
    assert (run_dir / "predictions_snli_ve_dev.csv").exists()
    results = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["split"], r["metric"]) for r in results] == [("snli_ve", "dev", "accuracy")]
    assert results[0]["value"] == pytest.approx(summary["accuracy"]) and results[0]["checkpoint"] == "none"
    from finetune import batch

    assert batch.main([str(jobs)]) == 0  # in this process: the finished job is skipped, nothing starts
    assert "complete, skipped" in capsys.readouterr().out
    assert "| snli_ve | dev | accuracy |" in (out / "results.md").read_text()


# ------------------------------------------------------------------------------------------ one launch


def test_jobs_share_one_launch_with_the_figures_of_a_launch_of_their_own(demo_shards, tmp_path, capsys):
    from finetune import batch

    out = tmp_path / "batch"
    jobs = jobs_yaml(tmp_path / "jobs.yaml", out, demo_shards, "none", ["nlvr2", "snli_ve", "nlvr2"], num_gpus=RANKS,
                     overrides=["train.steps=4", "train.log_every=1", "checkpoint.every=4"],
                     names=["first", "between", "after"])
    assert batch.main([str(jobs)]) == 0
    launches = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    assert len(launches) == 1 and launches[0].endswith("--in-ranks 0,1,2"), launches
    banners = [f"=== [{n}/3] {name}-seed0 ===" for n, name in ((1, "first"), (2, "between"), (3, "after"))]
    for name, own in zip(("first", "between", "after"), banners):  # each job's part of the output in its log
        log = (out / f"{name}-seed0" / "launch.log").read_text()
        assert own in log and str(out / f"{name}-seed0" / "checkpoints" / "step-4") in log
        assert [banner for banner in banners if banner in log] == [own]
    # `first` trained in fresh processes (as in a launch of its own), `after` in the processes `first` and then
    # snli_ve had trained in: the same figures
    first, after = metric_rows(out / "first-seed0"), metric_rows(out / "after-seed0")
    assert sorted(first) == sorted(after) == [1, 2, 3, 4]
    for step, row in first.items():
        assert [after[step][key] for key in ("loss", "acc", "grad_norm")] == \
            [row[key] for key in ("loss", "acc", "grad_norm")], step
    summaries = [json.loads((out / f"{name}-seed0" / "summary.json").read_text()) for name in ("first", "after")]
    assert summaries[0]["accuracy"] == summaries[1]["accuracy"]


# ------------------------------------------------------------------------------- from a pre-trained tower


@pytest.fixture(scope="session")
def pretrained(request) -> Path:
    """The demo's pre-trained tower, exported to one fp32 file (the session's `demo_pretrained` run).

    MT_FT_PRETRAINED=FILE uses an existing export instead (e.g. the demo's runs/demo/pretrain/export/...)."""
    if os.environ.get("MT_FT_PRETRAINED"):
        return Path(os.environ["MT_FT_PRETRAINED"])
    return request.getfixturevalue("demo_pretrained") / "export" / "model_fp32.pt"


def _batch(demo_shards: Path, tmp_path: Path, init_from: str) -> dict[tuple[str, str], float]:
    from finetune import batch

    out = tmp_path / "batch"
    jobs = jobs_yaml(tmp_path / "jobs.yaml", out, demo_shards, init_from, TASKS, num_gpus=RANKS)
    assert batch.main([str(jobs)]) == 0
    rows = json.loads((out / "results.json").read_text())
    print((out / "results.md").read_text())
    values = {(r["task"], r["metric"]): r["value"] for r in rows}
    for task in TASKS:
        summary = json.loads((out / f"{task}-seed0" / "summary.json").read_text())
        values.update({(task, k): v for k, v in summary.items() if isinstance(v, float)})
    return values


@pytest.mark.slow
def test_finetuning_from_a_pretrained_checkpoint_reaches_the_targets(pretrained, demo_shards, tmp_path):
    values = _batch(demo_shards, tmp_path, str(pretrained))
    assert values[("vqav2", "vqa_score")] >= 2 * values[("vqav2", "vqa_score_majority")]
    assert values[("nlvr2", "accuracy")] >= 0.65
    assert values[("snli_ve", "accuracy")] >= 0.55
    for task in ("flickr30k", "coco"):
        chance = 1 / values[(task, "images")]  # both ways: an image's captions are 1/images of all texts
        assert values[(task, "ir_r1")] >= 5 * chance and values[(task, "tr_r1")] >= 5 * chance, task
