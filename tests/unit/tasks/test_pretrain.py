"""Engine pieces in-process: parameter groups, schedule, DeepSpeed config, checkpoint discovery, logging,
and the one-vision-pass pre-training step against the naive two-pass step."""
from __future__ import annotations

import json

import pytest
import torch

from managertower.config import ConfigError, load_config
from managertower.engine import checkpoint as ckpt
from managertower.engine.deepspeed_config import build_ds_config
from managertower.engine.logging import RunLogger
from managertower.engine.optim import build_scheduler, param_groups, warmup_linear_decay
from managertower.tasks.pretrain import PretrainTask


@pytest.fixture(scope="module")
def task():
    cfg = load_config(None, ["model.size=tiny", "model.dropout=0.0", "train.lr=1e-4", "train.new_layer_lr_mult=5"])
    torch.manual_seed(0)
    return PretrainTask(cfg)


def test_param_groups_follow_spec(task):
    groups = param_groups(task, task.cfg.train, task.lr_multiplier)
    by_name = {name: group for group in groups for name in group["names"]}
    assert len(by_name) == sum(1 for p in task.parameters() if p.requires_grad)
    # experts at the base lr, everything new (projections, cross-modal, poolers, managers, heads) at 5x
    assert by_name["model.text_expert.encoder.encoder.layer.0.attention.self.query.weight"]["lr"] == pytest.approx(1e-4)
    assert by_name["model.vision_expert.visual.transformer.resblocks.0.mlp.c_fc.weight"]["lr"] == pytest.approx(1e-4)
    for name in ("model.text_proj.weight", "model.text_layers.0.self_attn.query.weight", "model.text_pooler.dense.weight",
                 "model.image_managers.1.query.weight", "mlm_head.decoder.weight", "itm_head.fc.weight"):
        assert by_name[name]["lr"] == pytest.approx(5e-4), name
    # no decay on biases and LayerNorm weights (ours, transformers' and open_clip's), decay elsewhere
    for name in ("model.text_proj.bias", "model.text_layers.0.self_norm.weight",
                 "model.text_expert.encoder.embeddings.LayerNorm.weight", "model.vision_expert.visual.ln_post.weight",
                 "model.image_managers.0.expert_norm_weight", "model.vision_expert.visual.transformer.resblocks.0.ln_1.weight"):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("model.text_proj.weight", "mlm_head.decoder.weight",
                 "model.text_expert.encoder.encoder.layer.0.attention.self.query.weight"):
        assert by_name[name]["weight_decay"] == pytest.approx(0.01), name


def test_schedule_warms_up_then_decays_linearly_per_optimizer_step():
    factor = warmup_linear_decay(total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert [round(factor(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.5) and factor(99) == pytest.approx(0.0111, abs=1e-3)
    cfg = load_config(None, ["train.steps=20", "train.warmup=0.1", "train.lr=1e-3"]).train
    assert cfg.warmup_steps() == 2
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(5e-4) and seen[1] == pytest.approx(1e-3) and seen[-1] < 1e-4


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


def test_find_resume_ignores_incomplete_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"step-{step}"
        folder.mkdir()
        if complete:
            (folder / ckpt.COMPLETE).write_text("")
    (tmp_path / ".tmp-step-8").mkdir()
    assert ckpt.find_resume(tmp_path).name == "step-4"
    (tmp_path / "latest").write_text("step-2")
    assert ckpt.find_resume(tmp_path).name == "step-2"  # latest names a complete one
    (tmp_path / "latest").write_text("step-6")
    assert ckpt.find_resume(tmp_path).name == "step-4"  # latest names an incomplete one: the newest complete
    assert ckpt.resolve_resume("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "step-6"), tmp_path)


def test_resumed_logger_drops_lines_past_the_checkpoint(tmp_path):
    logger = RunLogger(tmp_path, total_steps=10, tensorboard=False, progress=False)
    for step in range(1, 8):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "loss"')  # a line cut by a crash
    RunLogger(tmp_path, total_steps=10, start_step=5, tensorboard=False, progress=False).close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


def _batch(task, size=6, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vocab = task.model.text_expert.vocab_size
    ids = torch.randint(5, vocab, (size, length), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    masked = ids.clone()
    masked[:, 3] = 4
    index = torch.tensor([0, 2, 2, 3, 1, 5])
    return {"pixel_values": torch.randn(size, 3, 64, 64, generator=generator), "input_ids": ids,
            "attention_mask": mask, "mlm_input_ids": masked, "mlm_labels": labels, "itm_image_index": index,
            "itm_labels": (index == torch.arange(size)).long()}


def test_one_vision_pass_equals_the_two_pass_step(task):
    task.eval()  # no dropout and no manager noise: the two steps must agree
    batch = _batch(task)
    one, two = task(batch), task.forward_two_pass(batch)
    for key in ("loss", "loss_mlm", "loss_itm"):
        assert torch.allclose(one[key], two[key], atol=1e-5, rtol=1e-5), key
    task.zero_grad()
    one["loss"].backward()
    grads_one = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad()
    two["loss"].backward()
    for name, param in task.named_parameters():
        assert torch.allclose(grads_one[name], param.grad, atol=1e-5, rtol=1e-4), name
    task.train()


def test_every_parameter_gets_a_gradient_from_one_pretraining_step(task):
    task.train()
    task.zero_grad()
    task(_batch(task, seed=1))["loss"].backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not missing, missing


def test_optional_itc_adds_a_contrastive_loss_that_reaches_the_experts():
    cfg = load_config(None, ["model.size=tiny", "model.dropout=0.0", "task.itc_weight=0.5"])
    torch.manual_seed(0)
    task = PretrainTask(cfg)
    batch = _batch(task)
    batch["image_ids"] = torch.tensor([7, 7, 8, 9, 10, 11])  # two captions of one picture: both positives
    out = task(batch)
    assert torch.allclose(out["loss"], out["loss_mlm"] + out["loss_itm"] + 0.5 * out["loss_itc"])
    task.zero_grad()
    out["loss_itc"].backward()
    assert task.itc_head.text_proj.weight.grad.abs().sum() > 0
    assert task.model.vision_expert.visual.conv1.weight.grad.abs().sum() > 0
    assert PretrainTask(load_config(None, ["model.size=tiny"])).itc_head is None  # the paper's recipe: no ITC


def test_the_same_config_builds_the_same_weights():
    cfg = load_config(None, ["model.size=tiny", "task.itc_weight=1", "train.seed=3"])
    torch.manual_seed(123)
    first = PretrainTask(cfg).state_dict()
    torch.manual_seed(456)  # whatever ran before: the task seeds itself from train.seed
    second = PretrainTask(cfg).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
