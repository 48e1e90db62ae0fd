"""VQAv2 (docs/recipe.md §3): 576 px, one example per question, soft-target BCE x n_classes, VQA score.

Head: ClassifierHead(2D, 4D, n_answers) on `cls_feats` (1536 -> 3072 -> 3129 at base size), lr x50.
Answer classes: `answer_vocab.json` (a JSON list; dataprep writes it beside the VQAv2 shards: the normalised
multiple-choice answers seen >= 9 times in train+val, in the released order, so row i of a released VQA head is
class i), or `task.answer_vocab`. A question's target row holds the soft score (0, .3, .6, .9, 1 for 0..4+
annotators, data/formats/vqa_answers.py) of each in-vocabulary answer (dataprep stores these scores in the
metadata); answers outside the vocabulary are left out of the target.
Training skips the questions none of whose answers is a class (the released dataprep drops them: their target
row would be all zero), and the epoch schedule counts the questions kept; evaluation keeps every question, so
the VQA score is over the whole split.
Loss (released code): `binary_cross_entropy_with_logits(logits, targets) * n_classes`, i.e. the BCE summed
over classes and averaged over questions.
No horizontal flip: questions name sides ("what shape is at the top left?").
Predictions: RUN/predictions_vqav2_{split}.json in the evaluation server's format [{"question_id", "answer"}].
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ..config import Config, ConfigError
from ..model import ClassifierHead, init_new_weights
from . import metrics
from ..data.shards import resolve_shards
from .finetune import FinetuneTask, TextCollator

VOCAB_FILE = "answer_vocab.json"


def load_answer_vocab(path: str) -> list[str]:
    with open(path) as handle:
        vocab = json.load(handle)
    if isinstance(vocab, dict):  # {answer: index}
        vocab = [a for a, _ in sorted(vocab.items(), key=lambda item: item[1])]
    if not isinstance(vocab, list) or not vocab:
        raise ConfigError(f"{path} must be a non-empty JSON list of answers (or an answer -> index mapping)")
    return [str(a) for a in vocab]


def find_answer_vocab(cfg: Config) -> str:
    if cfg.task.answer_vocab:
        if not os.path.exists(cfg.task.answer_vocab):
            raise ConfigError(f"task.answer_vocab={cfg.task.answer_vocab!r} does not exist")
        return cfg.task.answer_vocab
    folders = []
    for path in resolve_shards(cfg.task.train_shards, "task.train_shards"):
        folder = os.path.dirname(path)
        if folder not in folders:
            folders.append(folder)
    for folder in folders:
        candidate = os.path.join(folder, VOCAB_FILE)
        if os.path.exists(candidate):
            return candidate
    raise ConfigError(f"no {VOCAB_FILE} beside the VQAv2 train shards ({', '.join(folders)}): dataprep writes it "
                      "with the vqav2 shards; or set task.answer_vocab=PATH")


class VQACollator(TextCollator):
    def __init__(self, tokenizer, max_len: int, answer_index: dict[str, int]):
        super().__init__(tokenizer, max_len, keep=("question_id", "answers"))
        self.answer_index = answer_index

    def __call__(self, examples: list[dict], images=None) -> dict:
        batch = super().__call__(examples, images)
        targets = torch.zeros(len(examples), len(self.answer_index))
        for row, example in enumerate(examples):
            for answer, score in example["answers"].items():
                column = self.answer_index.get(answer)
                if column is not None:
                    targets[row, column] = float(score)
        batch["targets"] = targets
        return batch


class VQATask(FinetuneTask):
    name = "vqav2"
    head_prefixes = checkpoint_heads = ("classifier.",)
    default_head_lr_mult = 50.0
    hflip = False  # released albef_randaug_wohf: no flip, no colour ops (questions name sides and colours)
    colour_ops = False

    def __init__(self, cfg: Config):
        vocab_path = find_answer_vocab(cfg)
        answers = load_answer_vocab(vocab_path)
        super().__init__(cfg)
        self.vocab_path, self.answers = vocab_path, answers
        if cfg.task.num_classes and cfg.task.num_classes != len(self.answers):
            raise ConfigError(f"task.num_classes={cfg.task.num_classes} but {self.vocab_path} holds "
                              f"{len(self.answers)} answers: set task.num_classes=0 to take the vocabulary's size")
        self.answer_index = {a: i for i, a in enumerate(self.answers)}
        dim = cfg.model.hidden_size
        self.classifier = ClassifierHead(2 * dim, 4 * dim, len(self.answers))
        self.classifier.apply(init_new_weights)

    def expand(self, meta: dict, rng=None) -> list[dict]:
        """Training examples: the questions with at least one answer in the vocabulary."""
        return [example for example in self.expand_eval(meta)
                if any(answer in self.answer_index for answer in example["answers"])]

    def expand_eval(self, meta: dict, rng=None) -> list[dict]:
        """Evaluation examples: every question (test-dev / test-std ones have no answers)."""
        return [{"text": q["question"], "question_id": q["question_id"], "answers": dict(q.get("answers") or {})}
                for q in meta.get("questions") or [] if q.get("question")]

    def make_collator(self, train: bool):
        return VQACollator(self.tokenizer, self.cfg.model.max_text_len, self.answer_index)

    def logits(self, batch: dict) -> torch.Tensor:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"].to(self.dtype))
        return self.classifier(out.cls_feats).float()

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch)
        targets = batch["targets"].to(logits)
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        with torch.no_grad():
            best = logits.argmax(-1)
            score = targets.gather(1, best[:, None]).mean()
        return {"loss": loss, "acc_vqa_score": score, "batch_size": logits.shape[0],
                "tokens": batch["attention_mask"].sum()}

    def eval_batch(self, batch: dict) -> list[dict]:
        best = self.logits(batch).argmax(-1).tolist()
        return [{"question_id": qid, "answer": self.answers[b], "answers": answers}
                for qid, b, answers in zip(batch["question_id"], best, batch["answers"])]

    def eval_metrics(self, records: list[dict]) -> dict:
        scored = [r for r in records if r["answers"]]  # test-dev / test-std have no answers: predictions only
        if not scored:
            return {"questions": float(len(records))}
        _, majority = metrics.vqa_majority_baseline([r["answers"] for r in scored])
        return {"vqa_score": metrics.vqa_score([r["answer"] for r in scored], [r["answers"] for r in scored]),
                "vqa_score_majority": majority, "questions": float(len(records))}

    def write_predictions(self, records: list[dict]):
        path = self.predictions_path("json")
        with open(path, "w") as handle:
            json.dump([{"question_id": r["question_id"], "answer": r["answer"]} for r in records], handle)
        return path
