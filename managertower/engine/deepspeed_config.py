"""The DeepSpeed config: engine knobs from ds_configs/, batch sizes and clipping from the recipe."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError, TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def effective_precision(train: TrainConfig) -> str:
    """bf16/fp16 need CUDA here; the CPU runs fp32."""
    return train.precision if torch.cuda.is_available() else "fp32"


def build_ds_config(train: TrainConfig, world_size: int) -> tuple[dict, Path]:
    """(config, the file it came from)."""
    precision = effective_precision(train)
    path = Path(train.ds_config) if train.ds_config else DS_CONFIG_DIR / f"zero{train.zero_stage}_{precision}.json"
    if not path.exists():
        raise ConfigError(f"DeepSpeed config {path} does not exist: set train.ds_config to a file in {DS_CONFIG_DIR} "
                          "or pick train.zero_stage / train.precision that one exists for")
    with open(path) as handle:
        config = json.load(handle)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
                "scheduler"):
        if key in config:
            raise ConfigError(f"{path} sets {key!r}: ds_configs hold engine knobs only; batch sizes, optimizer "
                              "and schedule come from the recipe (train.*)")
    if not torch.cuda.is_available():
        # The CPU has no fp16/bf16 engine path worth using: run fp32 and say so once in the log.
        config.pop("bf16", None)
        config.pop("fp16", None)
    config["train_batch_size"] = train.global_batch
    config["train_micro_batch_size_per_gpu"] = train.micro_batch
    config["gradient_accumulation_steps"] = train.grad_accum(world_size)
    if train.grad_clip > 0:
        config["gradient_clipping"] = train.grad_clip
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, path
