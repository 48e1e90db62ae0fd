"""Parameter groups, optimizer and learning-rate schedule (the paper, Tables 8 and 9).

Groups: {expert, new, head} x {decay, no decay}. The experts, the type and layer-index embeddings and the ITC
temperature train at the base lr; the projections, cross-modal layers, poolers and managers at
`train.new_layer_lr_mult` x lr; a fine-tuning task's heads at its `task.head_lr_mult` (the task's `lr_multiplier`
says which is which). Which parameters get no weight decay is `train.no_decay`: the released code's rule
(`released_no_decay`) or every bias, LayerNorm weight and temperature (`all_norms_no_decay`).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import TrainConfig

OPTIMIZER_KINDS = ("torch_adamw", "fused_adam", "cpu_adam")


def all_norms_no_decay(name: str) -> bool:
    """Biases, every LayerNorm (ours, transformers' `LayerNorm`, open_clip's `ln_*`) and temperatures."""
    return name.endswith(".bias") or "norm" in name.lower() or ".ln_" in name or "temperature" in name


# LayerNorm weights named `*norm.weight` here that the released code's modules hold in lists or Sequentials, where
# its rule (a name containing "LayerNorm.weight" or "norm.weight") does not find them: the LayerNorm of C among
# each manager's per-input LayerNorms (`LayerNorm.{N}.weight`) and the classifiers' (`vqa_classifier.1.weight`).
RELEASED_DECAYED_NORMS = ("prev_norm.weight", "classifier.norm.weight")


def released_no_decay(name: str) -> bool:
    """The released code's rule on our names: no decay for every name with "bias" in it and for the LayerNorms its
    modules call `LayerNorm` / `*norm` (the text expert's, the cross-modal layers', the MLM head's, the fused
    query's, BridgeTower's). So, unlike `all_norms_no_decay`, these are decayed: open_clip's `ln_*` (CLIP's
    LayerNorms are `ln_1`, `ln_2`, `ln_pre`, `ln_post` there), the managers' per-input LayerNorm weights and
    the one of C, SAE's history LayerNorms, the classifiers' LayerNorm, and every temperature."""
    if "bias" in name:
        return True
    return name.lower().endswith("norm.weight") and not name.endswith(RELEASED_DECAYED_NORMS)


NO_DECAY_RULES = {"released": released_no_decay, "all_norms": all_norms_no_decay}


def param_groups(module: nn.Module, train: TrainConfig, lr_multiplier: Callable[[str], float]) -> list[dict]:
    groups: dict[tuple[float, bool], dict] = {}
    is_no_decay = NO_DECAY_RULES[train.no_decay]
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        mult = lr_multiplier(name)
        no_decay = is_no_decay(name)
        key = (mult, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": train.lr * mult, "lr_mult": mult,
                           "weight_decay": 0.0 if no_decay else train.weight_decay}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    ordered = [groups[k] for k in sorted(groups)]
    for group in ordered:
        group["initial_lr"] = group["lr"]
    return ordered


def optimizer_kind(train: TrainConfig, cuda: bool | None = None) -> str:
    """Which AdamW runs: one of OPTIMIZER_KINDS.

    With ZeRO-Offload (train.offload) the step runs in host memory and DeepSpeed accepts only its CPU Adam
    there (it refuses FusedAdam); otherwise `auto` is DeepSpeed's fused Adam on GPUs and torch AdamW on the CPU
    (no native build needed), and `deepspeed_adam` is the fused one on GPUs, the CPU one without CUDA.
    (The config refuses train.optimizer=torch_adamw with offload.)"""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if train.offload != "none":
        return "cpu_adam"
    if train.optimizer == "torch_adamw" or (train.optimizer == "auto" and not cuda):
        return "torch_adamw"
    return "fused_adam" if cuda else "cpu_adam"


def build_optimizer(groups: list[dict], train: TrainConfig) -> torch.optim.Optimizer:
    """The AdamW of optimizer_kind(train) over `groups` (their "names" lists stay out of the optimizer)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    kind = optimizer_kind(train)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(clean, lr=train.lr, betas=train.betas, eps=train.eps, adam_w_mode=True)
    if kind == "cpu_adam":  # a native op, compiled at first use (minutes, once per machine)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(clean, lr=train.lr, betas=train.betas, eps=train.eps, adamw_mode=True)
    return torch.optim.AdamW(clean, lr=train.lr, betas=train.betas, eps=train.eps)


def warmup_linear_decay(total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """lr multiplier at optimizer step s (0-based): linear 0 -> 1 over warm-up, the first step at lr 0 (as the
    released code's schedule, transformers' get_polynomial_decay_schedule_with_warmup), then linear 1 -> min_ratio
    at the end."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return step / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return max(min_ratio, 1.0 - progress * (1.0 - min_ratio))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int | None = None):
    total = total_steps or train.steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_linear_decay(total, train.warmup_steps(), train.min_lr_ratio))
