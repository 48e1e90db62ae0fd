"""The DeepSpeed config: the ZeRO layout from the ds_configs package (or train.ds_config), precision, batch sizes
and clipping from the recipe."""
from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

import torch

from ..config import DS_LAYOUTS, DS_PRECISION_SECTIONS, TrainConfig, read_ds_config

# What build_ds_config writes for train.precision when the file has no precision section of its own.
PRECISION_SECTIONS = {
    # gradients accumulate in fp32 over the 16-512 micro-steps of a large global batch (bf16 keeps 8 bits of
    # mantissa: a sum of hundreds of small gradients loses most of them)
    "bf16": {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
    # dynamic loss scaling from 2^16, halved after 2 overflows, doubled after 1000 clean steps
    "fp16": {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}},
    "fp32": {},
}


def effective_precision(train: TrainConfig) -> str:
    """bf16/fp16 need CUDA here; the CPU runs fp32."""
    return train.precision if torch.cuda.is_available() else "fp32"


def precision_notes(train: TrainConfig) -> list[str]:
    """The log lines saying the run trains in another precision than train.precision asked for (and why)."""
    if effective_precision(train) != train.precision:
        return [f"train.precision={train.precision} needs CUDA: running fp32 on the CPU"]
    return []


def layout_path(train: TrainConfig) -> Path:
    """The ds_configs file of (train.zero_stage, train.offload), found as package data of `ds_configs`."""
    return Path(str(resources.files("ds_configs") / DS_LAYOUTS[(train.zero_stage, train.offload)]))


def build_ds_config(train: TrainConfig, world_size: int, precision: str | None = None) -> tuple[dict, Path]:
    """(config, the file it came from): the layout file (or train.ds_config, checked against the recipe) plus
    the ZeRO stage and precision section it leaves out, batch sizes and clipping. `precision` is what the engine
    runs: effective_precision(train) unless given."""
    if train.ds_config:
        path = Path(train.ds_config)
        config = read_ds_config(train)
    else:
        path = layout_path(train)
        config = json.loads(path.read_text())
    config.setdefault("zero_optimization", {}).setdefault("stage", train.zero_stage)
    precision = precision or effective_precision(train)
    if precision == "fp32":
        # The CPU has no fp16/bf16 engine path worth using: run fp32 (the loop says so once in the log).
        for section in DS_PRECISION_SECTIONS:
            config.pop(section, None)
    elif not any(section in config for section in DS_PRECISION_SECTIONS):
        config.update(copy.deepcopy(PRECISION_SECTIONS[precision]))
    config["train_batch_size"] = train.global_batch
    config["train_micro_batch_size_per_gpu"] = train.micro_batch
    config["gradient_accumulation_steps"] = train.grad_accum(world_size)
    if train.grad_clip > 0:
        config["gradient_clipping"] = train.grad_clip
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, path
