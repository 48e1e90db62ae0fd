"""ManagerTower weights folders, and a Hugging Face BridgeTower export (docs/weights.md).

A weights folder is what `python -m pretrain export RUN --format hf` and `python -m doors.convert` write, and what
`ManagerTower.from_pretrained(DIR)`, fine-tuning's `--from DIR` and `checkpoint.init_from=DIR` read:

    config.json         {"format": "managertower", "format_version": 1, "model": {ModelConfig fields},
                         "task", "heads", "step", "finetune_overrides", ...}
    model.safetensors   the tower under `model.`, the task's heads under their task names (`mlm_head.`, `itm_head.`,
                        `itc_head.`, `classifier.`): the keys of a task's state dict
    tokenizer files     the text expert's tokenizer (AutoTokenizer.from_pretrained(DIR) reads them)
    README.md           a model card: manager kind, steps, data, how to load

It holds tensors and JSON only: reading it unpickles nothing. The model section names no weights paths (the
experts' weights are in model.safetensors) and no machine-specific choices (LayerNorm backend, compilation,
activation checkpointing: their defaults).

`--format hf-bridgetower` (model.manager=bridgetower only) writes a folder transformers' `BridgeTowerForMaskedLM`
(and `BridgeTowerForImageAndTextRetrieval`, `BridgeTowerModel`) load with `from_pretrained`: the same weights under
transformers' names (the mapping of managertower/convert.py, read backwards). What transformers' BridgeTower
cannot hold is refused or named: see `export_bridgetower`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .io import atomic_write, atomic_write_json

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
FOLDER_FORMAT = "managertower"
FORMAT_VERSION = 1
EXPORT_FORMATS = ("fp32", "hf", "hf-bridgetower")
TOWER_PREFIX = "model."
# ModelConfig fields a weights folder does not carry: weights paths (the weights are in the folder) and choices of
# the machine that runs it (they keep their defaults).
MACHINE_FIELDS = ("text_expert", "tokenizer", "vision_checkpoint", "layer_norm", "activation_checkpointing", "compile")
PAPER = ("Xiao Xu, Bei Li, Chenfei Wu, Shao-Yen Tseng, Anahita Bhiwandiwalla, Shachar Rosenman, Vasudev Lal, "
         "Wanxiang Che, Nan Duan. ManagerTower: Aggregating the Insights of Uni-Modal Experts for Vision-Language "
         "Representation Learning. ACL 2023. arXiv:2306.00103")


class WeightsFolderError(ConfigError):
    """A weights folder that is not one, or whose files do not fit together: one line naming the file."""


# --- the folder ----------------------------------------------------------------------------------------------
# The fields of a transformers text config that make its architecture (what model.text_config may override).
TEXT_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
                    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id",
                    "eos_token_id")


def text_architecture(config) -> dict:
    """TEXT_ARCH_FIELDS of a transformers config (object or dict), those it has."""
    values = config if isinstance(config, dict) else config.to_dict()
    return {name: values[name] for name in TEXT_ARCH_FIELDS if values.get(name) is not None}


def portable_model_config(model: ModelConfig) -> dict:
    """The model section of config.json: every ModelConfig field, weights paths and machine choices at their
    defaults; a text expert read from a folder (model.text_expert) is described by its architecture in
    text_config, so that ModelConfig(**section) builds the same tower with no path."""
    defaults = ModelConfig()
    values = dataclasses.asdict(model)
    if model.text_expert:
        from transformers import AutoConfig

        values["text_config"] = {**text_architecture(AutoConfig.from_pretrained(model.text_expert)),
                                 **values["text_config"]}
    for name in MACHINE_FIELDS:
        values[name] = getattr(defaults, name)
    return values


def model_overrides(model: dict) -> list[str]:
    """`model.key=value` overrides that make a recipe build this model section (those fields that differ from the
    size's presets and defaults); a tokenizer folder is added by the caller."""
    reference = dataclasses.asdict(ModelConfig(size=model["size"]))
    out = []
    for name, value in model.items():
        if name in MACHINE_FIELDS or name == "size" or value == reference.get(name):
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
        out.append(f"model.{name}={text}")
    return [f"model.size={model['size']}", *out]


def write_folder(out: str | os.PathLike, state_dict: dict, model: ModelConfig, *, tokenizer: str | None,
                 task: str | None, step: int | None, data: list[str] | None = None, origin: str = "",
                 extra: dict | None = None, extra_overrides: tuple[str, ...] = ()) -> Path:
    """Write a weights folder: model.safetensors (fp32 where floating point), config.json, the tokenizer's files
    (from the local folder `tokenizer`; none when None) and README.md. Returns the folder."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {key: (value.float() if value.is_floating_point() else value).detach().cpu().contiguous().clone()
               for key, value in state_dict.items()}
    heads = sorted({key.split(".", 1)[0] for key in tensors if not key.startswith(TOWER_PREFIX)})
    section = portable_model_config(model)
    tokenizer_written = _write_tokenizer(tokenizer, out)
    overrides = model_overrides(section)
    if tokenizer_written:
        overrides.append(f"model.tokenizer={out.resolve()}")
    overrides += list(extra_overrides)
    config = {"format": FOLDER_FORMAT, "format_version": FORMAT_VERSION, "model": section, "task": task,
              "heads": heads, "step": step, "data": list(data or []), "origin": origin,
              "finetune_overrides": overrides, **(extra or {})}
    atomic_write(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_FILE, config)
    atomic_write(out / CARD_FILE, model_card(config, out))
    return out


def run_tokenizer(model: ModelConfig) -> str | None:
    """The local tokenizer folder a run's text expert reads (the bundled one of the tiny tower without a path)."""
    from .model.experts import TINY_TOKENIZER

    return model.tokenizer or model.text_expert or (str(TINY_TOKENIZER) if model.size == "tiny" else None)


def _write_tokenizer(source: str | None, out: Path) -> bool:
    """Save the tokenizer's files of the local folder `source` into `out`; False when there is none."""
    from transformers import AutoTokenizer

    if source is None:
        return False
    if not os.path.isdir(source):
        raise WeightsFolderError(f"tokenizer folder {source!r} does not exist: give the local folder of the text "
                                 "expert's tokenizer (e.g. a saved roberta-base)")
    if Path(source).resolve() != out.resolve():
        AutoTokenizer.from_pretrained(source).save_pretrained(str(out))
    return True


def model_card(config: dict, out: Path) -> str:
    model = config["model"]
    lines = [f"# ManagerTower ({model['manager']} managers)", "",
             "Vision-language weights in this project's weights-folder format (docs/weights.md): config.json, "
             "model.safetensors, the tokenizer's files. Nothing here is pickled.", "",
             f"- manager kind: `{model['manager']}`; {model['num_experts']} uni-modal layers per expert, "
             f"{model['cross_layers']} cross-modal layers of width {model['hidden_size']}, images of "
             f"{model['image_size']} px",
             f"- task: {config.get('task') or 'none named'}; heads: "
             f"{', '.join(config['heads']) or 'none (tower only)'}",
             f"- steps: {config['step'] if config.get('step') is not None else 'unknown'}",
             f"- data: {', '.join(config.get('data') or []) or 'not recorded'}"]
    if config.get("origin"):
        lines.append(f"- origin: {config['origin']}")
    lines += ["", "## Use", "", "```python", "from managertower.model import ManagerTower", "",
              f"tower = ManagerTower.from_pretrained({str(out)!r})   # eval mode; safetensors, no pickle", "```",
              "", "Fine-tuning from it (the recipe's model section must build this model; these overrides do):", "",
              "```bash", f"python -m finetune --task TASK --from {out / WEIGHTS_FILE} \\",
              "    " + " ".join(_shell_quote(o) for o in config["finetune_overrides"]), "```", "",
              "## Paper", "", PAPER, ""]
    return "\n".join(lines)


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def weights_file(path: str | os.PathLike) -> Path | None:
    """The model.safetensors of a weights folder (given as the folder or the file itself), or None."""
    path = Path(path)
    candidate = path / WEIGHTS_FILE if path.is_dir() else path
    if candidate.name == WEIGHTS_FILE and candidate.is_file() and (candidate.parent / CONFIG_FILE).is_file():
        return candidate
    return None


def is_weights_folder(path: str | os.PathLike) -> bool:
    """True for a weights folder (or its model.safetensors) whose config.json says so."""
    file = weights_file(path)
    if file is None:
        return False
    try:
        return json.loads((file.parent / CONFIG_FILE).read_text()).get("format") == FOLDER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_folder(path: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, config.json) of a weights folder, given as the folder or its model.safetensors. Reads
    safetensors and JSON only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = weights_file(path)
    if file is None:
        raise WeightsFolderError(f"{path} is not a weights folder: it needs {WEIGHTS_FILE} and {CONFIG_FILE} "
                                 "(`python -m pretrain export RUN --format hf` or `python -m doors.convert` write one)")
    try:
        config = json.loads((file.parent / CONFIG_FILE).read_text())
    except ValueError as error:
        raise WeightsFolderError(f"{file.parent / CONFIG_FILE} is not JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT or "model" not in config:
        raise WeightsFolderError(f"{file.parent / CONFIG_FILE} does not describe a ManagerTower weights folder "
                                 f"(format {FOLDER_FORMAT!r} with a model section)")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise WeightsFolderError(f"{file.parent} is weights-folder format {config['format_version']}; this version "
                                 f"reads up to {FORMAT_VERSION}: update the project")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise WeightsFolderError(f"{file} is not a readable safetensors file (cut short or damaged: {error})") from None
    return state, config


def folder_model_config(config: dict, folder: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of a weights folder's config.json: its tokenizer is the folder's own when it holds one."""
    folder = Path(folder)
    folder = folder.parent if folder.is_file() else folder
    values = dict(config["model"])
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        values["tokenizer"] = str(folder)
    values.update(overrides)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise WeightsFolderError(f"{folder / CONFIG_FILE} names model fields this version does not know "
                                 f"({', '.join(unknown)}): update the project")
    return ModelConfig(**values)


def tower_state(state_dict: dict) -> dict:
    """The tower's keys of a task state dict, without the `model.` prefix."""
    return {key[len(TOWER_PREFIX):]: value for key, value in state_dict.items() if key.startswith(TOWER_PREFIX)}


# --- exports of a run ----------------------------------------------------------------------------------------
def _run_config(meta: dict, folder: Path):
    from .config import load_config

    if not meta.get("config"):
        raise ConfigError(f"{folder} has no config in its meta.json: export needs the run's config")
    return load_config(base=meta["config"])


def _data_of(cfg) -> list[str]:
    shards = cfg.data.train_shards if cfg.task.name == "pretrain" else getattr(cfg.task, "train_shards", [])
    return [str(s) for s in shards or []]


def export_run(checkpoint: str | os.PathLike, out: str | os.PathLike, fmt: str) -> Path:
    """Export a run's checkpoint folder (step-N) as `fmt` ("fp32": one .pt file; "hf": a weights folder;
    "hf-bridgetower": transformers' BridgeTower folder). Returns what it wrote."""
    from .engine import checkpoint as ckpt

    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(EXPORT_FORMATS)}")
    folder = Path(checkpoint)
    if fmt == "fp32":
        return ckpt.export_fp32(folder, out)
    meta = ckpt.read_meta(folder)
    cfg = _run_config(meta, folder)
    state = ckpt.fp32_state_dict(folder)
    tokenizer = run_tokenizer(cfg.model)
    if fmt == "hf":
        extra = ()
        if cfg.task.name == "vqav2":
            extra = _copy_answer_vocab(cfg, Path(out))
        return write_folder(out, state, cfg.model, tokenizer=tokenizer, task=cfg.task.name, step=meta.get("step"),
                            data=_data_of(cfg), origin=f"exported from {folder}", extra_overrides=extra)
    return export_bridgetower(state, cfg.model, out, tokenizer=tokenizer)


def _copy_answer_vocab(cfg, out: Path) -> tuple[str, ...]:
    """A VQAv2 run's answer list beside its weights (the classifier's rows are in its order)."""
    from .tasks.vqa import VOCAB_FILE, find_answer_vocab, load_answer_vocab

    try:
        answers = load_answer_vocab(find_answer_vocab(cfg))
    except ConfigError:
        return ()
    atomic_write_json(out / VOCAB_FILE, answers, indent=None)
    return (f"task.answer_vocab={(out / VOCAB_FILE).resolve()}",)


# --- transformers' BridgeTower -------------------------------------------------------------------------------
def bridgetower_config(model: ModelConfig, text_config, vision, itc_dim: int | None = None):
    """transformers' BridgeTowerConfig of a bridgetower-kind tower, or a ConfigError naming what it cannot hold.
    `text_config`: the text expert's transformers config; `vision`: the open_clip VisionTransformer."""
    from transformers import BridgeTowerConfig

    problems = []
    if model.manager != "bridgetower":
        problems.append(f"model.manager={model.manager} (transformers' BridgeTower is the bridgetower kind only)")
    if text_config.model_type != "roberta":
        problems.append(f"a {text_config.model_type} text expert (transformers' BridgeTower text model is RoBERTa: "
                        "position ids counted from the padding id)")
    width = vision.transformer.width
    heads = vision.transformer.resblocks[0].attn.num_heads
    if width % 64 or heads != width // 64:
        problems.append(f"a vision expert of {heads} heads at width {width} (transformers' has width / 64 heads)")
    block = vision.transformer.resblocks[0]
    if block.mlp.c_fc.out_features != 4 * width:
        problems.append(f"a vision MLP of {block.mlp.c_fc.out_features} (transformers' is 4 x width)")
    if type(block.mlp.gelu).__name__ != "QuickGELU":
        problems.append("a vision expert without QuickGELU (transformers' uses CLIP's QuickGELU)")
    if not isinstance(block.ls_1, torch.nn.Identity):
        problems.append("a vision expert with layer scale")
    text_depth, vision_depth = text_config.num_hidden_layers, len(vision.transformer.resblocks)
    if text_depth != vision_depth:
        problems.append(f"experts of {text_depth} text and {vision_depth} vision layers (transformers' feeds text "
                        "layer i and vision block i to the same cross-modal layer)")
    for ours, theirs, what in ((model.hidden_size, text_config.hidden_size, "width"),
                               (model.num_heads, text_config.num_attention_heads, "heads"),
                               (model.intermediate_size, text_config.intermediate_size, "FFN width")):
        if ours != theirs:
            problems.append(f"cross-modal {what} {ours} != the text expert's {theirs} (transformers builds the "
                            "cross-modal layers from the text config)")
    if problems:
        raise ConfigError("--format hf-bridgetower cannot hold this tower: " + "; ".join(problems))
    text = {name: getattr(text_config, name) for name in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
        "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
        "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")}
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (tuple, list)) else vision.patch_size
    vision_config = dict(hidden_size=width, num_hidden_layers=vision_depth, patch_size=patch,
                         image_size=model.image_size, layer_norm_eps=vision.ln_post.eps, share_layernorm=True,
                         remove_last_layer=False)
    extra = {} if itc_dim is None else {"contrastive_hidden_size": itc_dim}
    from .model.tower import MANAGER_EPS

    # layer_norm_eps is the managers' (the LayerNorms of cross_modal_*_layernorm and the link towers); transformers
    # also builds the MLM head's LayerNorm with it, and the cross-modal layers' with the text expert's: 1e-5 where
    # this tower (and the released code) use 1e-12 (docs/weights.md).
    return BridgeTowerConfig(text_config=text, vision_config=vision_config, hidden_size=model.hidden_size,
                             num_hidden_layers=model.cross_layers, num_attention_heads=model.num_heads,
                             hidden_act="gelu", layer_norm_eps=MANAGER_EPS, share_cross_modal_transformer_layers=True,
                             share_link_tower_layers=False, link_tower_type="add", tie_word_embeddings=False,
                             init_layernorm_from_vision_encoder=False,
                             architectures=["BridgeTowerForMaskedLM"], **extra)


def export_bridgetower(state_dict: dict, model: ModelConfig, out: str | os.PathLike, *,
                       tokenizer: str | None) -> Path:
    """Write transformers' BridgeTower folder of a bridgetower-kind task state dict: config.json, model.safetensors
    (`bridgetower.*`, and `mlm_score.*` / `itm_score.*` where the state has those heads) and the tokenizer's files.
    Not exported, and named in the returned folder's README.md: type row 2 (NLVR2's second image; transformers has
    two rows) and the ITC head (transformers' projects the cross-modal image features, ours the uni-modal ones)."""
    from safetensors.torch import save

    from .convert import to_bridgetower
    from .model import ManagerTower

    with torch.device("meta"):  # the architecture only: no weights are read or drawn
        tower = ManagerTower(ModelConfig(**portable_model_config(model)))
    config = bridgetower_config(model, tower.text_expert.encoder.config, tower.vision_expert.visual)
    tensors, left_out = to_bridgetower(state_dict, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not any(key.startswith("mlm_score.") for key in tensors):
        has_itm = any(key.startswith("itm_score.") for key in tensors)
        config.architectures = ["BridgeTowerForImageAndTextRetrieval" if has_itm else "BridgeTowerModel"]
    tensors = {key: value.float().contiguous().clone() if value.is_floating_point() else value.contiguous().clone()
               for key, value in tensors.items()}
    config.save_pretrained(str(out))
    atomic_write(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    _write_tokenizer(tokenizer, out)
    lines = ["# BridgeTower weights exported by ManagerTower (docs/weights.md)", "",
             f"Load with transformers: `{config.architectures[0]}.from_pretrained(DIR)`. Keys of heads the class "
             "lacks are reported as unused by transformers and ignored.", "",
             "Differences from this project's tower: transformers builds the cross-modal layers' and the MLM "
             "head's LayerNorms with eps 1e-5 (this tower and the released code: 1e-12), a relative difference of "
             "about 1e-5 in their outputs. Not exported:", ""]
    lines += [f"- `{key}`: {why}" for key, why in left_out.items()] or ["- nothing"]
    lines += ["", "## Paper", "", PAPER, ""]
    atomic_write(out / CARD_FILE, "\n".join(lines))
    return out
