"""The DeepSpeed config: engine knobs from the layout file, batch sizes from the recipe, the precision section
of each ZeRO layout and precision, and the layout files as package data of ds_configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from managertower.config import DS_LAYOUTS, PRECISIONS, ConfigError, load_config
from managertower.engine.deepspeed_config import build_ds_config


def test_ds_config_takes_engine_knobs_from_file_and_batches_from_recipe(tmp_path):
    train = load_config(None, ["train.global_batch=4096", "train.micro_batch=8", "train.zero_stage=2",
                               "train.grad_clip=1.0"]).train
    config, path = build_ds_config(train, world_size=64)
    assert path.name == "zero2.json" and "bf16" not in config and "fp16" not in config  # no CUDA here: fp32
    assert config["train_batch_size"] == 4096 and config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 8  # 8 x 64 x 8 = 4096, the paper's arithmetic
    assert config["gradient_clipping"] == 1.0 and config["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError, match="not divisible by micro_batch x world_size"):
        build_ds_config(train, world_size=48)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="engine knobs only"):
        build_ds_config(load_config(None, [f"train.ds_config={bad}"]).train, world_size=1)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage, offload", sorted(DS_LAYOUTS))
def test_ds_config_of_each_layout_and_precision(stage, offload, precision):
    from managertower.engine.deepspeed_config import build_ds_config, effective_precision

    train = load_config(None, [f"train.zero_stage={stage}", f"train.offload={offload}", f"train.precision={precision}",
                               "train.global_batch=64", "train.micro_batch=8", "train.grad_clip=1.0"]).train
    config, path = build_ds_config(train, world_size=4, precision=precision)
    assert path.name == DS_LAYOUTS[(stage, offload)]
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero, "offload_param" in zero) == {"none": (False, False),
                                                                     "optimizer": (True, False),
                                                                     "all": (True, True)}[offload]
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"], config["gradient_clipping"]) == (64, 8, 2, 1.0)
    assert {"optimizer", "scheduler"}.isdisjoint(config)
    if precision == "bf16":
        assert config["bf16"] == {"enabled": True} and "fp16" not in config
        assert config["data_types"] == {"grad_accum_dtype": "fp32"}  # accumulate the micro-steps in fp32
    elif precision == "fp16":
        assert config["fp16"]["enabled"] is True and config["fp16"]["loss_scale"] == 0 and "bf16" not in config
    else:
        assert "bf16" not in config and "fp16" not in config
    # without an explicit precision: what this machine runs (fp32 without CUDA)
    assert build_ds_config(train, world_size=4)[0] == build_ds_config(train, 4, effective_precision(train))[0]


def test_layout_files_are_package_data_of_ds_configs():
    import ds_configs
    from managertower.engine.deepspeed_config import layout_path

    package = Path(ds_configs.__file__).resolve().parent
    for stage, offload in DS_LAYOUTS:
        path = layout_path(load_config(None, [f"train.zero_stage={stage}", f"train.offload={offload}"]).train)
        assert path.is_file() and path.resolve().parent == package
    assert sorted(p.name for p in package.glob("*.json")) == sorted(DS_LAYOUTS.values())  # no file left unnamed
