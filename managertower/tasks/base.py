"""What every task (pre-training and each fine-tuning task) gives the engine.

A task is an `nn.Module` holding the tower and its heads. `forward(batch)` returns a dict of scalars with
"loss"; the engine wraps the task (never a bare model), so DeepSpeed, checkpoints, logging and the loop are
the same for all tasks. A task differs only in its data, heads, objective and metrics.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import Config
from ..model import ManagerTower
from ..model.experts import resize_pos_embed

EXPERT_PREFIXES = ("model.text_expert.", "model.vision_expert.")


class Task(nn.Module):
    name = "task"
    head_prefixes: tuple[str, ...] = ()  # parameters trained at task.head_lr_mult (fine-tuning heads)
    head_lr_mult: float = 1.0

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # New weights are a function of train.seed: the same command builds the same model on every rank and in
        # every run (DeepSpeed broadcasts rank 0's weights anyway, but runs must be comparable).
        torch.manual_seed(cfg.train.seed)
        self.model = ManagerTower(cfg.model)

    # --- optimisation -----------------------------------------------------------------------------------
    def lr_multiplier(self, name: str) -> float:
        """Experts x1; heads named by `head_prefixes` x head_lr_mult; the rest of the tower x train.head_lr_mult."""
        if name.startswith(EXPERT_PREFIXES):
            return 1.0
        if self.head_prefixes and name.startswith(self.head_prefixes):
            return self.head_lr_mult
        return self.cfg.train.head_lr_mult

    def total_steps(self, world_size: int) -> int:
        return self.cfg.train.steps

    # --- data and metrics (implemented by each task) ------------------------------------------------------
    def build_train_loader(self, rank: int, world_size: int, device: torch.device):
        raise NotImplementedError

    def evaluate(self, rank: int, world_size: int, device: torch.device) -> dict:
        return {}

    @property
    def dtype(self) -> torch.dtype:
        return self.model.text_proj.weight.dtype

    # --- weights ------------------------------------------------------------------------------------------
    def load_tower_weights(self, state_dict: dict, source: str = "") -> list[str]:
        """Load a pre-trained tower (keys `model.*` of a task checkpoint, or bare tower keys), resizing the
        vision position embeddings to this task's resolution. Returns the keys left at their new init."""
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
        return missing
