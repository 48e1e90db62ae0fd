"""What every task (pre-training and each fine-tuning task) gives the engine: the one task interface.

A task is an `nn.Module` holding the tower and its heads; the engine wraps the task (never a bare model), so
DeepSpeed, checkpoints, logging and the loop are the same for all tasks. A task differs only in its data,
heads, objective and metrics. What the engine calls:

    forward(batch) -> {"loss", "loss_*", "acc_*", "batch_size", "tokens"}   the objective of one micro-batch
    total_steps() -> int                        the run's optimizer steps (the one place this is decided)
    build_loader(split, rank, world, device)    the data ("train": endless, shuffled; "eval": one pass)
    evaluate(rank, world, device) -> {metric}   the same dict on every rank
    lr_multiplier(name) -> float                the parameter groups' lr factor
    after_optimizer_step()                      after every optimizer step, on every rank (ITC temperature clamp)
    train_flops_per_sample() -> float | None    for the MFU estimate (None: not counted)
    manager_weights() -> {name: tensor}         the managers' aggregation weights (pictures, histograms)
    load_tower_weights(state_dict, source)      start from a pre-trained tower

What a task declares about its data (`data(split, rank)`, `images`, `hflip`): which shards, how one shard sample
expands into examples (`expand(meta, rng)`: one per caption, question, hypothesis...), its collator and its
augmentation. `build_loader` turns that and the config into one `LoaderSpec`; nothing else builds loaders.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..config import Config
from ..data.loader import Collator, Expand, LoaderSpec, build_loader
from ..data.shards import PRIMARY_IMAGE
from ..model import ITCHead, ManagerTower
from ..model.experts import resize_pos_embed

SPLITS = ("train", "eval")


@dataclass
class TaskData:
    """What a task reads for one split: the datasets' shard paths (one list per dataset), their mixing
    weights, how a sample expands into examples, the collator and the image transform (data/augment.py:
    "clip" pre-training, "albef" fine-tuning evaluation, "albef_randaug" fine-tuning training)."""

    shards: Sequence[Sequence[str]]
    expand: Expand
    collate: Collator
    weights: Sequence[float] | None = None
    transform: str = "clip"

EXPERT_PREFIXES = ("model.text_expert.", "model.vision_expert.")
# Trained at the base lr with the experts, as released: the type and layer-index embeddings and the ITC temperature
# (the released rule gives the larger lrs only to names with "cross_modal" in them and to the task heads).
BASE_LR_PREFIXES = EXPERT_PREFIXES + ("model.type_embedding.", "model.text_layer_embedding.",
                                      "model.image_layer_embedding.")
BASE_LR_SUFFIXES = (".learned_temperature",)


class Task(nn.Module):
    name = "task"
    head_prefixes: tuple[str, ...] = ()  # parameters trained at task.head_lr_mult (fine-tuning heads)
    # heads that start from a checkpoint's when it holds them whole (checkpoint.init_from / --from): the
    # pre-training heads, retrieval's ITM and ITC heads, a fine-tuned checkpoint's own classifier
    checkpoint_heads: tuple[str, ...] = ()
    heads_from_checkpoint: list[str] = []
    head_lr_mult: float = 1.0
    images: tuple[str, ...] = (PRIMARY_IMAGE,)  # the image members of a shard sample this task reads
    # Training augmentation (released albef_randaug_wc): horizontal flips and RandomAugment's colour ops; VQA
    # turns both off (released albef_randaug_wohf: questions name sides and colours).
    hflip = True
    colour_ops = True

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # New weights are a function of train.seed: the same command builds the same model on every rank and in
        # every run (DeepSpeed broadcasts rank 0's weights anyway, but runs must be comparable).
        torch.manual_seed(cfg.train.seed)
        self.model = ManagerTower(cfg.model)

    # --- optimisation -----------------------------------------------------------------------------------
    def lr_multiplier(self, name: str) -> float:
        """Experts, type and layer-index embeddings and the ITC temperature x1; heads named by `head_prefixes`
        x head_lr_mult; the rest of the tower (projections, cross-modal layers, poolers, managers)
        x train.new_layer_lr_mult."""
        if name.startswith(BASE_LR_PREFIXES) or name.endswith(BASE_LR_SUFFIXES):
            return 1.0
        if self.head_prefixes and name.startswith(self.head_prefixes):
            return self.head_lr_mult
        return self.cfg.train.new_layer_lr_mult

    def after_optimizer_step(self) -> None:
        """Called by the loop after every optimizer step, on every rank: clamps each ITC head's temperature into
        its range in place (ITCHead.clamp_temperature; a collective under ZeRO)."""
        for module in self.modules():
            if isinstance(module, ITCHead):
                module.clamp_temperature()

    def total_steps(self) -> int:
        """The run's optimizer steps: `train.steps` (fine-tuning tasks derive them from `task.epochs`)."""
        return self.cfg.train.steps

    # --- data ---------------------------------------------------------------------------------------------
    def data(self, split: str, rank: int) -> TaskData:
        """What this task reads for `split` ("train" or "eval") on `rank` (a collator may draw per rank)."""
        raise NotImplementedError

    def build_loader(self, split: str, rank: int, world_size: int, device: torch.device | str):
        """The loader of `split`: "train" is shuffled and endless (seeded by train.seed), "eval" one ordered pass
        over this rank's part (seed 0: the same examples whatever train.seed)."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {', '.join(SPLITS)}")
        data, cfg, train = self.data(split, rank), self.cfg, split == "train"
        return build_loader(LoaderSpec(
            shards=data.shards, weights=data.weights, expand=data.expand, collate=data.collate,
            batch_size=cfg.train.micro_batch, image_size=cfg.model.image_size, backend=cfg.data.backend,
            images=self.images, train=train, transform=data.transform, hflip=self.hflip,
            colour_ops=self.colour_ops, rank=rank,
            world_size=world_size, seed=cfg.train.seed if train else 0, num_threads=cfg.data.num_threads,
            shuffle_buffer=cfg.data.shuffle_buffer, max_bad_fraction=cfg.data.max_bad_fraction,
            example_pool=cfg.data.example_pool, device=device))

    # --- evaluation and reporting -------------------------------------------------------------------------
    def evaluate(self, rank: int, world_size: int, device: torch.device) -> dict:
        return {}

    def train_flops_per_sample(self) -> float | None:
        return None

    def manager_weights(self) -> dict[str, torch.Tensor]:
        return self.model.manager_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_proj.weight.dtype

    # --- weights ------------------------------------------------------------------------------------------
    def load_tower_weights(self, state_dict: dict, source: str = "") -> list[str]:
        """Load a pre-trained tower (keys `model.*` of a task checkpoint, or bare tower keys), resizing the
        vision position embeddings to this task's resolution, and each head of `checkpoint_heads` the checkpoint
        holds whole (`heads_from_checkpoint` names them). Returns the tower keys left at their new init."""
        prefix = "model."
        tower = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)} or dict(state_dict)
        pos_key = "vision_expert.visual.positional_embedding"
        if pos_key in tower:
            current = self.model.vision_expert.visual.positional_embedding
            if tower[pos_key].shape != current.shape:
                grid = int(math.isqrt(current.shape[0] - 1))
                tower[pos_key] = resize_pos_embed(tower[pos_key].float(), grid)
        missing, unexpected = self.model.load_state_dict(tower, strict=False)
        if unexpected:
            raise ValueError(f"checkpoint {source} does not fit this model ({len(unexpected)} unexpected keys, "
                             f"e.g. {unexpected[:3]}): check model.size / model.manager match the pre-training run")
        self.heads_from_checkpoint = self._load_heads(state_dict)
        return missing

    def _load_heads(self, state_dict: dict) -> list[str]:
        """The heads of `checkpoint_heads` whose every tensor the checkpoint holds under the same name and shape,
        loaded; a head it holds in part or in another shape (another task's classifier) starts new."""
        own, loaded = self.state_dict(), []
        for prefix in self.checkpoint_heads:
            mine = {name: value for name, value in own.items() if name.startswith(prefix)}
            if mine and all(name in state_dict and state_dict[name].shape == value.shape
                            for name, value in mine.items()):
                self.load_state_dict({name: state_dict[name] for name in mine}, strict=False)
                loaded.append(prefix.rstrip("."))
        return loaded
