"""The VQAv2 task trains on the questions the authors' released dataprep keeps (LooperXX/ManagerTower,
src/utils/write_vqa.py) and evaluates on every question."""
from __future__ import annotations

import json
import os

import torch
from PIL import Image

from conftest import REPO
from managertower.config import load_config
from managertower.data.prep import prepare
from managertower.data.shards import iter_metadata, resolve_shards
from managertower.tasks import build_task

# question id -> the ten annotators' answers; the vocabulary is ["2", "yes"]
ANSWERS = {
    1: ["2"] * 10,
    2: ["red"] * 7 + ["blue"] * 3,  # no answer is a class: the released dataprep drops it from training
    3: ["two"] * 2 + ["pink"] * 8,  # "two" is "2": kept, with target 0.6
    4: ["the"] * 10,  # normalises to "", not a class here: dropped
}


def _vqa_shards(tmp_path):
    root = tmp_path / "vqa"
    os.makedirs(root / "train2014")
    for image_id in (1, 2):
        Image.new("RGB", (32, 24), (30, 200, 30)).save(root / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    image_of = {1: 1, 2: 1, 3: 2, 4: 2}
    questions = [{"image_id": image_of[q], "question": f"question {q}?", "question_id": q} for q in ANSWERS]
    annotations = [{"question_id": q, "image_id": image_of[q], "multiple_choice_answer": answers[0],
                    "answers": [{"answer": a, "answer_id": k + 1} for k, a in enumerate(answers)]}
                   for q, answers in ANSWERS.items()]
    with open(root / "v2_OpenEnded_mscoco_train2014_questions.json", "w") as handle:
        json.dump({"questions": questions}, handle)
    with open(root / "v2_mscoco_train2014_annotations.json", "w") as handle:
        json.dump({"annotations": annotations}, handle)
    out = tmp_path / "shards"
    prepare("vqav2", root, out, "train", progress=False, summary=False)
    vocab = tmp_path / "answer_vocab.json"
    vocab.write_text(json.dumps(["2", "yes"]))
    return out, vocab


def test_released_training_drops_questions_without_an_answer_class(tmp_path):
    """write_vqa.py lines 119-126 keep only the in-vocabulary answers of a question (`if answer not in
    ans2label: continue`) and lines 137-146 drop the questions left with no label (`if len(qv[1]["labels"])
    != 0`), so the released training set, and the epoch it defines, hold only questions with a class. The
    released code drops them from its val file too; ours keeps them for evaluation, so the VQA score is over
    every question."""
    shards, vocab = _vqa_shards(tmp_path)
    cfg = load_config(str(REPO / "finetune/configs/tiny_vqav2.yaml"),
                      [f"task.train_shards=[{shards}/train-*.tar]", f"task.eval_shards=[{shards}/train-*.tar]",
                       f"task.answer_vocab={vocab}", f"run.dir={tmp_path / 'run'}"])
    task = build_task(cfg)
    assert task.train_examples() == 2  # questions 1 and 3; the released file keeps 2 of the 4 too
    metas = {q["question_id"]: meta for meta in _metas(shards) for q in meta["questions"]}
    trained = [e["question_id"] for meta in _metas(shards) for e in task.expand(meta)]
    evaluated = [e["question_id"] for meta in _metas(shards) for e in task.expand_eval(meta)]
    assert sorted(trained) == [1, 3] and sorted(evaluated) == [1, 2, 3, 4]
    batch = task.make_collator(train=True)(task.expand(metas[3]))
    assert torch.equal(batch["targets"], torch.tensor([[0.6, 0.0]]))  # "two" x 2 is "2": 0.6, as released


def _metas(shards):
    return list(iter_metadata(resolve_shards([f"{shards}/train-*.tar"], "shards")))
