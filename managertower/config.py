"""Typed configuration: dataclasses that document and check themselves.

A recipe is a YAML file whose top-level sections match `Config`'s fields; `key=value` overrides use dotted
keys (`train.steps=10`, `model.manager=saue`). Every value is checked when the config is built, so a wrong
value fails in a second, before DeepSpeed, DALI or a model is started. An unknown key is an error that lists
the close matches; a renamed key (RENAMED_KEYS) is an error that names its new name.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .io import atomic_write


class ConfigError(ValueError):
    """A user-fixable problem in a recipe or an override; the message names the key and the fix."""


# The tasks, listed once: task.name, the task registry (managertower.tasks) and the finetune door use these.
TASK_NAMES = ("pretrain", "vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")
FINETUNE_TASKS = TASK_NAMES[1:]

MANAGER_KINDS = ("meter", "bridgetower", "sae", "saue", "aaue", "aaue_fused", "concat_attention", "cross_attention")
LAYER_NORM_BACKENDS = ("auto", "torch", "apex")
PRECISIONS = ("bf16", "fp16", "fp32")
DATA_BACKENDS = ("dali", "webdataset")
OFFLOADS = ("none", "optimizer", "all")

# Keys that were renamed (old -> new): a recipe or override with the old name fails with one line naming the new.
RENAMED_KEYS = {
    "train.head_lr_mult": "train.new_layer_lr_mult",
    "data.loader": "data.backend",
    "data.mlm_probability": "task.mlm_probability",
    "data.itm_negative_fraction": "task.itm_negative_fraction",
    "data.hard_negative_eval": "task.hard_negative_eval",
}


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """value > 0 (>= 0 with allow_zero) and finite: nan passes every comparison, so it is refused by name."""
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number {bound}, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be {bound}, got {value}")


def _check_fraction(name: str, value: float, low_open: bool = False, high_open: bool = False) -> None:
    """value in [0, 1], either end open on request; nan is outside every interval."""
    above = value > 0 if low_open else value >= 0
    below = value < 1 if high_open else value <= 1
    if not (above and below):
        raise ConfigError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value}")


# The shapes each model.size stands for. ModelConfig fills every one of these fields left None (unset) from its
# size, so ModelConfig(size="tiny") is the tiny tower however it is built; a value given explicitly wins.
SIZE_PRESETS = {
    # the paper: RoBERTa-base + CLIP ViT-B/16, 6 cross-modal layers of width 768, 288 px, 50 text tokens
    "base": dict(vision_expert="ViT-B-16-quickgelu", hidden_size=768, num_heads=12, intermediate_size=3072,
                 cross_layers=6, num_experts=6, image_size=288, max_text_len=50),
    # tests and the demo: 4-layer random-init experts, 2 cross-modal layers, 64 px
    "tiny": dict(vision_expert="tiny", hidden_size=64, num_heads=2, intermediate_size=128, cross_layers=2,
                 num_experts=2, image_size=64, max_text_len=24),
}


@dataclass
class ModelConfig:
    """The tower. `size` fills the shapes left unset (None) from SIZE_PRESETS; an explicit value wins."""

    size: str = "tiny"  # "base" (the paper: RoBERTa-base + CLIP ViT-B/16) or "tiny" (tests and the demo)
    # Text expert: a local Hugging Face model directory (AutoModel loads it: RoBERTa, BERT, ...). None builds
    # the size's architecture with random weights (tests, FLOP counting).
    text_expert: str | None = None
    tokenizer: str | None = None  # defaults to text_expert's own; tiny uses the bundled word-piece vocab
    text_config: dict = field(default_factory=dict)  # overrides of the random-init text architecture
    # Vision expert: an open_clip model name; `vision_checkpoint` a local open_clip checkpoint file.
    # None in the fields below marked "preset": the value of model.size (SIZE_PRESETS).
    vision_expert: str | None = None  # preset
    vision_checkpoint: str | None = None
    vision_config: dict = field(default_factory=dict)  # open_clip vision_cfg overrides (tiny)
    hidden_size: int | None = None  # preset
    num_heads: int | None = None  # preset
    intermediate_size: int | None = None  # preset
    cross_layers: int | None = None  # preset; L_C
    num_experts: int | None = None  # preset; N: the top N layers of each expert feed the managers
    manager: str = "aaue_fused"
    manager_weights: str = "vector"  # SAUE / SAE logits and W_C: "vector" (N x D, 1 x D) or "scalar" (N x 1, 1 x 1)
    manager_noise: str = "element"  # training noise eps per element of B x N x L x D (released) or "logits" (README)
    manager_mask_padding: bool = False  # the released code attends to padded text in the fused query
    image_size: int | None = None  # preset
    max_text_len: int | None = None  # preset
    dropout: float = 0.1
    layer_norm: str = "auto"  # auto: Apex fused LayerNorm on CUDA where Apex imports, else torch
    activation_checkpointing: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _check_choice("model.size", self.size, tuple(SIZE_PRESETS))
        for name, value in SIZE_PRESETS[self.size].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check_choice("model.manager", self.manager, MANAGER_KINDS)
        _check_choice("model.manager_weights", self.manager_weights, ("vector", "scalar"))
        _check_choice("model.manager_noise", self.manager_noise, ("element", "logits"))
        _check_choice("model.layer_norm", self.layer_norm, LAYER_NORM_BACKENDS)
        for name in ("hidden_size", "num_heads", "intermediate_size", "cross_layers", "num_experts",
                     "image_size", "max_text_len"):
            _check_positive(f"model.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"model.hidden_size={self.hidden_size} is not divisible by "
                              f"model.num_heads={self.num_heads}")
        _check_fraction("model.dropout", self.dropout, high_open=True)
        if self.manager == "bridgetower" and self.num_experts < self.cross_layers:
            raise ConfigError(f"model.manager=bridgetower feeds uni-modal layer L-N+l to cross-modal layer l, so "
                              f"model.num_experts ({self.num_experts}) must be >= model.cross_layers "
                              f"({self.cross_layers})")
        for path_key in ("text_expert", "tokenizer", "vision_checkpoint"):
            path = getattr(self, path_key)
            if path is not None and not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(f"model.{path_key}={path!r} does not exist: weights always come from a local "
                                  "path (a Hugging Face model folder for text, an open_clip checkpoint file "
                                  "for vision)")


@dataclass
class DataConfig:
    """Input pipeline. Shards come from `python -m dataprep`."""

    train_shards: list = field(default_factory=list)  # folders, globs or brace ranges; one entry per dataset
    weights: list = field(default_factory=list)  # mixing weights, one per train_shards entry (default equal)
    val_shards: list = field(default_factory=list)
    backend: str = "dali"  # "dali" (GPU "mixed" decoding on CUDA, CPU otherwise) or "webdataset" (PIL)
    per_caption: bool = True  # iterate over pairs (the paper's 9M) or one random caption per image
    num_threads: int = 2  # decoding threads (DALI) / worker processes (webdataset) per rank
    shuffle_buffer: int = 1000  # image samples shuffled per dataset stream (0: in shard order)
    # > 1: training batches are drawn at random from the examples (captions, questions, hypotheses) of this many
    # decoded images, so that one image's examples do not fill a batch together (e.g. 256); 1 (the default):
    # an image's examples go into batches side by side, in order. A pool costs example_pool decoded images of
    # memory on the batch device (256 x 288 px fp32: 255 MB); checkpoints keep their encoded bytes (DALI) or, on
    # the webdataset backend, the decoded images. Use 256 on real data; see the README (Data loading).
    example_pool: int = 1
    max_bad_fraction: float = 0.01  # corrupt samples tolerated before the run stops

    def __post_init__(self) -> None:
        _check_choice("data.backend", self.backend, DATA_BACKENDS)
        if isinstance(self.train_shards, str):
            self.train_shards = [self.train_shards]
        if isinstance(self.val_shards, str):
            self.val_shards = [self.val_shards]
        if self.weights and len(self.weights) != len(self.train_shards):
            raise ConfigError(f"data.weights has {len(self.weights)} entries but data.train_shards has "
                              f"{len(self.train_shards)}: give one weight per dataset")
        if any(w < 0 for w in self.weights):
            raise ConfigError(f"data.weights must be >= 0, got {self.weights}")
        _check_positive("data.num_threads", self.num_threads)
        _check_positive("data.shuffle_buffer", self.shuffle_buffer, allow_zero=True)
        _check_positive("data.example_pool", self.example_pool)
        _check_fraction("data.max_bad_fraction", self.max_bad_fraction)


# What a DeepSpeed config file may hold: engine knobs only. The recipe (train.*) owns these keys ...
DS_KEYS_FROM_RECIPE = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                       "optimizer", "scheduler")
# ... and the precision sections ("bfloat16" is DeepSpeed's other name for "bf16"), which build_ds_config
# writes from train.precision.
DS_PRECISION_SECTIONS = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16"}
# The ZeRO layouts shipped in the ds_configs package: (train.zero_stage, train.offload) -> file.
DS_LAYOUTS = {
    (0, "none"): "zero0.json",
    (1, "none"): "zero1.json",
    (2, "none"): "zero2.json",
    (3, "none"): "zero3.json",
    (2, "optimizer"): "zero2_offload.json",
    (3, "all"): "zero3_offload.json",
}
OFFLOADED = {"none": "nothing", "optimizer": "the optimizer", "all": "the optimizer and the parameters"}


@dataclass
class TrainConfig:
    """Optimisation. global_batch = micro_batch x grad_accum x world_size (grad_accum is solved)."""

    steps: int = 100_000
    global_batch: int = 4096
    micro_batch: int = 8
    lr: float = 1e-5
    # lr x of the layers new to the tower: projections, cross-modal layers, poolers, managers (and the
    # pre-training heads), the paper's Table 8 "5x". The experts, the type and layer-index embeddings and the ITC
    # temperature train at lr (as released); fine-tuning heads at task.head_lr_mult.
    new_layer_lr_mult: float = 5.0
    weight_decay: float = 0.01
    no_decay: str = "released"  # parameters without weight decay: the released code's rule or "all_norms" (README)
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1  # fraction of steps (< 1) or a number of steps (>= 1)
    min_lr_ratio: float = 0.0  # linear decay to lr * min_lr_ratio
    grad_clip: float = 0.0  # 0 disables
    # bf16 on GPUs and on CPUs with bf16 instructions (AVX512-BF16 / AMX, Arm BF16: deepspeed_config.cpu_has_bf16);
    # other CPUs run fp32 and the log says so. bf16 needs zero_stage >= 1 (fp32 gradient accumulation).
    precision: str = "bf16"
    zero_stage: int = 2
    # ZeRO-Offload to host memory: "none", "optimizer" (with zero_stage 2: optimizer states and step) or "all"
    # (with zero_stage 3: optimizer and parameters). Offload steps with DeepSpeed's CPU Adam (optimizer=auto).
    offload: str = "none"
    # None: the ds_configs layout of zero_stage + offload. An expert's own DeepSpeed JSON: engine knobs only; the
    # ZeRO stage, precision and offload it sets must agree with the keys above (see ds_configs/README.md).
    ds_config: str | None = None
    optimizer: str = "auto"  # auto: fused Adam(W) on GPUs, DeepSpeed's CPU Adam with offload, torch AdamW on CPU
    # auto: this rank's GPU where torch sees one, else the CPU; cuda: a GPU or a clear error (no silent CPU run)
    device: str = "auto"
    # An fp32 run's matrix products and convolutions on CUDA use TF32 tensor cores (10-bit mantissa inputs, fp32
    # accumulation: ~8x the fp32 rate on A100/H100); false keeps them strict IEEE fp32. No effect on the CPU.
    tf32: bool = True
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 20

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "micro_batch", "lr", "log_every", "eval_batches"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("new_layer_lr_mult", "weight_decay", "eps", "warmup", "grad_clip", "eval_every"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _check_fraction("train.min_lr_ratio", self.min_lr_ratio)
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.no_decay", self.no_decay, ("released", "all_norms"))
        _check_choice("train.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _check_choice("train.offload", self.offload, OFFLOADS)
        _check_choice("train.optimizer", self.optimizer, ("auto", "torch_adamw", "deepspeed_adam"))
        _check_choice("train.device", self.device, ("auto", "cuda", "cpu"))
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.global_batch % self.micro_batch:
            raise ConfigError(f"train.global_batch={self.global_batch} is not a multiple of "
                              f"train.micro_batch={self.micro_batch}")
        if self.offload != "none" and self.optimizer == "torch_adamw":
            raise ConfigError(f"train.optimizer=torch_adamw cannot run with train.offload={self.offload}: ZeRO-Offload "
                              "steps in host memory with DeepSpeed's CPU Adam; use train.optimizer=auto")
        if self.ds_config is not None:
            read_ds_config(self)  # checked now, before DeepSpeed starts
        elif (self.zero_stage, self.offload) not in DS_LAYOUTS:
            raise ConfigError(f"train.offload={self.offload} with train.zero_stage={self.zero_stage} is not a ZeRO "
                              "layout in ds_configs: offload=optimizer goes with zero_stage=2, offload=all with "
                              "zero_stage=3 (or give train.ds_config a file of your own)")

    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps for this world size; an impossible split is a clear error."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={self.global_batch} is not divisible by micro_batch x world_size = "
                f"{self.micro_batch} x {world_size} = {per_step}; change train.micro_batch or the number of "
                "ranks so that the product divides the global batch")
        return self.global_batch // per_step


def read_ds_config(train: TrainConfig) -> dict:
    """train.ds_config's JSON, checked against the recipe: no batch sizes, optimizer or schedule (train.* owns
    them), and the ZeRO stage, precision and offload it sets agree with train.zero_stage, train.precision and
    train.offload (the recipe stays the one place that says them; the optimizer choice reads train.offload)."""
    name = f"train.ds_config={train.ds_config}"
    if not os.path.isfile(train.ds_config):
        raise ConfigError(f"{name} does not exist: give a DeepSpeed JSON file, or leave it unset for the ds_configs "
                          "layout of train.zero_stage and train.offload")
    with open(train.ds_config) as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{name} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{name} must hold a JSON object of DeepSpeed settings")
    for key in DS_KEYS_FROM_RECIPE:
        if key in config:
            raise ConfigError(f"{name} sets {key!r}: ds_configs hold engine knobs only; batch sizes, optimizer and "
                              "schedule come from the recipe (train.*)")
    zero = config.get("zero_optimization") or {}
    if "stage" in zero and zero["stage"] != train.zero_stage:
        raise ConfigError(f"{name} sets zero_optimization.stage={zero['stage']} but train.zero_stage={train.zero_stage}"
                          f": set train.zero_stage={zero['stage']} or drop the stage from the file")
    sections = [key for key in DS_PRECISION_SECTIONS if key in config]
    enabled = sorted({DS_PRECISION_SECTIONS[key] for key in sections
                      if isinstance(config[key], dict) and config[key].get("enabled", False)})
    if len(enabled) > 1:
        raise ConfigError(f"{name} enables both bf16 and fp16: enable at most one (train.precision={train.precision})")
    precision = enabled[0] if enabled else ("fp32" if sections else None)  # None: the file does not say
    if precision is not None and precision != train.precision:
        raise ConfigError(f"{name} sets precision {precision} (its {', '.join(sections)} section) but "
                          f"train.precision={train.precision}: set train.precision={precision}, or drop the section "
                          "and build_ds_config writes the recipe's")

    def offloaded(section: str) -> bool:
        return isinstance(zero.get(section), dict) and zero[section].get("device", "none") not in ("none", None)

    if offloaded("offload_param") and not offloaded("offload_optimizer"):
        raise ConfigError(f"{name} offloads the parameters but not the optimizer: train.offload names none, "
                          "optimizer or all (optimizer and parameters)")
    offload = "all" if offloaded("offload_param") else "optimizer" if offloaded("offload_optimizer") else "none"
    if offload != train.offload:
        raise ConfigError(f"{name} offloads {OFFLOADED[offload]} but train.offload={train.offload}: set "
                          f"train.offload={offload} (it also picks the optimizer: offload steps with DeepSpeed's "
                          "CPU Adam)")
    return config


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps; a final checkpoint is always written
    keep: int = 3  # the newest M complete checkpoints are kept
    resume: str = "auto"  # auto: newest complete checkpoint under run.dir, if any; "none"; or a path
    # weights only (fine-tuning): a DeepSpeed folder, an exported .pt, or a weights folder (docs/weights.md)
    init_from: str | None = None

    def __post_init__(self) -> None:
        _check_positive("checkpoint.every", self.every)
        _check_positive("checkpoint.keep", self.keep)
        if self.resume not in ("auto", "none") and not os.path.exists(self.resume):
            raise ConfigError(f"checkpoint.resume={self.resume!r} is neither auto, none nor an existing checkpoint "
                              "folder; use resume=auto (the newest under run.dir), resume=none or a step-N folder")


@dataclass
class RunConfig:
    dir: str = "runs/pretrain"
    name: str = ""
    tensorboard: bool = True
    progress: bool = True


@dataclass
class TaskConfig:
    """The task and its objective: `name` picks the dataset, head and losses (fine-tuning: the paper, Table 9)."""

    name: str = "pretrain"
    train_shards: list = field(default_factory=list)
    eval_shards: list = field(default_factory=list)
    eval_split: str = "val"
    epochs: float = 0  # > 0: fine-tuning steps are derived from the dataset size
    num_classes: int = 0  # 0: taken from the data (VQA answer vocabulary)
    answer_vocab: str | None = None
    augment: bool = True
    retrieval_topk: int = 128
    # Retrieval ITM hard negatives from the whole global batch, every rank's examples (the released recipe);
    # false: from the rank's own micro-batch, which saves gathering every rank's uni-modal layers each step.
    retrieval_global_negatives: bool = True
    # The ranking retrieval reports as ir_*/tr_*: "itm" (the released: ITC top-k re-ranked by the ITM positive
    # logit) or "itc" (ITC alone; the tiny demo, whose 64-px ITM ranks below its ITC). Both are always reported.
    retrieval_rank: str = "itm"
    itc_dim: int = 256
    # Pre-training only: weight of an extra ITC loss on the uni-modal class features. The paper uses none (0);
    # the tiny demo's random-init experts use it to get past the long chance-level plateau of ITM.
    itc_weight: float = 0.0
    mlm_probability: float = 0.15  # pre-training MLM: the fraction of text tokens masked
    itm_negative_fraction: float = 0.5  # pre-training ITM: the fraction of pairs given another image
    # Pre-training eval: also score ITM against captions with one attribute swapped (colour, shape, ...). Only the
    # synthetic world of the demo can make such captions; the demo recipe (pretrain/configs/tiny.yaml) sets it.
    hard_negative_eval: bool = False
    # lr x of the task's new heads; 0: the paper's Table 9 (VQA 50, NLVR2 and SNLI-VE 10, retrieval ITC/ITM 5)
    head_lr_mult: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("task.name", self.name, TASK_NAMES)
        for key in ("train_shards", "eval_shards"):
            if isinstance(getattr(self, key), str):
                setattr(self, key, [getattr(self, key)])
        _check_positive("task.epochs", self.epochs, allow_zero=True)
        _check_positive("task.num_classes", self.num_classes, allow_zero=True)
        _check_positive("task.retrieval_topk", self.retrieval_topk)
        _check_choice("task.retrieval_rank", self.retrieval_rank, ("itm", "itc"))
        _check_positive("task.itc_dim", self.itc_dim)
        _check_positive("task.itc_weight", self.itc_weight, allow_zero=True)
        _check_positive("task.head_lr_mult", self.head_lr_mult, allow_zero=True)
        _check_fraction("task.mlm_probability", self.mlm_probability, low_open=True, high_open=True)
        _check_fraction("task.itm_negative_fraction", self.itm_negative_fraction)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        """The effective config (size presets filled in): load_config(path) builds the same Config."""
        atomic_write(path, yaml.safe_dump(_plain(self.to_dict()), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        hint = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += all_keys(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _parse_value(text: str) -> Any:
    """`key=value` values are YAML scalars or lists: 10, 1e-5, true, null, [a, b], a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _unknown_key(key: str) -> ConfigError:
    if key in RENAMED_KEYS:
        return ConfigError(f"config key {key!r} was renamed: use {RENAMED_KEYS[key]!r}")
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `--print-keys` lists them all"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _merge(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise _unknown_key(dotted)
    node[parts[-1]] = value


def _build(cls, values: dict, prefix: str = ""):
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    for key in values:
        if key not in names:
            raise _unknown_key(prefix + key)
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a section of keys, got {value!r}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(prefix + name, hint, value)
    try:
        return cls(**kwargs)
    except TypeError as err:  # pragma: no cover - _unknown_key catches the usual cause first
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from None


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Accept ints for floats and scalars for lists; reject everything else with the key's name."""
    origin = get_origin(hint)
    allowed = get_args(hint) if origin is not None and origin not in (list, tuple, dict) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        base = get_origin(kind) or kind
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base in (list, tuple) and isinstance(value, (list, tuple)):
            return base(value)
        if base is list and isinstance(value, str):
            return [value]
        if base is dict and isinstance(value, dict):
            return value
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    readable = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{name}={value!r} should be {readable}")


def load_config(recipe: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """Build a Config from a YAML recipe, then dotted `key=value` overrides, checking everything."""
    tree: dict = json.loads(json.dumps(base or {}))
    if recipe is not None:
        if not os.path.exists(recipe):
            raise ConfigError(f"recipe {recipe!r} does not exist (see pretrain/configs/ and finetune/configs/)")
        with open(recipe) as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"recipe {recipe} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"recipe {recipe} must be a mapping of sections (model:, data:, train:, ...)")
        for section, values in loaded.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    _merge(tree, f"{section}.{key}", value)
            else:
                _merge(tree, section, values)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=10)")
        key, _, text = item.partition("=")
        _merge(tree, key.strip(), _parse_value(text))
    return _build(Config, tree)
