"""Weights from elsewhere, converted to a ManagerTower weights folder (docs/weights.md has the mapping table).

Sources (`SOURCE_FORMATS`):
- `released-mt`: a ManagerTower checkpoint of the authors' released code (LooperXX/ManagerTower,
  `src/modules/mt_module.py`): a PyTorch Lightning .ckpt whose `state_dict` holds their names; pre-trained or
  fine-tuned (VQAv2, NLVR2, SNLI-VE, retrieval).
- `released-bt`: a BridgeTower checkpoint of the same code (`src/modules/bt_module.py`).
- `hf-bridgetower`: a folder transformers' `save_pretrained` wrote for `BridgeTowerForMaskedLM`,
  `BridgeTowerForImageAndTextRetrieval`, `BridgeTowerForContrastiveLearning` or `BridgeTowerModel`.

    conversion = convert_checkpoint("ManagerTower_pt_base.ckpt", "weights/mt", tokenizer_dir="roberta-base/")

writes weights/mt/ (hf_export.py describes the folder) and conversion.json: every source key with the keys it
became, or the reason it was dropped. A source key that is neither is an error naming it; so is a tower key the
source lacks, and a tensor whose shape does not fit. The experts' weights are those inside the checkpoint: the
tokenizer folder gives the tokenizer's files and, where it has a config.json, the text expert's architecture
(heads, LayerNorm eps, padding id); nothing is downloaded.

The checkpoint files are read without running code: safetensors, JSON, or torch.load(weights_only=True), with the
dict and list subclasses Lightning and sacred pickle into a .ckpt's hyper-parameters read as plain dicts and
lists. Anything else pickled in a file is refused with one line naming it.

`to_bridgetower` is the same mapping read backwards, for `--format hf-bridgetower` exports (hf_export.py).
"""
from __future__ import annotations

import functools
import json
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .hf_export import CONFIG_FILE, WEIGHTS_FILE, text_architecture, write_folder

SOURCE_FORMATS = ("released-mt", "released-bt", "hf-bridgetower")
REPORT_FILE = "conversion.json"
HF_PREFIX = "bridgetower."


class ConversionError(ConfigError):
    """A source that does not convert: one line naming the keys, the shape or the setting at fault."""


# --- renaming rules ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rename:
    """One of our keys and its name in a source. A name ending in "." renames a prefix (the rest of the key is
    kept); `{n}` stands for a layer number, and `offset` is added to the source's number to give ours
    (BridgeTower's link tower i feeds our cross-modal layer i + 1)."""

    ours: str
    theirs: str
    offset: int = 0

    def to_ours(self, key: str) -> str | None:
        return _apply(self.theirs, self.ours, key, self.offset)

    def to_theirs(self, key: str) -> str | None:
        return _apply(self.ours, self.theirs, key, -self.offset)


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile("^" + body + ("(?P<rest>.+)$" if template.endswith(".") else "$"))


def _apply(source: str, target: str, key: str, offset: int) -> str | None:
    match = _pattern(source).match(key)
    if match is None:
        return None
    number = match.groupdict().get("n")
    if number is not None:
        if int(number) + offset < 0:
            return None
        target = target.replace("{n}", str(int(number) + offset))
    return target + (match.groupdict().get("rest") or "")


def _first(rules: list[Rename], key: str, to_ours: bool = True) -> str | None:
    for rule in rules:
        renamed = rule.to_ours(key) if to_ours else rule.to_theirs(key)
        if renamed is not None:
            return renamed
    return None


# The released cross-modal layer (bert_model.py `BertCrossLayer`, also transformers' `BridgeTowerBertCrossLayer`)
# and ours (model/cross_modal.py `CrossModalLayer`).
CROSS_LAYER_NAMES = (
    ("self_attn.query.", "attention.self.query."), ("self_attn.key.", "attention.self.key."),
    ("self_attn.value.", "attention.self.value."), ("self_attn.out.", "attention.output.dense."),
    ("self_norm.", "attention.output.LayerNorm."),
    ("cross_attn.query.", "crossattention.self.query."), ("cross_attn.key.", "crossattention.self.key."),
    ("cross_attn.value.", "crossattention.self.value."), ("cross_attn.out.", "crossattention.output.dense."),
    ("cross_norm.", "crossattention.output.LayerNorm."),
    ("ffn_in.", "intermediate.dense."), ("ffn_out.", "output.dense."), ("ffn_norm.", "output.LayerNorm."))
CLASSIFIERS = {"vqa": "vqav2", "nlvr2": "nlvr2", "snli": "snli_ve"}  # released `{name}_classifier` -> task.name


def cross_modal_renames(prefix: str) -> list[Rename]:
    """Projections, cross-modal layers and poolers: the same names in the released code and in transformers."""
    rules = []
    for side in ("text", "image"):
        rules += [Rename(f"model.{side}_proj.", f"{prefix}cross_modal_{side}_transform."),
                  Rename(f"model.{side}_pooler.", f"{prefix}cross_modal_{side}_pooler.")]
        rules += [Rename(f"model.{side}_layers.{{n}}.{ours}", f"{prefix}cross_modal_{side}_layers.{{n}}.{theirs}")
                  for ours, theirs in CROSS_LAYER_NAMES]
    return rules


def bridge_renames(prefix: str) -> list[Rename]:
    """BridgeTower's managers: layer 1's LayerNorm, then link tower i (LN(U + C)) before cross-modal layer i + 1."""
    rules = []
    for side in ("text", "image"):
        rules += [Rename(f"model.{side}_managers.0.norm.", f"{prefix}cross_modal_{side}_layernorm."),
                  Rename(f"model.{side}_managers.{{n}}.norm.",
                         f"{prefix}cross_modal_{side}_link_tower.{{n}}.LayerNorm.", offset=1)]
    return rules


HEAD_RENAMES = [Rename("mlm_head.dense.", "mlm_score.transform.dense."),
                Rename("mlm_head.norm.", "mlm_score.transform.LayerNorm."),
                Rename("mlm_head.decoder.weight", "mlm_score.decoder.weight"),
                Rename("mlm_head.decoder.bias", "mlm_score.bias"),
                Rename("itm_head.fc.", "itm_score.fc.")]

RELEASED_RENAMES = [
    Rename("model.text_expert.encoder.", "text_transformer."),
    Rename("model.vision_expert.visual.", "vit_model.visual."),
    *cross_modal_renames(""), *HEAD_RENAMES,
    Rename("itc_head.text_proj.", "cross_modal_itc_text_head.fc."),
    Rename("itc_head.image_proj.", "cross_modal_itc_image_head.fc."),
    Rename("model.text_layer_embedding.weight", "layer_embeddings_text.weight"),
    Rename("model.image_layer_embedding.weight", "layer_embeddings_image.weight"),
    *[Rename(f"classifier.{ours}.", f"{name}_classifier.{index}.")
      for name in CLASSIFIERS for ours, index in (("fc1", 0), ("norm", 1), ("fc2", 3))]]
# The released AAUE manager (heads.py `AAUE`) and ours (model/managers.py `AAUEManager`), layers >= 2.
for _side in ("text", "image"):
    _theirs = f"cross_modal_{_side}_manager_tower.{{n}}.manager_layer."
    RELEASED_RENAMES += [Rename(f"model.{_side}_managers.{{n}}.to_logits.", _theirs + "linear_controller."),
                         Rename(f"model.{_side}_managers.{{n}}.query.", _theirs + "fusion_attention.q_proj."),
                         Rename(f"model.{_side}_managers.{{n}}.key.", _theirs + "fusion_attention.k_proj."),
                         Rename(f"model.{_side}_managers.{{n}}.other_norm.", _theirs + "extra_query_LayerNorm.")]
RELEASED_BT_RENAMES = RELEASED_RENAMES + bridge_renames("")

_HF_VISION = f"{HF_PREFIX}vision_model.visual."
HF_RENAMES = [
    Rename("model.text_expert.encoder.", f"{HF_PREFIX}text_model."),
    Rename("model.vision_expert.visual.conv1.weight", _HF_VISION + "embeddings.patch_embedding.weight"),
    Rename("model.vision_expert.visual.class_embedding", _HF_VISION + "embeddings.class_embedding"),
    Rename("model.vision_expert.visual.positional_embedding", _HF_VISION + "embeddings.position_embedding.weight"),
    Rename("model.vision_expert.visual.", _HF_VISION),
    *cross_modal_renames(HF_PREFIX), *bridge_renames(HF_PREFIX), *HEAD_RENAMES,
    Rename("itc_head.text_proj.", "itc_text_head.fc.")]

# Source keys that are dropped, and why (checked after the keys with their own rule).
UNUSED_POOLER = "the text expert's pooler: unused, the tower pools its own cross-modal outputs (docs/recipe.md §1)"
DROPS = [
    (r"^(text_transformer|bridgetower\.text_model)\.pooler\.", UNUSED_POOLER),
    (r"\.embeddings\.(position_ids|token_type_ids)$", "a constant index buffer the model rebuilds"),
    (r"^(vit_model\.visual|bridgetower\.vision_model\.visual)\.ln_separate\.",
     "per-layer LayerNorms of an unshared-LayerNorm vision tower: the forward passes every kept layer through "
     "ln_post (released `forward_post`), never these"),
    (r"^vit_model\.(positional_embedding|ln_final\.|text_projection|logit_scale|token_embedding\.|transformer\.)",
     "the text side of the released CLIP wrapper: unused by the vision expert"),
    (r"^vit_model\.visual\.proj$", "CLIP's projection to its joint space: unused (docs/recipe.md §1)"),
    (r"manager_layer\.softmax_temperature_cross$",
     "the released managers' second temperature: created, never used in their forward"),
    (r"^rank_output\.", "the released `irtr` objective's head (ITM's positive row, trained apart): no counterpart"),
    (r"^itc_cross_modal_head\.", "transformers' contrastive head on the pooled cross-modal features: no counterpart "
     "(the ITC here projects the uni-modal class features, docs/recipe.md §3)"),
]


# --- reading sources without running code -------------------------------------------------------------------
class _PlainDict(dict):
    """Stands in for the dict subclasses Lightning and sacred pickle into a checkpoint's hyper-parameters: it builds
    a plain dict, so no class of theirs is constructed."""

    def __new__(cls, *args, **kwargs):
        return dict(*args, **kwargs)


class _PlainList(list):
    def __new__(cls, *args):
        return list(*args)


PICKLED_CONTAINERS = [(_PlainDict, "pytorch_lightning.utilities.parsing.AttributeDict"),
                      (_PlainDict, "lightning_fabric.utilities.data.AttributeDict"),
                      (_PlainDict, "lightning.fabric.utilities.data.AttributeDict"),
                      (_PlainDict, "sacred.config.custom_containers.ReadOnlyDict"),
                      (_PlainList, "sacred.config.custom_containers.ReadOnlyList")]


def load_pickled_weights(path: str | os.PathLike) -> object:
    """torch.load(path, weights_only=True) with PICKLED_CONTAINERS read as plain dicts and lists. A file pickling
    anything else is refused (UnsafeCheckpoint) before any of it is constructed."""
    from .engine.checkpoint import DamagedCheckpoint, UnsafeCheckpoint

    try:
        with torch.serialization.safe_globals(PICKLED_CONTAINERS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        stand_ins = {name for _, name in PICKLED_CONTAINERS}
        try:
            named = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - stand_ins)
        except (RuntimeError, ValueError, OSError):
            named = []
        raise UnsafeCheckpoint(
            f"{path} holds pickled Python objects ({', '.join(named) or 'not plain values'}) that loading would "
            "construct and run: refused. Where you trust the file, save its weights alone and convert those: "
            f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)['state_dict'], "
            "'weights.pt')\"") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        detail = str(error).strip().split(". ")[0][:120] or type(error).__name__
        raise DamagedCheckpoint(f"{path} is not a readable PyTorch file (cut short or damaged: {detail})") from None


def read_source(source: str | os.PathLike) -> tuple[dict, dict]:
    """(state dict, the source's own config) of a checkpoint: a released .ckpt / .pt (its `state_dict` and the
    `config` of its hyper-parameters), a .safetensors file, or a transformers folder (config.json +
    model.safetensors, its shards, or pytorch_model.bin)."""
    path = Path(source)
    if not path.exists():
        raise ConversionError(f"{path} does not exist: give a released .ckpt file or a transformers folder")
    if path.is_dir():
        return _read_transformers_folder(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    blob = load_pickled_weights(path)
    if not isinstance(blob, dict):
        raise ConversionError(f"{path} holds a {type(blob).__name__}, not a checkpoint dict")
    state = blob.get("state_dict", blob)
    hyper = blob.get("hyper_parameters") or {}
    config = hyper.get("config", hyper) if isinstance(hyper, dict) else {}
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors under state_dict")
    config = dict(config) if isinstance(config, dict) else {}
    if isinstance(blob.get("global_step"), int):
        config.setdefault("global_step", blob["global_step"])
    return tensors, config


def _read_transformers_folder(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no {CONFIG_FILE}: give the folder transformers' save_pretrained wrote")
    config = json.loads(config_file.read_text())
    index = folder / "model.safetensors.index.json"
    if (folder / WEIGHTS_FILE).is_file():
        state = load_file(str(folder / WEIGHTS_FILE))
    elif index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(str(folder / shard)))
    elif (folder / "pytorch_model.bin").is_file():
        state = load_pickled_weights(folder / "pytorch_model.bin")
    else:
        raise ConversionError(f"{folder} has no model.safetensors, shards or pytorch_model.bin")
    return dict(state), config


def detect_format(state: dict) -> str:
    keys = list(state)
    if any(k.startswith(("bridgetower.", "text_model.", "vision_model.")) for k in keys):
        return "hf-bridgetower"
    if any(k.startswith("cross_modal_text_manager_tower.") for k in keys):
        return "released-mt"
    if any(k.startswith("cross_modal_text_link_tower.") for k in keys):
        return "released-bt"
    raise ConversionError("the checkpoint's keys are neither the released ManagerTower / BridgeTower names nor "
                          f"transformers' BridgeTower names (e.g. {keys[:3]}); give --format if it is one of "
                          f"{', '.join(SOURCE_FORMATS)}")


# --- where every source key goes --------------------------------------------------------------------------------
class _Ledger:
    """What became of every source key: our keys it went into, or the reason it was dropped."""

    def __init__(self, source: dict):
        self.source = source
        self.out: dict[str, torch.Tensor] = {}
        self.mapped: dict[str, list[str]] = {}
        self.dropped: dict[str, str] = {}
        self.missing: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.source

    def get(self, key: str) -> torch.Tensor | None:
        if key not in self.source:
            self.missing.append(key)
            return None
        return self.source[key]

    def put(self, ours: str, value: torch.Tensor | None, *sources: str) -> None:
        if value is None:
            return
        self.out[ours] = value
        for key in sources:
            self.mapped.setdefault(key, []).append(ours)

    def drop(self, key: str, reason: str) -> None:
        if key in self.source:
            self.dropped[key] = reason

    def pending(self) -> list[str]:
        return [key for key in self.source if key not in self.mapped and key not in self.dropped]

    def finish(self, rules: list[Rename]) -> None:
        """Drop what DROPS names, rename the rest; a key that is left, or one a rule needed and did not find, is
        an error naming it."""
        for key in self.pending():
            reason = next((why for pattern, why in DROPS if re.search(pattern, key)), None)
            if reason is not None:
                self.dropped[key] = reason
        for key in self.pending():
            ours = _first(rules, key)
            if ours is not None:
                self.put(ours, self.source[key], key)
        if self.missing:
            raise ConversionError(f"the checkpoint lacks {len(self.missing)} keys it needs: "
                                  + ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else ""))
        left = self.pending()
        if left:
            raise ConversionError(f"{len(left)} keys of the checkpoint are neither mapped nor known to be unused: "
                                  + ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
                                  + " (docs/weights.md lists every known key)")


def _count(state: dict, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in state if (m := regex.match(key))})


def _shape(state: dict, key: str, what: str) -> torch.Size:
    if key not in state:
        raise ConversionError(f"the checkpoint lacks {key} ({what})")
    return state[key].shape


# --- architectures ----------------------------------------------------------------------------------------------
# The text experts the released code loads (`RobertaModel` / `BertModel.from_pretrained`): what a checkpoint's
# shapes cannot tell, for a tokenizer folder without config.json.
TEXT_DEFAULTS = {"roberta": dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5),
                 "bert": dict(pad_token_id=0, layer_norm_eps=1e-12)}


def _text_architecture(state: dict, prefix: str, tokenizer_dir: str | None, model_type_hint: str | None,
                       notes: list[str]) -> dict:
    """The text expert's transformers architecture: shapes from the checkpoint; heads, eps and special ids from the
    tokenizer folder's config.json, else from the released code's experts (head width 64)."""
    words = _shape(state, f"{prefix}embeddings.word_embeddings.weight", "the text expert's word embeddings")
    arch = {"vocab_size": words[0], "hidden_size": words[1],
            "num_hidden_layers": _count(state, re.escape(prefix) + r"encoder\.layer\.(\d+)\."),
            "intermediate_size": _shape(state, f"{prefix}encoder.layer.0.intermediate.dense.weight", "FFN")[0],
            "max_position_embeddings": _shape(state, f"{prefix}embeddings.position_embeddings.weight", "positions")[0],
            "type_vocab_size": _shape(state, f"{prefix}embeddings.token_type_embeddings.weight", "types")[0]}
    folder_config = Path(tokenizer_dir) / CONFIG_FILE if tokenizer_dir else None
    if folder_config is not None and folder_config.is_file():
        described = text_architecture(json.loads(folder_config.read_text()))
        differ = [f"{k} {described[k]} vs {v}" for k, v in arch.items() if k in described and described[k] != v]
        if differ:
            raise ConversionError(f"{folder_config} describes another text expert than the checkpoint holds "
                                  f"({'; '.join(differ)}): give the folder of the expert it was trained with")
        return {**described, **arch}
    model_type = model_type_hint or ("roberta" if arch["type_vocab_size"] == 1 else "bert")
    heads = max(1, arch["hidden_size"] // 64)
    notes.append(f"text expert: {model_type}, {heads} heads (head width 64) and {TEXT_DEFAULTS[model_type]}, as "
                 "the released code's experts; a tokenizer folder with config.json states them instead")
    return {"model_type": model_type, **arch, "num_attention_heads": heads, **TEXT_DEFAULTS[model_type]}


def _preset_text(size: str) -> dict:
    """The text architecture `size` builds without text_config, every TEXT_ARCH_FIELDS value included."""
    from transformers import AutoConfig

    from .model.experts import ROBERTA_BASE, TINY_TEXT

    arch = dict(TINY_TEXT if size == "tiny" else ROBERTA_BASE)
    return {**text_architecture(AutoConfig.for_model(arch.pop("model_type"), **arch)), **arch}


def _preset_vision(size: str) -> dict:
    import dataclasses

    import open_clip
    from open_clip.model import CLIPVisionCfg

    from .config import SIZE_PRESETS
    from .model.experts import TINY_VISION

    name = SIZE_PRESETS[size]["vision_expert"]
    cfg = TINY_VISION if name == "tiny" else open_clip.get_model_config(name)["vision_cfg"]
    return dataclasses.asdict(CLIPVisionCfg(**cfg))


def _model_config(size: str, text: dict, vision: dict, **fields) -> ModelConfig:
    """A ModelConfig of `size` whose text_config / vision_config hold what differs from the size's presets."""
    preset_text = _preset_text(size)
    if text.get("model_type") != preset_text["model_type"]:
        text_config = dict(text)
    else:
        text_config = {k: v for k, v in text.items() if preset_text.get(k) != v}
    preset_vision = _preset_vision(size)
    vision_config = {k: v for k, v in vision.items() if preset_vision.get(k) != v}
    return ModelConfig(size=size, text_config=text_config, vision_config=vision_config, **fields)


def _size(hidden: int) -> str:
    return "base" if hidden >= 768 else "tiny"


def _clip_vision(state: dict, prefix: str, conv: str, positions: str) -> tuple[dict, int]:
    """(open_clip vision_cfg fields, trained image size) of a CLIP ViT in a checkpoint (heads = width / 64, as
    CLIP and the released code build them)."""
    conv_shape = _shape(state, prefix + conv, "the vision expert's patch embedding")
    width, patch = conv_shape[0], conv_shape[-1]
    grid = math.isqrt(_shape(state, prefix + positions, "the vision position embeddings")[0] - 1)
    layers = _count(state, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    mlp = _shape(state, prefix + "transformer.resblocks.0.mlp.c_fc.weight", "the vision MLP")[0]
    return dict(patch_size=patch, width=width, layers=layers, head_width=64, mlp_ratio=mlp / width), grid * patch


# --- released checkpoints ---------------------------------------------------------------------------------------
def _released_config(state: dict, hparams: dict, fmt: str, tokenizer_dir: str | None,
                     notes: list[str]) -> ModelConfig:
    hint = None
    if isinstance(hparams.get("tokenizer"), str):
        hint = "roberta" if "roberta" in hparams["tokenizer"] else "bert"
    text = _text_architecture(state, "text_transformer.", tokenizer_dir, hint, notes)
    vision, trained_size = _clip_vision(state, "vit_model.visual.", "conv1.weight", "positional_embedding")
    hidden, text_width = _shape(state, "cross_modal_text_transform.weight", "the text projection")
    cross_layers = _count(state, r"cross_modal_text_layers\.(\d+)\.")
    heads = hparams.get("num_heads")
    if heads is None:
        heads = max(1, hidden // 64)
        notes.append(f"cross-modal layers: {heads} heads (head width 64: no hyper-parameters in the checkpoint)")
    fields = dict(hidden_size=hidden, num_heads=int(heads), cross_layers=cross_layers,
                  intermediate_size=_shape(state, "cross_modal_text_layers.0.intermediate.dense.weight", "FFN")[0],
                  image_size=int(hparams.get("image_size") or trained_size),
                  dropout=float(hparams.get("drop_rate", 0.1)))
    if hparams.get("max_text_len"):
        fields["max_text_len"] = int(hparams["max_text_len"])
    if fmt == "released-bt":
        fields.update(manager="bridgetower", num_experts=cross_layers)
    else:
        counts = {side: _count(state, rf"cross_modal_{side}_manager_tower\.0\.manager_layer\.LayerNorm\.(\d+)\.")
                  for side in ("text", "image")}
        if counts["text"] != counts["image"]:
            raise ConversionError(f"the checkpoint manages {counts['text']} text and {counts['image']} image layers "
                                  "(managed_layers_text / _image); this tower manages the same N of both")
        scores = _shape(state, "cross_modal_text_manager_tower.0.manager_layer.layer_scores", "layer 1's weights")
        adaptive = any(".manager_layer.linear_controller." in key for key in state)
        fields.update(manager="aaue_fused" if adaptive else "saue", num_experts=counts["text"],
                      manager_weights="scalar" if scores[-1] == 1 and hidden > 1 else "vector")
    if vision["width"] != _shape(state, "cross_modal_image_transform.weight", "the image projection")[1]:
        raise ConversionError("the image projection does not fit the vision expert's width")
    if text["hidden_size"] != text_width:
        raise ConversionError("the text projection does not fit the text expert's width")
    return _model_config(_size(hidden), text, vision, **fields)


def _type_rows(ledger: _Ledger, key: str) -> None:
    """Two rows (text, image) or three (NLVR2's second image) -> our three; a missing third row starts as a copy
    of the image row, as the released code does when it adds it for NLVR2 (`mt_module.py` `__init__`)."""
    rows = ledger.get(key)
    if rows is None:
        return
    if rows.shape[0] == 2:
        rows = torch.cat([rows, rows[1:2]])
    ledger.put("model.type_embedding.weight", rows, key)


def _released_managers(ledger: _Ledger, cfg: ModelConfig) -> None:
    """Released SAUE / AAUE (heads.py) -> ours (model/managers.py). Their per-input LayerNorms LayerNorm.0..N-1
    stack into one N x D affine; LayerNorm.N (of the previous output C) is prev_norm; SAUE's layer_scores hold the N
    expert logits and, from layer 2, W_C as an (N+1)-th row; AAUE's W_C is layer_scores_cross."""
    n = cfg.num_experts
    for side in ("text", "image"):
        for layer in range(cfg.cross_layers):
            theirs, ours = f"cross_modal_{side}_manager_tower.{layer}.manager_layer.", f"model.{side}_managers.{layer}."
            for part in ("weight", "bias"):
                keys = [f"{theirs}LayerNorm.{i}.{part}" for i in range(n)]
                values = [ledger.get(k) for k in keys]
                if all(v is not None for v in values):
                    ledger.put(f"{ours}expert_norm_{part}", torch.stack(values), *keys)
                if layer > 0:
                    ledger.put(f"{ours}prev_norm.{part}", ledger.get(f"{theirs}LayerNorm.{n}.{part}"),
                               f"{theirs}LayerNorm.{n}.{part}")
            ledger.put(f"{ours}temperature", ledger.get(f"{theirs}softmax_temperature"), f"{theirs}softmax_temperature")
            adaptive = layer > 0 and cfg.manager == "aaue_fused"
            if adaptive:
                cross = ledger.get(f"{theirs}layer_scores_cross")  # 1 x 1 x 1 x D (or 1)
                if cross is not None:
                    ledger.put(f"{ours}prev_weight", cross.reshape(1, -1), f"{theirs}layer_scores_cross")
                continue
            scores = ledger.get(f"{theirs}layer_scores")  # 1 x (N [+1]) x 1 x D (or 1)
            if scores is None:
                continue
            if scores.shape[1] != n + (layer > 0):
                raise ConversionError(f"{theirs}layer_scores has {scores.shape[1]} rows; layer {layer + 1} of "
                                      f"{n} managed layers needs {n + (layer > 0)}")
            ledger.put(f"{ours}logits", scores[0, :n, 0, :].clone(), f"{theirs}layer_scores")
            if layer > 0:
                ledger.put(f"{ours}prev_weight", scores[0, n:, 0, :].clone(), f"{theirs}layer_scores")


def _map_released(state: dict, cfg: ModelConfig, fmt: str) -> _Ledger:
    ledger = _Ledger(state)
    _type_rows(ledger, "token_type_embeddings.weight")
    if ledger.has("temperature"):
        if ledger.has("cross_modal_itc_text_head.fc.weight"):
            ledger.put("itc_head.learned_temperature", state["temperature"].reshape(1), "temperature")
        else:
            ledger.drop("temperature", "the ITC temperature of a checkpoint without ITC heads: unused")
    if fmt == "released-mt":
        _released_managers(ledger, cfg)
    classifiers = sorted({m.group(1) for k in state if (m := re.match(r"^(\w+)_classifier\.", k))})
    if len(classifiers) > 1:
        raise ConversionError(f"the checkpoint holds {len(classifiers)} classifiers ({', '.join(classifiers)}); a "
                              "task here has one")
    if classifiers and f"{classifiers[0]}_classifier.3.weight" not in state:
        raise ConversionError(f"{classifiers[0]}_classifier is the one-Linear head of task_head_layers=1: the "
                              "classifiers here are Linear -> LayerNorm -> GELU -> Linear (task_head_layers=2)")
    ledger.finish(RELEASED_RENAMES if fmt == "released-mt" else RELEASED_BT_RENAMES)
    return ledger


# --- transformers' BridgeTower -------------------------------------------------------------------------------
def _hf_config(config: dict, notes: list[str]):
    from transformers import BridgeTowerConfig

    if config.get("model_type") != "bridgetower":
        raise ConversionError(f"the folder's config.json has model_type {config.get('model_type')!r}, not "
                              "'bridgetower'")
    hf = BridgeTowerConfig.from_dict(config)
    problems = []
    if not hf.share_cross_modal_transformer_layers:
        problems.append("share_cross_modal_transformer_layers=false (one projection per cross-modal layer)")
    if hf.link_tower_type != "add":
        problems.append(f"link_tower_type={hf.link_tower_type} (the bridgetower kind is LN(U + C): 'add')")
    if hf.hidden_size != hf.text_config.hidden_size:
        problems.append(f"hidden_size {hf.hidden_size} != the text model's {hf.text_config.hidden_size}")
    layers = hf.vision_config.num_hidden_layers - (1 if hf.vision_config.remove_last_layer else 0)
    if layers != hf.text_config.num_hidden_layers:
        problems.append(f"{layers} vision blocks for {hf.text_config.num_hidden_layers} text layers")
    if problems:
        raise ConversionError("this BridgeTower does not convert: " + "; ".join(problems))
    from .model.tower import CROSS_MODAL_EPS, MANAGER_EPS

    text_eps = hf.text_config.layer_norm_eps
    if text_eps != CROSS_MODAL_EPS or hf.layer_norm_eps != CROSS_MODAL_EPS:
        notes.append(f"approximate: transformers builds the cross-modal layers' LayerNorms with eps {text_eps} and "
                     f"the MLM head's with {hf.layer_norm_eps}; this tower uses {CROSS_MODAL_EPS} (as the released "
                     "code)")
    if hf.layer_norm_eps != MANAGER_EPS:
        notes.append(f"approximate: transformers' link-tower LayerNorm eps is {hf.layer_norm_eps}, ours {MANAGER_EPS}")
    if hf.vision_config.layer_norm_eps != 1e-5:
        notes.append(f"approximate: the vision LayerNorms' eps is {hf.vision_config.layer_norm_eps}; open_clip's 1e-5")
    return hf


def _hf_model_config(hf) -> ModelConfig:
    text = {"model_type": "roberta", **{k: v for k, v in text_architecture(hf.text_config.to_dict()).items()
                                        if k != "model_type"}}
    vision = hf.vision_config
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    layers = vision.num_hidden_layers - (1 if vision.remove_last_layer else 0)
    vision_cfg = dict(patch_size=patch, width=vision.hidden_size, layers=layers, head_width=64, mlp_ratio=4.0)
    image = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    return _model_config(_size(hf.hidden_size), text, vision_cfg, hidden_size=hf.hidden_size,
                         num_heads=hf.text_config.num_attention_heads,
                         intermediate_size=hf.text_config.intermediate_size, cross_layers=hf.num_hidden_layers,
                         num_experts=hf.num_hidden_layers, manager="bridgetower", image_size=image,
                         dropout=float(hf.text_config.hidden_dropout_prob))


def _map_hf(state: dict, hf, cfg: ModelConfig) -> _Ledger:
    if not any(key.startswith(HF_PREFIX) for key in state):  # a BridgeTowerModel folder: no prefix
        state = {(key if key.startswith(("mlm_score.", "itm_score.", "itc_", "logit_scale")) else HF_PREFIX + key):
                 value for key, value in state.items()}
    ledger = _Ledger(state)
    _type_rows(ledger, f"{HF_PREFIX}token_type_embeddings.weight")
    if hf.share_link_tower_layers:  # one link tower for every layer: each of our managers gets a copy
        for side in ("text", "image"):
            for part in ("weight", "bias"):
                key = f"{HF_PREFIX}cross_modal_{side}_link_tower.LayerNorm.{part}"
                value = ledger.get(key)
                for layer in range(1, cfg.cross_layers):
                    ledger.put(f"model.{side}_managers.{layer}.norm.{part}", value, key)
    if ledger.has("itc_image_head.fc.weight"):
        _hf_itc_image(ledger)
    if ledger.has("logit_scale"):
        if ledger.has("itc_text_head.fc.weight"):
            # transformers: logits = cos * exp(logit_scale); ours: cos / temperature
            ledger.put("itc_head.learned_temperature", torch.exp(-state["logit_scale"].double()).float().reshape(1),
                       "logit_scale")
        else:
            ledger.drop("logit_scale", "the ITC scale of a checkpoint without ITC heads: unused")
    ledger.finish(HF_RENAMES)
    return ledger


def _hf_itc_image(ledger: _Ledger) -> None:
    """transformers' image ITC head projects the class token of `cross_modal_image_transform(ln_post(x)) + type row
    1`; ours projects ln_post(x) directly. Both are affine, so ours is their composition (exact up to rounding):
    W = W_itc W_proj, b = W_itc (b_proj + type_1) + b_itc."""
    w_itc, b_itc = ledger.get("itc_image_head.fc.weight"), ledger.get("itc_image_head.fc.bias")
    w_proj = ledger.get(f"{HF_PREFIX}cross_modal_image_transform.weight")
    b_proj = ledger.get(f"{HF_PREFIX}cross_modal_image_transform.bias")
    types = ledger.get(f"{HF_PREFIX}token_type_embeddings.weight")
    if any(t is None for t in (w_itc, b_itc, w_proj, b_proj, types)):
        return  # the ledger names what is missing
    dtype = w_proj.dtype
    w_itc, b_itc = w_itc.double(), b_itc.double()
    ledger.put("itc_head.image_proj.weight", (w_itc @ w_proj.double()).to(dtype), "itc_image_head.fc.weight")
    ledger.put("itc_head.image_proj.bias", (w_itc @ (b_proj.double() + types[1].double()) + b_itc).to(dtype),
               "itc_image_head.fc.bias")


def to_bridgetower(state_dict: dict, hf_config) -> tuple[dict, dict]:
    """Our bridgetower-kind task state dict -> transformers' BridgeTower keys: (tensors, {our key: why it is left
    out}). Every tensor of transformers' BridgeTowerModel must be found (ConfigError naming the first missing)."""
    from transformers import BridgeTowerModel

    out, left_out = {}, {}
    for key, value in state_dict.items():
        if key == "model.type_embedding.weight":
            out[f"{HF_PREFIX}token_type_embeddings.weight"] = value[:2]
            if value.shape[0] > 2:
                left_out[f"{key} row 2"] = "NLVR2's second-image type row: transformers' BridgeTower has two rows"
            continue
        if key.startswith("itc_head."):
            left_out[key] = ("the ITC head: transformers' projects the projected, typed image features and has a "
                             "cross-modal head besides; ours projects the uni-modal class features")
            continue
        if key.startswith("classifier."):
            left_out[key] = "a fine-tuning classifier: transformers' BridgeTower classes have none"
            continue
        theirs = _first(HF_RENAMES, key, to_ours=False)
        if theirs is None:
            raise ConfigError(f"{key} has no name in transformers' BridgeTower")
        out[theirs] = value
    with torch.device("meta"):
        expected = {HF_PREFIX + k: v.shape for k, v in BridgeTowerModel(hf_config).state_dict().items()}
    # transformers' text model keeps RoBERTa's pooler, which no BridgeTower forward uses and this tower does not
    # have: written as zeros, so that loading initialises nothing at random.
    for key in (f"{HF_PREFIX}text_model.pooler.dense.weight", f"{HF_PREFIX}text_model.pooler.dense.bias"):
        if key in expected and key not in out:
            out[key] = torch.zeros(expected[key])
            left_out[key] = "(written as zeros) " + UNUSED_POOLER
    missing = [key for key in expected if key not in out]
    wrong = [f"{key} {tuple(out[key].shape)} vs {tuple(shape)}" for key, shape in expected.items()
             if key in out and out[key].shape != shape]
    if missing or wrong:
        raise ConfigError("the tower does not fill transformers' BridgeTower: "
                          + "; ".join([f"missing {k}" for k in missing[:3]] + wrong[:3]))
    return out, left_out


# --- checks and the answer rows -----------------------------------------------------------------------------
def _head_shapes(cfg: ModelConfig, task: str | None, vocab: int, itc_dim: int, answers: int) -> dict:
    """Shapes of the heads the tasks build (tasks/*.py), on the meta device."""
    from .model import ClassifierHead, ITCHead, ITMHead, MLMHead

    dim = cfg.hidden_size
    with torch.device("meta"):
        heads = {"mlm_head": MLMHead(dim, vocab), "itm_head": ITMHead(dim),
                 "itc_head": ITCHead(_text_width(cfg), _vision_width(cfg), itc_dim)}
        if task == "vqav2":
            heads["classifier"] = ClassifierHead(2 * dim, 4 * dim, answers)
        elif task == "snli_ve":
            heads["classifier"] = ClassifierHead(2 * dim, 4 * dim, 3)
        elif task == "nlvr2":
            heads["classifier"] = ClassifierHead(4 * dim, 2 * dim, 2)
    return {f"{name}.{k}": v.shape for name, head in heads.items() for k, v in head.state_dict().items()}


def _text_width(cfg: ModelConfig) -> int:
    return {**_preset_text(cfg.size), **cfg.text_config}["hidden_size"]


def _vision_width(cfg: ModelConfig) -> int:
    return {**_preset_vision(cfg.size), **cfg.vision_config}["width"]


def check_against_tower(out: dict, cfg: ModelConfig, task: str | None, itc_dim: int) -> None:
    """Every tower key of `cfg` is there with its shape, and every head tensor has the shape its task builds."""
    from .model import ManagerTower

    with torch.device("meta"):
        expected = {f"model.{k}": v.shape for k, v in ManagerTower(cfg).state_dict().items()}
    tower = {k for k in out if k.startswith("model.")}
    missing = sorted(set(expected) - tower)
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensors of the tower: {', '.join(missing[:5])}")
    extra = sorted(tower - set(expected))
    if extra:
        raise ConversionError(f"{len(extra)} converted tensors have no place in a {cfg.manager} tower: "
                              + ", ".join(extra[:5]))
    answers = out["classifier.fc2.weight"].shape[0] if "classifier.fc2.weight" in out else 0
    vocab = out["mlm_head.decoder.weight"].shape[0] if "mlm_head.decoder.weight" in out else 1
    expected.update(_head_shapes(cfg, task, vocab, itc_dim, answers))
    wrong = [f"{key} is {tuple(value.shape)}, here {tuple(expected[key])}" for key, value in out.items()
             if key in expected and value.shape != expected[key]]
    if wrong:
        raise ConversionError("shapes that do not fit: " + "; ".join(wrong[:4]))
    unknown = sorted(k for k in out if k not in expected)
    if unknown:
        raise ConversionError(f"converted heads this task does not build: {', '.join(unknown[:5])}")


def map_answer_rows(out: dict, labels_file: str | None, answer_vocab: str | None, notes: list[str]) -> list[str]:
    """Reorder a VQAv2 classifier's output rows from the released label ids (`labels_file`: their label -> answer
    list, or answer -> label mapping) to `answer_vocab` (ours; default the released list itself), by answer string.
    An answer of ours the released head lacks starts new (N(0, 0.02), bias 0, a fixed seed). Returns the answers
    in the order of the rows written."""
    from .tasks.vqa import load_answer_vocab

    if labels_file is None:
        raise ConversionError("a VQAv2 classifier's rows are the released label ids: give --vqa-labels (their "
                              "answer list, label order: `label2ans` of the released write_vqa.py) so they map to "
                              "answers by string")
    released = load_answer_vocab(labels_file)
    weight, bias = out["classifier.fc2.weight"], out["classifier.fc2.bias"]
    if len(released) != weight.shape[0]:
        raise ConversionError(f"{labels_file} lists {len(released)} answers; the checkpoint's VQAv2 classifier has "
                              f"{weight.shape[0]} rows")
    ours = load_answer_vocab(answer_vocab) if answer_vocab else released
    index = {answer: row for row, answer in enumerate(released)}
    generator = torch.Generator().manual_seed(0)
    new_weight = torch.empty(len(ours), weight.shape[1], dtype=weight.dtype).normal_(0.0, 0.02, generator=generator)
    new_bias = torch.zeros(len(ours), dtype=bias.dtype)
    found = [(i, index[a]) for i, a in enumerate(ours) if a in index]
    if found:
        rows_ours, rows_theirs = map(list, zip(*found))
        new_weight[rows_ours], new_bias[rows_ours] = weight[rows_theirs], bias[rows_theirs]
    out["classifier.fc2.weight"], out["classifier.fc2.bias"] = new_weight, new_bias
    notes.append(f"VQAv2 answers: {len(found)} of {len(ours)} rows from the released head by answer string, "
                 f"{len(ours) - len(found)} new; {len(released) - len(found)} released answers not in the "
                 "vocabulary dropped")
    return ours


# --- the conversion -----------------------------------------------------------------------------------------
@dataclass
class Conversion:
    out: Path
    format: str
    model: ModelConfig
    task: str | None
    mapped: dict[str, list[str]]
    dropped: dict[str, str]
    notes: list[str] = field(default_factory=list)
    finetune_overrides: list[str] = field(default_factory=list)


def convert_checkpoint(source: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, *,
                       tokenizer_dir: str | None = None, vqa_labels: str | None = None,
                       answer_vocab: str | None = None) -> Conversion:
    """Convert `source` (SOURCE_FORMATS; detected from its keys when `fmt` is None) into the weights folder `out`."""
    if fmt is not None and fmt not in SOURCE_FORMATS:
        raise ConversionError(f"format {fmt!r} is not one of {', '.join(SOURCE_FORMATS)}")
    if tokenizer_dir is not None and not os.path.isdir(tokenizer_dir):
        raise ConversionError(f"tokenizer folder {tokenizer_dir!r} does not exist: give a local folder holding the "
                              "text expert's tokenizer (e.g. a saved roberta-base)")
    state, source_config = read_source(source)
    detected = detect_format(state)
    if fmt is not None and fmt != detected:
        raise ConversionError(f"{source} holds {detected} names, not {fmt}: drop --format or give {detected}")
    notes: list[str] = []
    if detected == "hf-bridgetower":
        hf = _hf_config(source_config, notes)
        cfg = _hf_model_config(hf)
        ledger = _map_hf(state, hf, cfg)
        itc_dim = hf.contrastive_hidden_size
    else:
        cfg = _released_config(state, source_config, detected, tokenizer_dir, notes)
        ledger = _map_released(state, cfg, detected)
        itc_dim = int(source_config.get("contrastive_hidden_size", 256))
    out_dict = ledger.out
    if "itc_head.text_proj.weight" in out_dict:
        itc_dim = out_dict["itc_head.text_proj.weight"].shape[0]
    classifier = next((CLASSIFIERS[m.group(1)] for k in ledger.mapped if (m := re.match(r"^(\w+)_classifier\.", k))),
                      None)
    task = classifier or ("pretrain" if "mlm_head.decoder.weight" in out_dict else None)
    check_against_tower(out_dict, cfg, task, itc_dim)
    extra_overrides = []
    if "itc_head.text_proj.weight" in out_dict and itc_dim != 256:  # 256: task.itc_dim's default
        extra_overrides.append(f"task.itc_dim={itc_dim}")
    out = Path(out)
    if task == "vqav2":
        from .io import atomic_write_json
        from .tasks.vqa import VOCAB_FILE

        answers = map_answer_rows(out_dict, vqa_labels, answer_vocab, notes)
        atomic_write_json(out / VOCAB_FILE, answers, indent=None)
        extra_overrides.append(f"task.answer_vocab={(out / VOCAB_FILE).resolve()}")
    tokenizer = tokenizer_dir
    if tokenizer is None and cfg.size == "tiny" and not cfg.text_config:  # the tiny tower's own text expert
        from .hf_export import run_tokenizer

        tokenizer = run_tokenizer(cfg)
    if tokenizer is None:
        notes.append("no tokenizer folder given: the folder holds no tokenizer (give --tokenizer-dir to add it)")
    write_folder(out, out_dict, cfg, tokenizer=tokenizer, task=task, step=_step(source_config),
                 origin=f"converted from {detected} checkpoint {Path(source).name}",
                 extra_overrides=tuple(extra_overrides))
    conversion = Conversion(out=out, format=detected, model=cfg, task=task, mapped=ledger.mapped,
                            dropped=ledger.dropped, notes=notes,
                            finetune_overrides=json.loads((out / CONFIG_FILE).read_text())["finetune_overrides"])
    from .io import atomic_write_json

    atomic_write_json(out / REPORT_FILE, {"source": str(source), "format": detected, "task": task,
                                          "notes": notes, "mapped": ledger.mapped, "dropped": ledger.dropped})
    return conversion


def _step(config: dict) -> int | None:
    value = config.get("global_step") if isinstance(config, dict) else None
    return int(value) if isinstance(value, int) else None


if __name__ == "__main__":  # the library parses no command line
    raise SystemExit("the command line is `python -m doors.convert SOURCE --out DIR` (docs/weights.md)")
