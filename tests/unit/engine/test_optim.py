"""Optimizer pieces: parameter groups (lr multipliers, no decay on biases and LayerNorms), the warm-up + linear
decay schedule per optimizer step, and the choice of optimizer (with and without offload)."""
from __future__ import annotations

import pytest
import torch

from managertower.config import load_config
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
    # no decay where the released name rule finds it (biases, "LayerNorm"/"norm" names: ours and transformers');
    # open_clip's ln_* and the managers' per-input norms are decayed, as released (meter_utils.set_schedule)
    for name in ("model.text_proj.bias", "model.text_layers.0.self_norm.weight",
                 "model.text_expert.encoder.embeddings.LayerNorm.weight"):
        assert by_name[name]["weight_decay"] == 0.0, name
    for name in ("model.text_proj.weight", "mlm_head.decoder.weight", "model.vision_expert.visual.ln_post.weight",
                 "model.image_managers.0.expert_norm_weight",
                 "model.vision_expert.visual.transformer.resblocks.0.ln_1.weight",
                 "model.text_expert.encoder.encoder.layer.0.attention.self.query.weight"):
        assert by_name[name]["weight_decay"] == pytest.approx(0.01), name


def test_schedule_warms_up_then_decays_linearly_per_optimizer_step():
    factor = warmup_linear_decay(total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert [round(factor(s), 3) for s in (0, 4, 9)] == [0.0, 0.4, 0.9]
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
    assert seen[0] == 0.0 and seen[1] == pytest.approx(5e-4) and seen[2] == pytest.approx(1e-3) and seen[-1] < 1e-4


@pytest.mark.parametrize("optimizer, offload, cuda, kind", [
    ("auto", "none", False, "torch_adamw"),
    ("auto", "none", True, "fused_adam"),
    ("auto", "optimizer", True, "cpu_adam"),  # DeepSpeed refuses FusedAdam with offload
    ("auto", "optimizer", False, "cpu_adam"),
    ("deepspeed_adam", "none", True, "fused_adam"),
    ("deepspeed_adam", "none", False, "cpu_adam"),
    ("deepspeed_adam", "optimizer", True, "cpu_adam"),
    ("torch_adamw", "none", True, "torch_adamw"),
])
def test_optimizer_choice(optimizer, offload, cuda, kind):
    # The choice, not the CPU Adam itself: DeepSpeedCPUAdam compiles a native op at first use (2 minutes here).
    from managertower.engine.optim import optimizer_kind

    train = load_config(None, [f"train.optimizer={optimizer}", f"train.offload={offload}"]).train
    assert optimizer_kind(train, cuda=cuda) == kind


def test_build_optimizer_on_the_cpu():
    import torch

    from managertower.engine.optim import build_optimizer

    train = load_config(None, ["train.lr=1e-3"]).train
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = build_optimizer([{"params": [param], "names": ["w"], "lr": 1e-3, "weight_decay": 0.0}], train)
    if not torch.cuda.is_available():
        assert type(optimizer) is torch.optim.AdamW and "names" not in optimizer.param_groups[0]
