"""What the fine-tuning tasks share (docs/recipe.md §3): data, schedule from epochs, evaluation plumbing.

A fine-tuning task is a `Task` (tasks/base.py) that implements
  expand(meta, rng) -> examples    one image sample's metadata -> its training examples (expand_eval: eval)
  make_collator(train)             -> the Collator making the text side of a batch (the loader adds pixels)
  forward(batch)                   -> {"loss", "acc_*", "batch_size", "tokens"}
  eval_batch / eval_metrics        records per example -> {metric: float}; rank 0 writes RUN/predictions_*

Data: `task.train_shards` (globs/folders/brace ranges of dataprep shards) form ONE dataset (VQAv2's
train+val is two globs of one list); `task.eval_shards` is read once, in order, split over the ranks.
Steps: with `task.epochs > 0`, total_steps() = ceil(epochs x examples / global_batch); the examples are counted
from the shards' metadata through the DALI index (only the .json members are read), so the schedule does not
depend on the number of ranks.
"""
from __future__ import annotations

import math
import random
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import dist
from ..config import Config, ConfigError
from ..data.loader import Collator
from ..data.shards import iter_metadata, resolve_shards
from ..model import load_tokenizer
from . import metrics
from .base import Task, TaskData


# ------------------------------------------------------------------------------------------------- batches


class TextCollator(Collator):
    """examples -> {input_ids, attention_mask} (B x max_len, padded) + tensors of the `labels` keys + lists of
    the `keep` keys (ids for prediction files)."""

    def __init__(self, tokenizer, max_len: int, labels: tuple[str, ...] = (), keep: tuple[str, ...] = ()):
        self.tokenizer, self.max_len, self.labels, self.keep = tokenizer, max_len, labels, keep

    def tokenize(self, texts: list[str]) -> dict:
        encoded = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"].long(), "attention_mask": encoded["attention_mask"].long()}

    def __call__(self, examples: list[dict], images=None) -> dict:
        batch = self.tokenize([e["text"] for e in examples])
        for key in self.labels:
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.long)
        for key in self.keep:
            batch[key] = [e[key] for e in examples]
        return batch


# ---------------------------------------------------------------------------------------------------- task


class FinetuneTask(Task):
    """A fine-tuning task; subclasses set `name`, `head_prefixes`, `default_head_lr_mult`, `images`, `hflip`
    and implement expand / make_collator / forward / eval_batch / eval_metrics / write_predictions."""

    default_head_lr_mult = 1.0  # docs/recipe.md §3.1 "head lr x"; task.head_lr_mult > 0 overrides it

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.task.name != self.name:
            raise ConfigError(f"task.name={cfg.task.name!r} but this is the {self.name} task")
        self.head_lr_mult = cfg.task.head_lr_mult or self.default_head_lr_mult
        self._tokenizer = None
        self.run_dir = Path(cfg.run.dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    # --- per task ---------------------------------------------------------------------------------------
    def expand(self, meta: dict, rng: random.Random | None = None) -> list[dict]:
        raise NotImplementedError

    def expand_eval(self, meta: dict, rng: random.Random | None = None) -> list[dict]:
        return self.expand(meta, rng)

    def make_collator(self, train: bool) -> Collator:
        raise NotImplementedError

    # --- data and schedule --------------------------------------------------------------------------------
    def shard_paths(self, split: str) -> list[str]:
        key = "train_shards" if split == "train" else "eval_shards"
        return resolve_shards(getattr(self.cfg.task, key), f"task.{key}")

    def data(self, split: str, rank: int) -> TaskData:
        train = split == "train"
        return TaskData(shards=[self.shard_paths(split)], expand=self.expand if train else self.expand_eval,
                        collate=self.make_collator(train=train),
                        transform="albef_randaug" if (train and self.cfg.task.augment) else "albef")

    def train_examples(self) -> int:
        return sum(len(self.expand(meta)) for meta in iter_metadata(self.shard_paths("train")))

    def total_steps(self) -> int:
        """train.steps, or with task.epochs > 0 ceil(epochs x training examples / global batch)."""
        return self._epoch_steps if self.cfg.task.epochs > 0 else self.cfg.train.steps

    @cached_property
    def _epoch_steps(self) -> int:
        examples = self.train_examples()
        if examples == 0:
            raise ConfigError(f"task.train_shards hold no {self.name} examples: check the globs point at "
                              f"{self.name} shards")
        return max(1, math.ceil(self.cfg.task.epochs * examples / self.cfg.train.global_batch))

    # --- evaluation (classification tasks; retrieval overrides evaluate) ----------------------------------
    def eval_batch(self, batch: dict) -> list[dict]:
        """One record per example (what the prediction file and the metrics need)."""
        raise NotImplementedError

    def eval_metrics(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def write_predictions(self, records: list[dict]) -> Path | None:
        return None

    def predictions_path(self, suffix: str) -> Path:
        return self.run_dir / f"predictions_{self.name}_{self.cfg.task.eval_split}.{suffix}"

    def evaluate(self, rank: int, world_size: int, device: torch.device) -> dict:
        if not self.cfg.task.eval_shards:
            return {}
        loader = self.build_loader("eval", rank, world_size, device)
        records: list[dict] = []
        try:
            for batch in loader:
                records += self.eval_batch(dist.batch_to_device(batch, device))
        finally:
            loader.close()
        records = dist.gather_objects(records)
        metrics = self.eval_metrics(records)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.write_predictions(records)
        return metrics


class ClassificationTask(FinetuneTask):
    """A task that classifies each example into `label_names` with cross-entropy (NLVR2, SNLI-VE): one example
    per statement, its id kept under `id_key` for the prediction file; metrics accuracy and the majority-class
    accuracy of the split."""

    label_names: tuple[str, ...] = ()
    id_key = "id"

    def logits(self, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def make_collator(self, train: bool):
        return TextCollator(self.tokenizer, self.cfg.model.max_text_len, labels=("label",), keep=(self.id_key,))

    def forward(self, batch: dict) -> dict:
        logits = self.logits(batch)
        loss = F.cross_entropy(logits, batch["label"])
        with torch.no_grad():
            acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return {"loss": loss, "acc": acc, "batch_size": logits.shape[0], "tokens": batch["attention_mask"].sum()}

    def eval_batch(self, batch: dict) -> list[dict]:
        pred = self.logits(batch).argmax(-1).tolist()
        return [{self.id_key: i, "prediction": p, "label": int(label)}
                for i, p, label in zip(batch[self.id_key], pred, batch["label"].tolist())]

    def eval_metrics(self, records: list[dict]) -> dict:
        if not records:
            return {}
        pred = torch.tensor([r["prediction"] for r in records])
        labels = torch.tensor([r["label"] for r in records])
        majority = torch.bincount(labels, minlength=len(self.label_names)).max().item() / len(records)
        return {"accuracy": metrics.accuracy(pred, labels), "examples": float(len(records)),
                "accuracy_majority": float(majority)}
