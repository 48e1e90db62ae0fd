"""The DeepSpeed config: the ZeRO layout from the ds_configs package (or train.ds_config), precision, batch sizes
and clipping from the recipe."""
from __future__ import annotations

import copy
import json
import os
import platform
from importlib import resources
from pathlib import Path

import torch

from ..config import DS_LAYOUTS, DS_PRECISION_SECTIONS, ConfigError, TrainConfig, read_ds_config

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


def runs_on_cpu(train: TrainConfig) -> bool:
    """Whether the engine trains on the CPU (DeepSpeed's CPU accelerator), by dist.device's rules: no CUDA,
    train.device=cpu, or DS_ACCELERATOR=cpu (which puts the batches on the CPU too, GPUs or not)."""
    return not torch.cuda.is_available() or train.device == "cpu" or os.environ.get("DS_ACCELERATOR") == "cpu"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86 (oneDNN then runs bf16 matrix
    products 2-3x faster than fp32), the BF16 extension on Arm. DeepSpeed's CPU accelerator answers True to
    is_bf16_supported() on every CPU, and torch.ops.mkldnn._is_mkldnn_bf16_supported() on any AVX512 CPU: without
    the instructions bf16 is emulated, slower than fp32 and no more exact."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def effective_precision(train: TrainConfig) -> str:
    """The precision the engine runs: train.precision on GPUs; on the CPU bf16 where it has bf16 instructions,
    else fp32 (fp16 always: DeepSpeed's fp16 engine with loss scaling is a GPU path)."""
    if not runs_on_cpu(train) or train.precision == "fp32":
        return train.precision
    return "bf16" if train.precision == "bf16" and cpu_has_bf16() else "fp32"


def precision_notes(train: TrainConfig) -> list[str]:
    """The log lines saying the run trains in another precision than train.precision asked for (and why).

    bf16 asked on a CPU without bf16 instructions runs fp32 with this note rather than stopping: the recipes
    (and TrainConfig) say bf16 for the GPUs they are written for, and the same file must still run on a login
    node, a laptop or CI; there emulated bf16 would be slower than fp32 and fp32 is at least as exact, so fp32
    is the run the user would have picked."""
    if effective_precision(train) == train.precision:
        return []
    if train.precision == "bf16":
        return ["train.precision=bf16 but this CPU has no bf16 instructions (AVX512-BF16 / AMX on x86, BF16 on "
                "Arm): running fp32, which is faster here (set train.precision=fp32 to silence this note)"]
    return [f"train.precision={train.precision} needs CUDA: running fp32 on the CPU (train.precision=bf16 runs "
            "bf16 on CPUs with bf16 instructions)"]


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
    if train.precision == "bf16" and train.zero_stage == 0:
        # Refused on every machine (also where this one would run fp32): the recipe cannot run on the GPUs it is
        # written for, better said by a CPU smoke test than by the first GPU job.
        raise ConfigError("train.precision=bf16 needs train.zero_stage >= 1: DeepSpeed accumulates gradients in "
                          "fp32 under bf16 only with its ZeRO optimizers (at stage 0 it refuses fp32 accumulation, "
                          "\"unsupported mix of model_dtype=torch.bfloat16 and grad_accum_dtype=torch.float32\"). "
                          "Set train.zero_stage=1 (the optimizer states sharded, nothing else changes) or "
                          "train.precision=fp32")
    precision = precision or effective_precision(train)
    if precision == "fp32":
        # fp32 asked, or a CPU without bf16: no precision section (the loop says so once in the log).
        for section in DS_PRECISION_SECTIONS:
            config.pop(section, None)
    elif not any(section in config for section in DS_PRECISION_SECTIONS):
        config.update(copy.deepcopy(PRECISION_SECTIONS[precision]))
    if precision == "bf16":  # a file of one's own with a bf16 section too, unless it says otherwise
        config.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    config["train_batch_size"] = train.global_batch
    config["train_micro_batch_size_per_gpu"] = train.micro_batch
    config["gradient_accumulation_steps"] = train.grad_accum(world_size)
    if train.grad_clip > 0:
        config["gradient_clipping"] = train.grad_clip
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("zero_allow_untested_optimizer", True)
    return config, path
