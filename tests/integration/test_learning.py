"""The demo's pre-training learns: a two-rank DeepSpeed run of pretrain/configs/tiny.yaml on the synthetic
world matches held-out image-text pairs against random negatives at >= 0.7 (chance 0.5)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, rank_env


@pytest.mark.slow
def test_two_rank_pretraining_learns_itm_on_held_out_pairs(demo_shards, tmp_path):
    run_dir = tmp_path / "learn"
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29611",
               "--module", "pretrain", "--config", str(REPO / "pretrain/configs/tiny.yaml"), f"run.dir={run_dir}",
               f"data.train_shards=[{demo_shards}/coco/train-*.tar]",
               f"data.val_shards=[{demo_shards}/coco/test-*.tar]", "run.progress=false"]
    result = subprocess.run(command, cwd=REPO, env=rank_env(2), capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_acc_itm"], r.get("eval_acc_itm_hard")) for r in rows if "eval_acc_itm" in r]
    print("held-out ITM (step, random negatives, one-attribute hard negatives):", evals)
    final = evals[-1]
    assert final[1] >= 0.7, evals
    assert rows[-1]["step"] == max(r["step"] for r in rows)
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss_mlm"] < train[0]["loss_mlm"] and train[-1]["acc_itm"] > 0.6
