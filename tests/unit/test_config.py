"""Typed configs: presets, recipes + overrides, renamed keys, a tower of every manager kind, a train.ds_config
file checked against the recipe, and one clear ConfigError (naming the key and the fix) for each mistake a user
can make. (The DeepSpeed config of each ZeRO layout and precision: tests/unit/engine/test_deepspeed_config.py.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from managertower.config import (FINETUNE_TASKS, MANAGER_KINDS, RENAMED_KEYS, SIZE_PRESETS, TASK_NAMES, Config,
                                  ConfigError, ModelConfig, all_keys, load_config)
from managertower.model import ManagerTower

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("pretrain/configs/*.yaml"),
                                                    *REPO.glob("finetune/configs/*.yaml")])


def model_cfg(*overrides):
    return load_config(None, list(overrides)).model


def test_size_presets():
    tiny = model_cfg("model.size=tiny")
    assert (tiny.hidden_size, tiny.num_heads, tiny.cross_layers, tiny.num_experts, tiny.image_size) == (64, 2, 2, 2, 64)
    assert tiny.vision_expert == "tiny"
    base = model_cfg("model.size=base")
    assert (base.hidden_size, base.num_heads, base.intermediate_size, base.cross_layers, base.num_experts) == \
        (768, 12, 3072, 6, 6)
    assert (base.image_size, base.max_text_len, base.manager, base.dropout) == (288, 50, "aaue_fused", 0.1)
    assert base.vision_expert == "ViT-B-16-quickgelu" and base.manager_mask_padding is False
    # an explicit value beats the preset
    assert model_cfg("model.size=tiny", "model.hidden_size=32", "model.num_heads=4").hidden_size == 32


def test_overrides_are_parsed_as_yaml_scalars():
    cfg = load_config(None, ["model.size=tiny", "model.dropout=0", "model.activation_checkpointing=true",
                             "model.text_config={hidden_dropout_prob: 0.0}", "model.manager_weights=scalar",
                             "train.betas=[0.9, 0.99]"])
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.model.activation_checkpointing is True
    assert cfg.model.text_config == {"hidden_dropout_prob": 0.0}
    assert cfg.train.betas == (0.9, 0.99)


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  size: tiny\n  manager: saue\ntrain:\n  steps: 7\n")
    cfg = load_config(str(recipe), ["model.manager=aaue"])
    assert (cfg.model.manager, cfg.model.size, cfg.train.steps) == ("aaue", "tiny", 7)
    out = tmp_path / "effective.yaml"
    cfg.save(str(out))
    again = load_config(str(out))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("kind", MANAGER_KINDS)
def test_every_manager_kind_builds(kind):
    """ModelConfig(size="tiny", manager=kind) builds a tower whose forward fuses a tiny batch: the text tokens,
    the class token + patches of the image and the two pooled halves of cls_feats, all finite; the kinds with
    learned aggregation weights report one row per cross-modal layer over the experts, each row summing to 1."""
    cfg = ModelConfig(size="tiny", manager=kind)
    torch.manual_seed(0)
    model = ManagerTower(cfg).eval()
    generator = torch.Generator().manual_seed(0)
    batch, text_len = 2, 9
    ids = torch.randint(5, model.text_expert.vocab_size, (batch, text_len), generator=generator)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[1, 6:] = 0  # one padded caption
    pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator)
    with torch.no_grad():
        out = model(ids, mask, pixels)
    patches = (cfg.image_size // 8) ** 2  # the tiny vision expert's 8-pixel patches
    assert out.text.shape == (batch, text_len, cfg.hidden_size)
    assert out.image.shape == (batch, 1 + patches, cfg.hidden_size)
    assert out.cls_feats.shape == (batch, 2 * cfg.hidden_size)
    assert all(torch.isfinite(t).all() for t in (out.text, out.image, out.cls_feats))
    weights = model.manager_weights()
    if kind in ("meter", "bridgetower"):  # METER reads the last layer only; BridgeTower one layer per layer
        assert weights == {}
    else:
        assert set(weights) == {"text", "image"}
        for side in ("text", "image"):
            assert weights[side].shape == (cfg.cross_layers, cfg.num_experts), side
            torch.testing.assert_close(weights[side].sum(-1), torch.ones(cfg.cross_layers))


def test_unknown_manager():
    with pytest.raises(ConfigError) as err:
        model_cfg("model.manager=aaue_fussed")
    message = str(err.value)
    assert "model.manager='aaue_fussed'" in message
    assert all(kind in message for kind in MANAGER_KINDS)  # the fix: the valid choices


def test_unknown_override_key_lists_close_matches():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.manger'.*did you mean model.manager"):
        load_config(None, ["model.manger=saue"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_expert'.*model.num_experts"):
        load_config(None, ["model.num_expert=3"])
    with pytest.raises(ConfigError, match="unknown config key 'nothing'"):  # the unknown section is named
        load_config(None, ["nothing.like.this=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["model.size"])


def test_unknown_key_in_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"model.hiden_size.*model.hidden_size"):
        load_config(str(recipe))


@pytest.mark.parametrize("override, pattern", [
    ("model.hidden_size=abc", r"model.hidden_size='abc' should be int"),
    ("model.hidden_size=64.5", r"model.hidden_size=64.5 should be int"),
    ("model.activation_checkpointing=maybe", r"model.activation_checkpointing='maybe' should be bool"),
    ("model.dropout=high", r"model.dropout='high' should be float"),
    ("model.text_config=5", r"model.text_config=5 should be dict"),
    ("model.num_experts=true", r"model.num_experts=True should be int"),
    ("model.dropout=1.5", r"model.dropout must be in \[0, 1\)"),
    ("model.num_experts=0", r"model.num_experts must be > 0"),
    ("model.layer_norm=fast", r"model.layer_norm='fast' is not one of auto, torch, apex"),
    ("model.manager_weights=matrix", r"model.manager_weights='matrix' is not one of vector, scalar"),
    ("model.size=huge", r"model.size='huge' is not one of base, tiny"),
    ("model.text_expert=/no/such/dir", r"model.text_expert='/no/such/dir' does not exist"),
    ("model.vision_checkpoint=/no/such.pt", r"model.vision_checkpoint='/no/such.pt' does not exist"),
    ("checkpoint.resume=never", r"checkpoint.resume='never' is neither auto, none nor an existing checkpoint"),
])
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, ["model.size=tiny", override])


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match=r"model.hidden_size=64 is not divisible by model.num_heads=3"):
        model_cfg("model.size=tiny", "model.num_heads=3")


def test_bridgetower_needs_as_many_experts_as_layers():
    with pytest.raises(ConfigError, match=r"model.num_experts \(2\) must be >= model.cross_layers \(3\)"):
        model_cfg("model.size=tiny", "model.manager=bridgetower", "model.cross_layers=3")


def test_more_experts_than_text_layers():
    cfg = model_cfg("model.size=tiny", "model.num_experts=5")  # the tiny text expert has 4 layers
    with pytest.raises(ConfigError, match=r"model.num_experts=5 is larger than the text expert's depth \(4 layers\)"
                                          r": use at most 4"):
        ManagerTower(cfg)


def test_more_experts_than_vision_blocks():
    cfg = model_cfg("model.size=tiny", "model.num_experts=5", "model.text_config={num_hidden_layers: 6}")
    with pytest.raises(ConfigError, match=r"model.num_experts=5 is larger than the vision expert's depth "
                                          r"\(4 blocks\): use at most 4"):
        ManagerTower(cfg)


def test_image_size_not_a_multiple_of_the_patch():
    cfg = model_cfg("model.size=tiny", "model.image_size=60")
    with pytest.raises(ConfigError, match=r"model.image_size=60 is not a multiple of the vision expert's patch size 8"
                                          r": use e.g. 56 or 64"):
        ManagerTower(cfg)


def test_unknown_vision_expert():
    cfg = model_cfg("model.size=base", "model.vision_expert=ViT-Q-99")
    with pytest.raises(ConfigError, match=r"model.vision_expert='ViT-Q-99' is not an open_clip model name"):
        ManagerTower(cfg)


def test_base_without_tokenizer_path_is_a_clear_error():
    from managertower.model import load_tokenizer

    with pytest.raises(ConfigError, match=r"model.size=base without model.text_expert has no tokenizer.*"
                                          r"model.tokenizer"):
        load_tokenizer(model_cfg("model.size=base"))


def test_other_sections_check_themselves():
    with pytest.raises(ConfigError, match=r"train.global_batch=10 is not a multiple of train.micro_batch=4"):
        load_config(None, ["train.global_batch=10", "train.micro_batch=4"])
    with pytest.raises(ConfigError, match=r"task.mlm_probability must be in \(0, 1\), got 1.5"):
        load_config(None, ["task.mlm_probability=1.5"])
    cfg = Config()
    with pytest.raises(ConfigError, match=r"micro_batch x world_size = 8 x 3 = 24"):
        cfg.train.grad_accum(3)
    assert cfg.train.grad_accum(4) == 4096 // 32


# --- renamed keys ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_a_renamed_key_names_its_new_name(old, new, tmp_path):
    with pytest.raises(ConfigError, match=rf"^config key '{old}' was renamed: use '{new}'$"):
        load_config(None, [f"{old}=1"])
    section, key = old.split(".")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"^config key '{old}' was renamed: use '{new}'$"):
        load_config(str(recipe))
    assert new in all_keys() and old not in all_keys()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads(recipe):
    # the base recipes name placeholder weight paths (/path/to/roberta-base): cleared here
    cfg = load_config(str(REPO / recipe), ["model.text_expert=null", "model.vision_checkpoint=null"])
    assert cfg.task.hard_negative_eval is (recipe == "pretrain/configs/tiny.yaml")  # only the demo can make them


def test_task_names_are_listed_once():
    import finetune.__main__ as finetune_door
    from managertower.tasks import TASKS

    assert set(TASKS) == set(TASK_NAMES) and FINETUNE_TASKS == TASK_NAMES[1:] and "pretrain" not in FINETUNE_TASKS
    assert finetune_door.TASK_NAMES == FINETUNE_TASKS
    with pytest.raises(ConfigError, match="task.name='vqa' is not one of " + ", ".join(TASK_NAMES)):
        load_config(None, ["task.name=vqa"])


# --- size presets --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(SIZE_PRESETS))
def test_a_direct_model_config_has_its_size_preset(size):
    model = ModelConfig(size=size)
    assert {key: getattr(model, key) for key in SIZE_PRESETS[size]} == SIZE_PRESETS[size]
    assert model == load_config(None, [f"model.size={size}"]).model
    explicit = ModelConfig(size=size, hidden_size=32, num_heads=4)  # an explicit value wins
    assert (explicit.hidden_size, explicit.num_heads) == (32, 4)
    assert explicit.cross_layers == SIZE_PRESETS[size]["cross_layers"]


def test_the_saved_config_holds_the_preset_and_loads_the_same(tmp_path):
    cfg = load_config(None, ["model.size=tiny", "model.hidden_size=96", "model.num_heads=3", "train.offload=none"])
    path = tmp_path / "run" / "config.yaml"
    cfg.save(str(path))
    saved = yaml.safe_load(path.read_text())["model"]
    assert {key: saved[key] for key in SIZE_PRESETS["tiny"]} == {**SIZE_PRESETS["tiny"], "hidden_size": 96,
                                                                 "num_heads": 3}
    again = load_config(str(path))
    assert again == cfg and again.to_dict() == cfg.to_dict()


# --- train.ds_config and offload --------------------------------------------------------------------------------

def ds_file(tmp_path, settings: dict) -> str:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(settings))
    return str(path)


@pytest.mark.parametrize("settings, overrides, pattern", [
    ({"bf16": {"enabled": True}}, ["train.precision=fp16"],
     r"sets precision bf16 \(its bf16 section\) but train.precision=fp16: set train.precision=bf16"),
    ({"fp16": {"enabled": True}}, ["train.precision=bf16"], r"sets precision fp16 .* but train.precision=bf16"),
    ({"bfloat16": {"enabled": False}}, ["train.precision=bf16"], r"sets precision fp32 .* but train.precision=bf16"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, ["train.precision=bf16"], r"enables both bf16 and fp16"),
    ({"zero_optimization": {"stage": 3}}, ["train.zero_stage=2"],
     r"sets zero_optimization.stage=3 but train.zero_stage=2: set train.zero_stage=3"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, ["train.offload=none"],
     r"offloads the optimizer but train.offload=none: set train.offload=optimizer"),
    ({"zero_optimization": {"stage": 3}}, ["train.zero_stage=3", "train.offload=all"],
     r"offloads nothing but train.offload=all: set train.offload=none"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, ["train.zero_stage=3"],
     r"offloads the parameters but not the optimizer"),
    ({"train_batch_size": 8}, [], r"sets 'train_batch_size': ds_configs hold engine knobs only"),
    ({"optimizer": {"type": "Adam"}}, [], r"sets 'optimizer': ds_configs hold engine knobs only"),
    ({"scheduler": {"type": "WarmupLR"}}, [], r"sets 'scheduler': ds_configs hold engine knobs only"),
])
def test_ds_config_file_disagreeing_with_the_recipe(tmp_path, settings, overrides, pattern):
    path = ds_file(tmp_path, settings)
    with pytest.raises(ConfigError, match=rf"^train.ds_config={path} " + pattern):
        load_config(None, [f"train.ds_config={path}", *overrides])  # at config time, before DeepSpeed


def test_ds_config_file_of_your_own(tmp_path):
    from managertower.engine.deepspeed_config import build_ds_config

    fp16 = {"enabled": True, "loss_scale": 128}
    path = ds_file(tmp_path, {"fp16": fp16, "zero_optimization": {"reduce_bucket_size": 1000}})
    train = load_config(None, [f"train.ds_config={path}", "train.precision=fp16", "train.zero_stage=1"]).train
    config, source = build_ds_config(train, world_size=1, precision="fp16")
    assert str(source) == path and config["fp16"] == fp16  # the file's own section is kept
    assert config["zero_optimization"] == {"reduce_bucket_size": 1000, "stage": 1}  # the recipe's stage filled in
    assert "fp16" not in build_ds_config(train, world_size=1, precision="fp32")[0]  # the CPU runs fp32
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken.json is not valid JSON"):
        load_config(None, [f"train.ds_config={tmp_path / 'broken.json'}"])
    with pytest.raises(ConfigError, match=r"train.ds_config=/no/such.json does not exist"):
        load_config(None, ["train.ds_config=/no/such.json"])


@pytest.mark.parametrize("overrides, pattern", [
    (["train.offload=all"], r"train.offload=all with train.zero_stage=2 is not a ZeRO layout in ds_configs"),
    (["train.offload=optimizer", "train.zero_stage=3"], r"offload=optimizer goes with zero_stage=2"),
    (["train.offload=cpu"], r"train.offload='cpu' is not one of none, optimizer, all"),
    (["train.offload=optimizer", "train.optimizer=torch_adamw"],
     r"train.optimizer=torch_adamw cannot run with train.offload=optimizer"),
])
def test_offload_needs_its_layout_and_cpu_adam(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


# --- validation gaps -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, pattern", [
    ("train.lr=nan", r"^train.lr must be a finite number > 0, got nan$"),
    ("train.lr=inf", r"^train.lr must be a finite number > 0, got inf$"),
    ("train.lr=.inf", r"^train.lr must be a finite number > 0, got inf$"),
    ("train.min_lr_ratio=-0.1", r"^train.min_lr_ratio must be in \[0, 1\], got -0.1$"),
    ("train.min_lr_ratio=1.5", r"^train.min_lr_ratio must be in \[0, 1\], got 1.5$"),
    ("train.weight_decay=-0.01", r"^train.weight_decay must be >= 0, got -0.01$"),
    ("train.grad_clip=-1", r"^train.grad_clip must be >= 0, got -1.0$"),
    ("train.new_layer_lr_mult=nan", r"^train.new_layer_lr_mult must be a finite number >= 0, got nan$"),
    ("train.eval_batches=0", r"^train.eval_batches must be > 0, got 0$"),
    ("data.shuffle_buffer=-1", r"^data.shuffle_buffer must be >= 0, got -1$"),
    ("task.epochs=-1", r"^task.epochs must be >= 0, got -1.0$"),
    ("task.epochs=nan", r"^task.epochs must be a finite number >= 0, got nan$"),
    ("task.itm_negative_fraction=2", r"^task.itm_negative_fraction must be in \[0, 1\], got 2.0$"),
])
def test_validation_gaps(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])
