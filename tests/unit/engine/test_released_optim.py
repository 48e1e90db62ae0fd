"""The optimisation side of the authors' released recipe (public repository LooperXX/ManagerTower): parameter
groups as released `src/modules/meter_utils.py` `set_schedule` builds them, the ITC temperature as a raw parameter
clamped in place after each step, the warm-up from lr 0, and the COCO retrieval lr. Each test names the released
file and lines it follows; each fails on the behaviour this project had before.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO
from managertower.config import load_config
from managertower.engine.optim import build_scheduler, param_groups, warmup_linear_decay
from managertower.tasks import build_task

# --- the released rule, written out from meter_utils.py:265-351 -------------------------------------------
RELEASED_NO_DECAY = ["bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                     "norm1.weight", "norm2.bias", "norm2.weight"]
RELEASED_HEADS = ["vqa_classifier", "nlvr2_classifier", "snli_classifier", "mlm_score", "itm_score"]


def released_group(name: str, head_mult: float, cross_modal_mult: float) -> tuple[float, bool]:
    """(lr multiplier, no decay) of a released parameter name: heads at lr_mult_head, names with "cross_modal" at
    lr_mult_cross_modal, the rest at lr; no decay for names containing one of RELEASED_NO_DECAY."""
    head, cross = any(h in name for h in RELEASED_HEADS), "cross_modal" in name
    assert not (head and cross), name  # such a name is in none of the released groups
    return (head_mult if head else cross_modal_mult if cross else 1.0), any(nd in name for nd in RELEASED_NO_DECAY)


# Our names -> the released modules' names (mt_module.py, bt_module.py, heads.py, bert_model.py, clip_model.py).
CROSS_LAYER = {"self_attn.out": "attention.output.dense", "self_attn": "attention.self",
               "self_norm": "attention.output.LayerNorm", "cross_attn.out": "crossattention.output.dense",
               "cross_attn": "crossattention.self", "cross_norm": "crossattention.output.LayerNorm",
               "ffn_in": "intermediate.dense", "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
MANAGER = {"expert_norm_weight": "LayerNorm.0.weight", "expert_norm_bias": "LayerNorm.0.bias",  # one of N
           "prev_norm.weight": "LayerNorm.{n}.weight", "prev_norm.bias": "LayerNorm.{n}.bias",  # heads.py:68, 133
           "logits": "layer_scores", "temperature": "softmax_temperature", "prev_weight": "layer_scores_cross",
           "to_logits": "linear_controller", "query": "fusion_attention.q_proj", "key": "fusion_attention.k_proj",
           "other_norm": "extra_query_LayerNorm"}
HEADS = {"mlm_head.dense": "mlm_score.transform.dense", "mlm_head.norm": "mlm_score.transform.LayerNorm",
         "mlm_head.decoder.weight": "mlm_score.decoder.weight", "mlm_head.decoder.bias": "mlm_score.bias",
         "itm_head.fc": "itm_score.fc", "itc_head.text_proj": "cross_modal_itc_text_head.fc",
         "itc_head.image_proj": "cross_modal_itc_image_head.fc", "itc_head.learned_temperature": "temperature",
         # mt_module.py:198-209: nn.Sequential(Linear, LayerNorm, GELU, Linear)
         "classifier.fc1": "snli_classifier.0", "classifier.norm": "snli_classifier.1",
         "classifier.fc2": "snli_classifier.3"}


def replace_prefix(name: str, table: dict) -> str | None:
    for ours, theirs in sorted(table.items(), key=lambda kv: -len(kv[0])):
        if name == ours or name.startswith(ours + "."):
            return theirs + name[len(ours):]
    return None


def released_name(name: str, num_experts: int, kind: str) -> str:
    fixed = {"model.text_proj.": "cross_modal_text_transform.", "model.image_proj.": "cross_modal_image_transform.",
             "model.type_embedding.": "token_type_embeddings.", "model.text_layer_embedding.": "layer_embeddings_text.",
             "model.image_layer_embedding.": "layer_embeddings_image.",
             "model.text_expert.encoder.": "text_transformer.", "model.vision_expert.visual.": "vit_model.visual.",
             "model.text_pooler.": "cross_modal_text_pooler.", "model.image_pooler.": "cross_modal_image_pooler."}
    for ours, theirs in fixed.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    match = re.match(r"model\.(text|image)_layers\.(\d+)\.(.*)", name)
    if match:
        side, layer, rest = match.groups()
        return f"cross_modal_{side}_layers.{layer}.{replace_prefix(rest, CROSS_LAYER)}"
    match = re.match(r"model\.(text|image)_managers\.(\d+)\.(.*)", name)
    if match:
        side, layer, rest = match.groups()
        if kind == "bridgetower":  # bt_module.py:124-130: a LayerNorm at layer 1, then one LinkTower per layer
            return (f"cross_modal_{side}_layernorm.{rest.split('.')[-1]}" if layer == "0" else
                    f"cross_modal_{side}_link_tower.{int(layer) - 1}.LayerNorm.{rest.split('.')[-1]}")
        released = replace_prefix(rest, MANAGER).format(n=num_experts)
        return f"cross_modal_{side}_manager_tower.{layer}.manager_layer.{released}"
    released = replace_prefix(name, HEADS)
    assert released is not None, f"no released counterpart for {name}"
    return released


def group_table(task, head_mult: float, cross_modal_mult: float, kind: str):
    """{our name: (ours, released)} with (lr multiplier, no decay) for each, and the two counts per group."""
    groups = param_groups(task, task.cfg.train, task.lr_multiplier)
    ours = {name: (group["lr_mult"], group["weight_decay"] == 0.0) for group in groups for name in group["names"]}
    released = {name: released_group(released_name(name, task.cfg.model.num_experts, kind), head_mult,
                                     cross_modal_mult) for name in ours}
    return ours, released


CASES = {  # task, overrides, the released lr_mult_head and lr_mult_cross_modal of that task (src/config.py)
    "pretrain": ("pretrain", ["task.itc_weight=0.1"], 5, 5),  # config.py:176-178
    "pretrain_bridgetower": ("pretrain", ["model.manager=bridgetower"], 5, 5),
    "snli_ve": ("snli_ve", [], 10, 5),  # config.py:217-219
    "flickr30k": ("flickr30k", [], 5, 5),  # config.py:257-259
}


@pytest.mark.parametrize("case", CASES)
def test_released_param_groups_follow_set_schedule(case):
    """Released src/modules/meter_utils.py:265-351 (set_schedule): the larger lrs only for the heads
    (lr_mult_head, meter_utils.py:276) and names with "cross_modal" (lr_mult_cross_modal, :277), so the type and
    layer-index embeddings (mt_module.py:53, 128-131) and the ITC temperature (mt_module.py:103) train at lr; no
    weight decay only for names containing "bias" or "LayerNorm."/"norm." + weight/bias (:265-275), so CLIP's ln_*
    (clip_model.py:29, 35, 83, 86), the managers' LayerNorm lists (heads.py:68, 133), the classifiers' Sequential
    LayerNorm (mt_module.py:205) and every temperature are decayed. Ours put the embeddings and the temperature at
    5x and kept every LayerNorm and temperature out of weight decay."""
    task_name, overrides, head_mult, cross_modal_mult = CASES[case]
    cfg = load_config(None, ["model.size=tiny", f"task.name={task_name}", "model.num_experts=3",
                             "model.cross_layers=3", *overrides])
    assert cfg.train.no_decay == "released"
    torch.manual_seed(0)
    task = build_task(cfg)
    ours, released = group_table(task, head_mult, cross_modal_mult, cfg.model.manager)
    assert len(ours) == sum(1 for p in task.parameters() if p.requires_grad)
    assert {name: groups for name, groups in ours.items() if groups != released[name]} == {}
    assert Counter(ours.values()) == Counter(released.values())  # the counts per group
    # spelled out for a few names
    expected = {"model.type_embedding.weight": (1.0, False), "model.vision_expert.visual.ln_post.weight": (1.0, False),
                "model.vision_expert.visual.transformer.resblocks.0.ln_1.bias": (1.0, True),
                "model.text_expert.encoder.embeddings.LayerNorm.weight": (1.0, True),
                "model.text_layers.0.self_norm.weight": (5.0, True), "model.text_proj.weight": (5.0, False)}
    if cfg.model.manager != "bridgetower":
        expected.update({"model.text_layer_embedding.weight": (1.0, False),
                         "model.image_managers.1.expert_norm_weight": (5.0, False),
                         "model.image_managers.1.expert_norm_bias": (5.0, True),
                         "model.image_managers.1.prev_norm.weight": (5.0, False),
                         "model.image_managers.1.other_norm.weight": (5.0, True),
                         "model.image_managers.1.temperature": (5.0, False)})
    else:
        expected["model.image_managers.1.norm.weight"] = (5.0, True)
    if getattr(task, "itc_head", None) is not None:
        expected["itc_head.learned_temperature"] = (1.0, False)
    if hasattr(task, "classifier"):
        expected.update({"classifier.norm.weight": (10.0, False), "classifier.fc1.bias": (10.0, True)})
    assert {name: ours[name] for name in expected} == expected


def test_released_no_decay_switch_all_norms_keeps_every_norm_and_temperature_undecayed():
    """train.no_decay=all_norms: the rule this project used before (README, choices), against the released one."""
    cfg = load_config(None, ["model.size=tiny", "task.itc_weight=0.1", "train.no_decay=all_norms"])
    torch.manual_seed(0)
    task = build_task(cfg)
    groups = param_groups(task, cfg.train, task.lr_multiplier)
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    for name in ("model.vision_expert.visual.ln_post.weight",
                 "model.vision_expert.visual.transformer.resblocks.0.ln_1.weight",
                 "model.image_managers.1.expert_norm_weight", "model.image_managers.1.prev_norm.weight",
                 "model.image_managers.1.temperature", "itc_head.learned_temperature", "model.text_proj.bias"):
        assert decay[name] == 0.0, name
    for name in ("model.text_proj.weight", "model.image_managers.0.logits", "model.type_embedding.weight"):
        assert decay[name] == cfg.train.weight_decay, name


def test_released_itc_temperature_is_a_raw_parameter_clamped_after_the_step():
    """Released src/modules/mt_module.py:103 (`temperature` = 0.07, a raw parameter), objectives.py:99-100 (clamped in
    place to [0.001, 0.5] before each ITC forward, i.e. after every optimizer step) and :112 (logits x 1 / T,
    unclamped in the graph). Ours learned log T, clamped T in the forward only, and trained it at 5x."""
    cfg = load_config(None, ["model.size=tiny", "task.name=flickr30k"])
    task = build_task(cfg)
    head = task.itc_head
    assert [n for n, _ in head.named_parameters() if "temperature" in n] == ["learned_temperature"]
    assert head.temperature() is head.learned_temperature and head.learned_temperature.item() == pytest.approx(0.07)
    assert task.lr_multiplier("itc_head.learned_temperature") == 1.0
    for value, kept in ((0.9, 0.5), (-0.2, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            head.learned_temperature.fill_(value)
        assert head.temperature().item() == pytest.approx(value)  # the forward reads it as it is
        task.after_optimizer_step()
        assert head.learned_temperature.item() == pytest.approx(kept)
    # an optimizer step that pushes it out of range, then the hook
    optimizer = torch.optim.SGD([head.learned_temperature], lr=1.0)
    head.learned_temperature.grad = torch.tensor([-1.0])
    optimizer.step()
    assert head.learned_temperature.item() == pytest.approx(1.2)
    task.after_optimizer_step()
    assert head.learned_temperature.item() == 0.5


def _clamp_under_zero(out_file: str) -> None:
    """One rank of DeepSpeed ZeRO-2 (gloo, fp32): the clamp must reach the optimizer's fp32 master copy, or the
    next step would copy the unclamped value back into the module."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from managertower.model import ITCHead

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    head = ITCHead(8, 8, dim=4)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=head, optimizer=optimizer, config={
        "train_batch_size": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
    param = head.learned_temperature
    with torch.no_grad():
        param.fill_(0.9)
    safe_set_full_fp32_param(param, torch.tensor([0.9]))
    head.clamp_temperature()
    master_after_clamp = safe_get_full_fp32_param(param).item()
    text, image = engine(torch.randn(2, 8), torch.randn(2, 8))
    engine.backward((text @ image.t() / head.temperature()).sum())
    engine.step()  # lr 0: the master copy stays, and is copied into the module
    Path(out_file).write_text(json.dumps({"master": master_after_clamp, "module": param.item()}))
    torch.distributed.destroy_process_group()


def test_released_itc_temperature_clamp_reaches_the_zero_master_copy(tmp_path):
    """Released objectives.py:99-100 clamps the parameter itself; under ZeRO the parameter's fp32 master copy is
    what the optimizer steps, so ITCHead.clamp_temperature clamps both (a fresh process: one process group each)."""
    out_file = tmp_path / "clamp.json"
    process = multiprocessing.get_context("spawn").Process(target=_clamp_under_zero, args=(str(out_file),))
    process.start()
    process.join(timeout=300)
    assert process.exitcode == 0, f"the DeepSpeed process failed (exit code {process.exitcode}); its output is above"
    result = json.loads(out_file.read_text())
    assert result == {"master": pytest.approx(0.5), "module": pytest.approx(0.5)}


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_released_warmup_starts_at_lr_zero(min_ratio):
    """Released src/modules/meter_utils.py:389-395: transformers' get_polynomial_decay_schedule_with_warmup (power
    decay_power=1, lr_end=end_lr; config.py:87, 91): the first optimizer step at lr 0, step s of the warm-up at
    s / warmup. Ours started the warm-up at 1 / warmup."""
    from transformers import get_polynomial_decay_schedule_with_warmup

    total, warmup, lr = 50, 10, 1e-3
    factor = warmup_linear_decay(total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)
    assert factor(0) == 0.0 and factor(5) == pytest.approx(0.5) and factor(warmup) == pytest.approx(1.0)
    reference = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    released = get_polynomial_decay_schedule_with_warmup(reference, warmup, total, lr_end=lr * min_ratio, power=1.0)
    cfg = load_config(None, [f"train.steps={total}", f"train.warmup={warmup}", f"train.lr={lr}",
                             f"train.min_lr_ratio={min_ratio}"]).train
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ours = build_scheduler(optimizer, cfg)
    for step in range(total + 3):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference.param_groups[0]["lr"], abs=1e-12), step
        for opt, schedule in ((optimizer, ours), (reference, released)):
            opt.step()
            schedule.step()


def test_released_coco_retrieval_lr():
    """Released src/config.py:310-328 (task_finetune_irtr_itm_itc_coco_clip_bert): learning_rate 5e-6, heads and
    cross-modal x5, batch 512, 10 epochs; the repository has no COCO script (scripts/ holds Flickr30K's only)."""
    recipe = REPO / "finetune/configs/coco.yaml"
    cfg = load_config(str(recipe), ["model.text_expert=null", "model.vision_checkpoint=null"])  # placeholder paths
    assert cfg.train.lr == 5e-6 and cfg.train.new_layer_lr_mult == 5 and cfg.task.head_lr_mult == 5
    assert (cfg.train.global_batch, cfg.task.epochs, cfg.task.retrieval_topk) == (512, 10, 256)
    assert "script uses" not in recipe.read_text()
