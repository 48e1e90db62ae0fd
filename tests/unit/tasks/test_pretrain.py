"""The pre-training task in-process: the one-vision-pass step against the naive two-pass step, a gradient for
every parameter, the optional ITC loss, and weights decided by the config's seed."""
from __future__ import annotations

import pytest
import torch

from managertower.config import load_config
from managertower.data.collate import mlm_selection
from managertower.tasks.pretrain import PretrainTask


@pytest.fixture(scope="module")
def task():
    cfg = load_config(None, ["model.size=tiny", "model.dropout=0.0", "train.lr=1e-4", "train.new_layer_lr_mult=5"])
    torch.manual_seed(0)
    return PretrainTask(cfg)


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
            "itm_labels": (index == torch.arange(size)).long(),
            **dict(zip(("mlm_positions", "mlm_targets"), mlm_selection(labels)))}


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


def test_training_step_draws_the_two_pass_steps_noise():
    """In training (element noise, dropout 0 as the demo's recipe) the one-vision-pass step, whose fusions skip what
    their losses do not read, draws the managers' noise in the two-pass step's order: the same losses."""
    cfg = load_config(None, ["model.size=tiny", "model.dropout=0.0"])
    torch.manual_seed(0)
    task = PretrainTask(cfg).train()
    batch = _batch(task, seed=2)
    torch.manual_seed(7)
    one = task(batch)
    torch.manual_seed(7)
    two = task.forward_two_pass(batch)
    for key in ("loss", "loss_mlm", "loss_itm"):
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-5)
    torch.manual_seed(8)
    assert not torch.equal(task(batch)["loss"], one["loss"])  # the noise is on
