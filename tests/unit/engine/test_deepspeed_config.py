"""The DeepSpeed config: engine knobs from the layout file, batch sizes from the recipe, the precision section
of each ZeRO layout and precision, the precision the engine runs on a GPU or a CPU (with or without bf16
instructions) and the log note when it differs, and the layout files as package data of ds_configs."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from managertower.config import DS_LAYOUTS, PRECISIONS, ConfigError, load_config
from managertower.engine import deepspeed_config
from managertower.engine.deepspeed_config import build_ds_config, cpu_has_bf16, effective_precision, precision_notes


def test_ds_config_takes_engine_knobs_from_file_and_batches_from_recipe(tmp_path):
    train = load_config(None, ["train.global_batch=4096", "train.micro_batch=8", "train.zero_stage=2",
                               "train.grad_clip=1.0"]).train
    config, path = build_ds_config(train, world_size=64)
    assert path.name == "zero2.json" and "fp16" not in config
    assert ("bf16" in config) == (effective_precision(train) == "bf16")  # what this machine runs
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
    train = load_config(None, [f"train.zero_stage={stage}", f"train.offload={offload}", f"train.precision={precision}",
                               "train.global_batch=64", "train.micro_batch=8", "train.grad_clip=1.0"]).train
    if (stage, precision) == (0, "bf16"):  # DeepSpeed accumulates bf16's gradients in fp32 only under ZeRO
        with pytest.raises(ConfigError, match="train.precision=bf16 needs train.zero_stage >= 1"):
            build_ds_config(train, world_size=4, precision=precision)
        return
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
    # without an explicit precision: what this machine runs
    assert build_ds_config(train, world_size=4)[0] == build_ds_config(train, 4, effective_precision(train))[0]


@pytest.mark.parametrize("data_types, accumulates", [(None, "fp32"), ({"grad_accum_dtype": "bf16"}, "bf16")])
def test_a_bf16_file_of_ones_own_accumulates_in_fp32_unless_it_says_otherwise(tmp_path, data_types, accumulates):
    own = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    if data_types:
        own["data_types"] = data_types
    path = tmp_path / "own.json"
    path.write_text(json.dumps(own))
    train = load_config(None, [f"train.ds_config={path}", "train.precision=bf16"]).train
    config = build_ds_config(train, world_size=1, precision="bf16")[0]
    assert config["bf16"] == {"enabled": True} and config["data_types"] == {"grad_accum_dtype": accumulates}


def test_layout_files_are_package_data_of_ds_configs():
    import ds_configs
    from managertower.engine.deepspeed_config import layout_path

    package = Path(ds_configs.__file__).resolve().parent
    for stage, offload in DS_LAYOUTS:
        path = layout_path(load_config(None, [f"train.zero_stage={stage}", f"train.offload={offload}"]).train)
        assert path.is_file() and path.resolve().parent == package
    assert sorted(p.name for p in package.glob("*.json")) == sorted(DS_LAYOUTS.values())  # no file left unnamed


def _train(*overrides: str):
    return load_config(None, list(overrides)).train


@pytest.mark.parametrize("asked, has_bf16, runs, note", [
    ("bf16", True, "bf16", None),
    ("bf16", False, "fp32", "this CPU has no bf16 instructions"),
    ("fp16", True, "fp32", "train.precision=fp16 needs CUDA"),
    ("fp16", False, "fp32", "train.precision=fp16 needs CUDA"),
    ("fp32", True, "fp32", None),
    ("fp32", False, "fp32", None),
])
def test_precision_on_the_cpu(monkeypatch, asked, has_bf16, runs, note):
    """On the CPU bf16 runs where the CPU has bf16 instructions; otherwise (and for fp16) the run falls back to
    fp32 with one log note saying why; the DeepSpeed config carries the precision that runs."""
    monkeypatch.setattr(deepspeed_config, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(deepspeed_config.torch.cuda, "is_available", lambda: False)
    train = _train(f"train.precision={asked}", "train.global_batch=8", "train.micro_batch=8")
    assert effective_precision(train) == runs
    notes = precision_notes(train)
    assert (notes == []) if note is None else (len(notes) == 1 and note in notes[0] and "running fp32" in notes[0])
    config = build_ds_config(train, world_size=1)[0]
    assert ("bf16" in config, "fp16" in config) == (runs == "bf16", False)


@pytest.mark.parametrize("device, accelerator, on_gpu", [
    ("auto", None, True), ("cuda", None, True), ("cpu", "cpu", False), ("auto", "cpu", False)])
def test_precision_on_a_gpu_machine(monkeypatch, device, accelerator, on_gpu):
    """With CUDA, train.precision runs as asked (fp16 too) unless the run is put on the CPU (train.device=cpu,
    DS_ACCELERATOR=cpu, as dist.device decides): then the CPU's rules hold, here a CPU without bf16."""
    monkeypatch.setattr(deepspeed_config, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(deepspeed_config.torch.cuda, "is_available", lambda: True)
    if accelerator is None:
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    else:
        monkeypatch.setenv("DS_ACCELERATOR", accelerator)
    for asked in ("bf16", "fp16", "fp32"):
        train = _train(f"train.precision={asked}", f"train.device={device}")
        assert effective_precision(train) == (asked if on_gpu else "fp32")
        assert bool(precision_notes(train)) == (not on_gpu and asked != "fp32")


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo")
def test_cpu_bf16_detection_agrees_with_the_cpu_flags():
    """cpu_has_bf16 is the kernel's avx512_bf16 / amx_bf16 flags (not DeepSpeed's is_bf16_supported, which says
    True on every CPU, nor oneDNN's check, which says True on any AVX512 CPU where bf16 is emulated)."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
