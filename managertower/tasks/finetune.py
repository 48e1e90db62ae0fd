"""What the fine-tuning tasks share (SPEC §3): data, schedule from epochs, evaluation plumbing, gathers.

A fine-tuning task is a `Task` (the engine's interface) with
  expand(meta) -> examples         one image sample's metadata -> its training/eval examples
  collate(examples, images)        -> the batch dict (text side; the loader adds `pixel_values`)
  forward(batch)                   -> {"loss", "acc_*", "batch_size", "tokens"}
  evaluate(rank, world, device)    -> {metric: float}, the same on every rank; rank 0 writes RUN/predictions_*

Data: `task.train_shards` (globs/folders/brace ranges of dataprep shards) form ONE dataset (VQAv2's
train+val is two globs of one list); `task.eval_shards` is read once, in order, split over the ranks.
Steps: with `task.epochs > 0`, train.steps = ceil(epochs x examples / global_batch); the examples are counted
from the shards' metadata through the DALI index (only the .json members are read), so the schedule does not
depend on the number of ranks.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .. import dist
from ..config import Config, ConfigError
from ..model import load_tokenizer
from . import metrics
from .base import Task


# --------------------------------------------------------------------------------------------- collectives


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_objects(items: list) -> list:
    """Concatenate every rank's list, in rank order, on every rank (world of one: the list itself)."""
    if not _distributed():
        return list(items)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def _padded_gather(tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    world = torch.distributed.get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    biggest = max(sizes)
    padded = tensor.new_zeros((biggest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return [part[:n] for part, n in zip(parts, sizes)], sizes


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (any count per rank), concatenated in rank order; no gradient."""
    if not _distributed():
        return tensor
    parts, _ = _padded_gather(tensor.detach())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the SUM over ranks of the incoming gradients:
    every rank's loss reads every rank's rows, so each rank's features get the gradients of all the losses."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts, sizes = _padded_gather(tensor)
        ctx.rank, ctx.sizes = torch.distributed.get_rank(), sizes
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows with gradients flowing back to the rank that owns each row (world of one: as is)."""
    if not _distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


# ---------------------------------------------------------------------------------------------------- data


def shard_paths(specs: list[str], what: str) -> list[str]:
    from ..data.shards import expand_shards

    if not specs:
        raise ConfigError(f"task.{what} is empty: give the shard globs `python -m dataprep` wrote, e.g. "
                          f"task.{what}=[shards/vqav2/train-*.tar]")
    paths: list[str] = []
    for spec in specs:
        try:
            paths += expand_shards(spec)
        except FileNotFoundError as error:
            raise ConfigError(f"task.{what}: {error}") from None
    return paths


def iter_metadata(paths: list[str]):
    """Each sample's metadata dict, read through the DALI index (the image members are never read)."""
    from ..data.shards import index_path_for, read_index

    for path in paths:
        index = index_path_for(path)
        if not os.path.exists(index):
            raise ConfigError(f"DALI index {index} is missing for shard {path}: rerun dataprep, or "
                              f"`wds2idx {path} {index}`")
        with open(path, "rb") as handle:
            for entry in read_index(index):
                if "json" not in entry:
                    continue
                offset, size = entry["json"]
                handle.seek(offset)
                try:
                    yield json.loads(handle.read(size))
                except ValueError:
                    continue  # a corrupt record: the loader skips it too


def count_examples(paths: list[str], expand: Callable[[dict], list]) -> int:
    return sum(len(expand(meta)) for meta in iter_metadata(paths))


class TextCollator:
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

    default_head_lr_mult = 1.0  # SPEC §3 Table 9 "head lr x"; task.head_lr_mult > 0 overrides it
    images: tuple[str, ...] = ("jpg",)
    # Horizontal flips: off where the text names sides (VQA: "at the top left"; the synthetic world names
    # positions in every task, so the tiny recipes turn augmentation off altogether).
    hflip = True

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.task.name != self.name:
            raise ConfigError(f"task.name={cfg.task.name!r} but this is the {self.name} task")
        self.head_lr_mult = cfg.task.head_lr_mult or self.default_head_lr_mult
        self._tokenizer = None
        if cfg.task.epochs > 0:
            cfg.train.steps = self.epoch_steps()
        self.run_dir = Path(cfg.run.dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    # --- per task ---------------------------------------------------------------------------------------
    def expand(self, meta: dict) -> list[dict]:
        raise NotImplementedError

    def expand_eval(self, meta: dict) -> list[dict]:
        return self.expand(meta)

    def make_collator(self, train: bool):
        raise NotImplementedError

    # --- schedule ---------------------------------------------------------------------------------------
    def train_examples(self) -> int:
        return count_examples(shard_paths(self.cfg.task.train_shards, "train_shards"), self.expand)

    def epoch_steps(self) -> int:
        examples = self.train_examples()
        if examples == 0:
            raise ConfigError(f"task.train_shards hold no {self.name} examples: check the globs point at "
                              f"{self.name} shards")
        return max(1, math.ceil(self.cfg.task.epochs * examples / self.cfg.train.global_batch))

    # --- loaders ------------------------------------------------------------------------------------------
    def _loader(self, paths: list[str], *, train: bool, rank: int, world_size: int, device, expand, collate):
        from ..data.pipelines import build_loader

        data = self.cfg.data
        return build_loader([paths], None, backend=data.loader, batch_size=self.cfg.train.micro_batch,
                            image_size=self.cfg.model.image_size, rank=rank, world_size=world_size,
                            seed=self.cfg.train.seed, expand=expand, collate=collate, images=self.images,
                            train=train, augment="finetune" if (train and self.cfg.task.augment) else "none",
                            hflip=self.hflip, num_threads=data.num_threads, shuffle_buffer=data.shuffle_buffer,
                            max_bad_fraction=data.max_bad_fraction, device=device, example_pool=data.example_pool)

    def build_train_loader(self, rank: int, world_size: int, device: torch.device):
        return self._loader(shard_paths(self.cfg.task.train_shards, "train_shards"), train=True, rank=rank,
                            world_size=world_size, device=device, expand=self.expand,
                            collate=self.make_collator(train=True))

    def build_eval_loader(self, rank: int, world_size: int, device: torch.device):
        return self._loader(shard_paths(self.cfg.task.eval_shards, "eval_shards"), train=False, rank=rank,
                            world_size=world_size, device=device, expand=self.expand_eval,
                            collate=self.make_collator(train=False))

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
        loader = self.build_eval_loader(rank, world_size, device)
        records: list[dict] = []
        try:
            for batch in loader:
                records += self.eval_batch(dist.batch_to_device(batch, device))
        finally:
            loader.close()
        records = gather_objects(records)
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
        return {"loss": loss, "acc": acc, "batch_size": logits.shape[0], "tokens": int(batch["attention_mask"].sum())}

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
