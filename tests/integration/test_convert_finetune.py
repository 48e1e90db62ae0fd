"""Fine-tuning from the authors' weights, end to end (CPU, one rank, the real engine and DALI):

a released ManagerTower checkpoint (a Lightning .ckpt with the released names, built like tests/unit/test_convert.py
does, the tiny tower's shapes and tokenizer) -> `python -m doors.convert` -> `python -m finetune` on the demo's
SNLI-VE recipe from the converted weights (a few steps on the synthetic world) -> `python -m pretrain export RUN
--format hf` -> `ManagerTower.from_pretrained` holds the run's final weights.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import REPO, rank_env

if str(REPO / "tests" / "unit") not in sys.path:  # the released reference lives with the unit tests
    sys.path.insert(0, str(REPO / "tests" / "unit"))
from test_convert import HPARAMS, ReleasedMT, lightning_checkpoint, redraw, tiny_tokenizer_dir  # noqa: E402


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=rank_env(1), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_finetuning_starts_from_a_converted_released_checkpoint(synthetic_world, tmp_path, monkeypatch):
    from managertower.engine.checkpoint import find_checkpoint, fp32_state_dict
    from managertower.hf_export import read_folder, tower_state
    from managertower.model import ManagerTower

    _, shards = synthetic_world
    released = redraw(ReleasedMT(), 5)
    state = {k: v for k, v in released.state_dict().items() if not k.startswith("vqa_classifier.")}
    ckpt = lightning_checkpoint(tmp_path / "ManagerTower_pt.ckpt", state, HPARAMS, monkeypatch)
    weights = tmp_path / "weights"
    printed = run([sys.executable, "-m", "doors.convert", str(ckpt), "--out", str(weights),
                   "--tokenizer-dir", str(tiny_tokenizer_dir(tmp_path))]).stdout
    assert "released-mt" in printed and f"--from {weights / 'model.safetensors'}" in printed
    overrides = json.loads((weights / "config.json").read_text())["finetune_overrides"]
    converted, _ = read_folder(weights)

    run_dir = tmp_path / "snli_ve"
    result = run([sys.executable, "-m", "finetune", "--config", str(REPO / "finetune/configs/tiny_snli_ve.yaml"),
                  "--from", str(weights / "model.safetensors"), *overrides,
                  f"task.train_shards=[{shards}/snli_ve/train-*.tar]", f"task.eval_shards=[{shards}/snli_ve/dev-*.tar]",
                  "train.steps=3", "train.global_batch=8", "train.micro_batch=8", "train.log_every=1",
                  "checkpoint.every=3", f"run.dir={run_dir}", "run.progress=false"])
    assert f"initialised the tower from {weights / 'model.safetensors'}; the task's heads start new" in result.stdout
    assert "tower tensors the checkpoint lacks" not in result.stdout  # every tower tensor came from the conversion
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and "accuracy" in summary

    export = tmp_path / "export"
    run([sys.executable, "-m", "pretrain", "export", str(run_dir), "--format", "hf", "--out", str(export)])
    tower = ManagerTower.from_pretrained(export)
    final = tower_state(fp32_state_dict(find_checkpoint(run_dir)))
    for key, value in tower.state_dict().items():
        assert torch.equal(value, final[key]), key
    start = tower_state(converted)
    assert not torch.equal(final["text_pooler.dense.weight"], start["text_pooler.dense.weight"])  # it trained
    assert tower.cfg.vision_config == {"head_width": 64}  # the released CLIP's heads, carried through the run
