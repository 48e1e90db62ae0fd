"""The demo's pre-training learns: a two-rank DeepSpeed run of pretrain/configs/tiny.yaml on the synthetic
world (the session's `demo_pretrained` run, which the fine-tuning accuracy test then starts from) matches
held-out image-text pairs against random negatives at >= 0.7 (chance 0.5)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(2400)  # demo_pretrained: up to 1500 s for the two-rank run, then its export
def test_two_rank_pretraining_learns_itm_on_held_out_pairs(demo_pretrained):
    rows = [json.loads(line) for line in (demo_pretrained / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_acc_itm"], r.get("eval_acc_itm_hard")) for r in rows if "eval_acc_itm" in r]
    print("held-out ITM (step, random negatives, one-attribute hard negatives):", evals)
    final = evals[-1]
    assert final[1] >= 0.7, evals
    assert rows[-1]["step"] == max(r["step"] for r in rows)
    train = [r for r in rows if "loss" in r]
    assert train[-1]["loss_mlm"] < train[0]["loss_mlm"] and train[-1]["acc_itm"] > 0.6
    assert (demo_pretrained / "export" / "model_fp32.pt").stat().st_size > 0
