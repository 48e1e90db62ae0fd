"""Typed configs: presets, recipes + overrides, and one clear ConfigError (naming the key and the fix) for each
mistake a user can make in the model section."""
from __future__ import annotations

import pytest

from managertower.config import MANAGER_KINDS, Config, ConfigError, ModelConfig, load_config
from managertower.model import ManagerTower


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
    cfg = model_cfg("model.size=tiny", f"model.manager={kind}")
    assert ModelConfig(**{**cfg.__dict__}).manager == kind


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
    with pytest.raises(ConfigError, match="data.mlm_probability"):
        load_config(None, ["data.mlm_probability=1.5"])
    cfg = Config()
    with pytest.raises(ConfigError, match=r"micro_batch x world_size = 8 x 3 = 24"):
        cfg.train.grad_accum(3)
    assert cfg.train.grad_accum(4) == 4096 // 32
