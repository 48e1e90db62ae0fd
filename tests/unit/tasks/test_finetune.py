"""The fine-tuning tasks on the synthetic world (CPU): a training step and an evaluation to a prediction file
for each task, VQA's soft targets, the heads and their lr multipliers, and the epoch schedule."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO
from managertower.config import load_config
from managertower.tasks import build_task

TINY = {t: str(REPO / f"finetune/configs/tiny_{t}.yaml") for t in ("vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")}
EVAL_SPLIT = {"vqav2": "val", "nlvr2": "dev", "snli_ve": "dev", "flickr30k": "test", "coco": "test"}


def tiny_config(task: str, shards: Path, run_dir: Path, *overrides: str):
    return load_config(TINY[task], [f"task.train_shards=[{shards}/{task}/train-*.tar]",
                                    f"task.eval_shards=[{shards}/{task}/{EVAL_SPLIT[task]}-*.tar]",
                                    f"run.dir={run_dir}", *overrides])


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world[1]


@pytest.mark.parametrize("name", ["vqav2", "nlvr2", "snli_ve", "flickr30k"])
def test_each_task_trains_a_step_and_evaluates_to_a_prediction_file(name, world, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(name, world, tmp_path, "train.micro_batch=8", "train.global_batch=8",
                      "task.retrieval_topk=4")
    task = build_task(cfg)
    loader = task.build_loader("train", 0, 1, torch.device("cpu"))
    batch = next(iter(loader))
    loader.close()
    assert batch["pixel_values"].shape == (8, 3, 64, 64)
    out = task(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["batch_size"] == 8
    new = [n for n, p in task.named_parameters() if p.grad is not None and not n.startswith("model.")]
    assert new, "the task's heads get gradients"
    task.eval()
    with torch.no_grad():
        result = task.evaluate(0, 1, torch.device("cpu"))
    written = sorted(p.name for p in tmp_path.glob("predictions_*"))
    assert written == [f"predictions_{name}_{EVAL_SPLIT[name]}.{'csv' if name in ('nlvr2', 'snli_ve') else 'json'}"]
    path = tmp_path / written[0]
    if name == "vqav2":
        rows = json.loads(path.read_text())
        assert set(rows[0]) == {"question_id", "answer"} and len(rows) == int(result["questions"])
        assert 0 <= result["vqa_score"] <= 1 and result["vqa_score_majority"] > 0
    elif name == "nlvr2":
        lines = path.read_text().splitlines()
        assert len(lines) == int(result["examples"])
        identifier, prediction = lines[0].split(",")
        assert identifier.startswith("dev-") and prediction in ("True", "False")
    elif name == "snli_ve":
        lines = path.read_text().splitlines()
        assert lines[0] == "pair_id,prediction,label" and lines[1].split(",")[1] in ("contradiction", "neutral", "entailment")
    else:
        for key in ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10", "itc_ir_r1"):
            assert 0 <= result[key] <= 1
        assert result["ir_r10"] >= result["ir_r1"]


def test_vqa_targets_are_the_soft_scores_of_in_vocabulary_answers(world, tmp_path):
    task = build_task(tiny_config("vqav2", world, tmp_path))
    meta = {"questions": [{"question_id": 7, "question": "what color?", "answers": {"red": 1.0, "rot": 0.3}},
                          {"question_id": 8, "question": "how many?", "answers": {"2": 0.6, "3": 0.9}}]}
    examples = task.expand(meta)
    assert [e["question_id"] for e in examples] == [7, 8]  # one example per question
    batch = task.make_collator(train=True)(examples)
    index = task.answer_index
    assert batch["targets"][0, index["red"]] == 1.0 and batch["targets"][0].sum() == 1.0  # "rot": not a class
    assert batch["targets"][1, index["2"]] == pytest.approx(0.6) and batch["targets"][1, index["3"]] == pytest.approx(0.9)
    assert task.classifier.fc1.in_features == 2 * 64 and task.classifier.fc1.out_features == 4 * 64
    assert task.classifier.fc2.out_features == len(json.loads((world / "vqav2" / "answer_vocab.json").read_text()))


def test_heads_shapes_and_lr_multipliers(world, tmp_path):
    shapes = {"nlvr2": (4 * 64, 2 * 64, 2), "snli_ve": (2 * 64, 4 * 64, 3)}
    for name, (fan_in, hidden, classes) in shapes.items():
        task = build_task(tiny_config(name, world, tmp_path, "task.head_lr_mult=0"))
        assert (task.classifier.fc1.in_features, task.classifier.fc1.out_features,
                task.classifier.fc2.out_features) == (fan_in, hidden, classes)
        assert task.lr_multiplier("classifier.fc1.weight") == 10.0
        assert task.lr_multiplier("model.text_expert.encoder.embeddings.word_embeddings.weight") == 1.0
        assert task.lr_multiplier("model.text_layers.0.attention.q.weight") == 5.0
    vqa = build_task(tiny_config("vqav2", world, tmp_path, "task.head_lr_mult=0"))
    assert vqa.lr_multiplier("classifier.fc2.bias") == 50.0
    retrieval = build_task(tiny_config("flickr30k", world, tmp_path, "task.head_lr_mult=0"))
    assert retrieval.lr_multiplier("itc_head.text_proj.weight") == 5.0 == retrieval.lr_multiplier("itm_head.fc.weight")
    assert retrieval.itc_head.temperature().item() == pytest.approx(0.07)
    with torch.no_grad():
        retrieval.itc_head.learned_temperature.fill_(5.0)
    retrieval.after_optimizer_step()  # released: clamped in place to [0.001, 0.5] after each step
    assert retrieval.itc_head.temperature().item() == pytest.approx(0.5)


def test_epochs_set_the_steps_from_the_number_of_examples(world, tmp_path):
    cfg = tiny_config("snli_ve", world, tmp_path, "task.epochs=2", "train.global_batch=32")
    recipe_steps = cfg.train.steps
    task = build_task(cfg)
    examples = task.train_examples()
    hypotheses = 0
    import tarfile

    for tar_path in sorted((world / "snli_ve").glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    hypotheses += len(json.load(tar.extractfile(member))["hypotheses"])
    assert examples == hypotheses > 0
    assert task.total_steps() == -(-2 * examples // 32)
    assert cfg.train.steps == recipe_steps  # decided in total_steps() alone: the config is not rewritten
