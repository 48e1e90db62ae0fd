"""The model side of the authors' released recipe (public repository LooperXX/ManagerTower, src/modules): where
the paper leaves room, the tower behaves as the released modules do by default. Each test names the released
file and lines it follows; each fails on the behaviour this project had before.
"""
from __future__ import annotations

import math

import pytest
import torch

from managertower.config import MANAGER_KINDS, load_config
from managertower.model import ManagerTower
from managertower.model.layer_norm import layer_norm_class
from managertower.model.managers import AAUEManager, ExpertInputs, SAUEManager, normalize_experts

EPS = 1e-5
NORM = layer_norm_class("torch")
# big enough for per-element statistics: 4 x 4 x 32 x 48 = 24,576 noise draws per forward
B, N, L, L_OTHER, D = 4, 4, 32, 6, 48


def tiny_cfg(*overrides):
    return load_config(None, ["model.size=tiny", *overrides]).model


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randn(B, N, L, D, generator=gen, dtype=torch.float64) * 2 + 1
    prev = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    other = torch.randn(B, L_OTHER, D, generator=gen, dtype=torch.float64)
    return ExpertInputs(experts, normalize_experts(experts, EPS), prev, other, torch.ones(B, L_OTHER, dtype=torch.bool))


def randomized(manager, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in manager.named_parameters():
            if "temperature" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return manager


def reference_output(m, x, weights):
    """sum_i w_i * LN_i(U_i) + W_C * LN(C), written out, with weights B x N x L x D."""
    lns = [torch.nn.functional.layer_norm(x.experts[:, i], (D,), m.expert_norm_weight[i], m.expert_norm_bias[i], EPS)
           for i in range(N)]
    prev = torch.nn.functional.layer_norm(x.prev, (D,), m.prev_norm.weight, m.prev_norm.bias, EPS)
    return sum(weights[:, i] * lns[i] for i in range(N)) + m.prev_weight * prev


def centred_noise(train_weights, clean_logits, temperature):
    """eps - mean_N(eps) from softmax((logits + eps) / tau) over axis 1 (logits broadcast to B x N x L x D)."""
    z = torch.log(train_weights) * temperature - clean_logits
    return z - z.mean(dim=1, keepdim=True)


def assert_iid_per_element(noise):
    """Centred noise B x N x L x D: std (1/N) sqrt(1 - 1/N), and no correlation between two samples, two tokens
    or two channels (noise shared along any of those axes would correlate fully there)."""
    expected = (1 / N) * math.sqrt(1 - 1 / N)
    assert abs(noise.std().item() - expected) < 0.03 * expected, noise.std().item()

    def corr(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return (a @ b / (a.norm() * b.norm())).item()

    # 6,144 pairs each: a correlation of an independent pair is ~N(0, 1/78); shared noise gives 1 (or, centred
    # over N, at least 1 - 1/N).
    assert abs(corr(noise[0], noise[1])) < 0.06  # across the batch
    assert abs(corr(noise[:, :, 0], noise[:, :, 1])) < 0.06  # across tokens
    assert abs(corr(noise[..., 0], noise[..., 1])) < 0.06  # across the width


def test_released_saue_noise_is_iid_per_element():
    """Released src/modules/heads.py:77-78 (SAUE.aggregate_reps): in training, torch.normal(0, 1/N) of the shape of
    the stacked inputs B x N x L x D is added to the N x D logits before the softmax over N; none in eval (the
    `is_training` flag, heads.py:77). Ours drew one N x D noise shared by the batch and the tokens."""
    m = randomized(SAUEManager(N, D, NORM, EPS, uses_prev=True).double())
    x = inputs()
    m.eval()
    out_eval, w_eval = m(x)
    assert w_eval.shape == (N, D)
    torch.testing.assert_close(m(x)[0], out_eval, rtol=0, atol=0)  # no noise in eval
    torch.testing.assert_close(w_eval, torch.softmax(m.logits / m.temperature, dim=0), rtol=1e-12, atol=1e-12)
    m.train()
    torch.manual_seed(0)
    out, weights = m(x)
    assert weights.shape == (B, N, L, D)
    torch.testing.assert_close(out, reference_output(m, x, weights), rtol=1e-10, atol=1e-10)
    torch.manual_seed(0)
    torch.testing.assert_close(m(x)[0], out, rtol=0, atol=0)  # the noise follows torch's RNG
    noise = centred_noise(weights.detach(), m.logits.detach()[None, :, None, :], m.temperature.detach())
    assert_iid_per_element(noise)


@pytest.mark.parametrize("fused", [True, False])
def test_released_aaue_noise_is_iid_per_element(fused):
    """Released src/modules/heads.py:143-144 (AAUE.aggregate_reps): the same B x N x L x D draw as SAUE, added to
    the per-token logits broadcast over the width (heads.py:169-172); none in eval. Ours drew one noise per token,
    shared by the D channels."""
    m = randomized(AAUEManager(N, D, NORM, EPS, fused=fused).double())
    x = inputs(1)
    m.eval()
    out_eval, w_eval = m(x)
    assert w_eval.shape == (B, L, N)
    torch.testing.assert_close(m(x)[0], out_eval, rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    out, weights = m(x)
    assert weights.shape == (B, N, L, D)
    torch.testing.assert_close(out, reference_output(m, x, weights), rtol=1e-10, atol=1e-10)
    # clean logits up to a per-token constant, which centring over N removes
    clean = torch.log(w_eval.detach()).transpose(1, 2).unsqueeze(-1) * m.temperature.detach()
    assert_iid_per_element(centred_noise(weights.detach(), clean, m.temperature.detach()))


def test_released_noise_is_the_default_and_the_logits_switch_keeps_the_shared_draw():
    """model.manager_noise: "element" (released, heads.py:78 and 144) by default; "logits" keeps one draw per logit."""
    assert tiny_cfg().manager_noise == "element"
    for noise in ("element", "logits"):
        model = ManagerTower(tiny_cfg("model.manager=aaue_fused", f"model.manager_noise={noise}"))
        assert {m.noise for m in [*model.text_managers, *model.image_managers]} == {noise}
    m = randomized(SAUEManager(N, D, NORM, EPS, uses_prev=True, noise="logits").double()).train()
    _, weights = m(inputs())
    assert weights.shape == (N, D)  # one draw shared by every sample and token


@pytest.mark.parametrize("kind", MANAGER_KINDS)
def test_released_layer_embeddings_one_table_per_expert(kind):
    """Released src/modules/mt_module.py:128-131: `layer_embeddings_text` = Embedding(text layers, D) and
    `layer_embeddings_image` = Embedding(image layers, D), the kept layers' rows added to each expert's projected
    layers (mt_module.py:516-525); BridgeTower (bt_module.py:53-54, 364-371) and METER (meter_module.py:54-55) have
    type embeddings only. Ours shared one table between the experts and added it to BridgeTower and METER too."""
    # experts of different depths: each table has its own expert's rows
    cfg = tiny_cfg(f"model.manager={kind}", "model.num_experts=3", "model.cross_layers=3",
                   "model.text_config={num_hidden_layers: 5}", "model.vision_config={layers: 4}")
    torch.manual_seed(0)
    model = ManagerTower(cfg).double().eval()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "layer_embedding" in n}
    gen = torch.Generator().manual_seed(0)
    text_layers = torch.randn(2, 3, 7, 64, generator=gen, dtype=torch.float64)
    image_layers = torch.randn(2, 3, 9, 64, generator=gen, dtype=torch.float64)
    if kind in ("meter", "bridgetower"):
        assert shapes == {}
        # nothing but the projection and the type row: the output reads no layer-index table
        with torch.no_grad():
            torch.testing.assert_close(model.project_text(text_layers),
                                       model.text_proj(text_layers) + model.type_embedding.weight[0], rtol=0, atol=0)
            torch.testing.assert_close(model.project_image(image_layers),
                                       model.image_proj(image_layers) + model.type_embedding.weight[1], rtol=0, atol=0)
        return
    assert shapes == {"text_layer_embedding.weight": (5, 64), "image_layer_embedding.weight": (4, 64)}
    with torch.no_grad():
        text, image = model.project_text(text_layers), model.project_image(image_layers)
        # the kept layers 3..5 of the text expert and 2..4 of the vision expert (0-based 2..4 and 1..3)
        torch.testing.assert_close(text - model.text_proj(text_layers) - model.type_embedding.weight[0],
                                   model.text_layer_embedding.weight[2:5][None, :, None, :].expand_as(text),
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(image - model.image_proj(image_layers) - model.type_embedding.weight[1],
                                   model.image_layer_embedding.weight[1:4][None, :, None, :].expand_as(image),
                                   rtol=1e-12, atol=1e-12)
        # the two tables are separate: changing one leaves the other modality's input as it was
        model.image_layer_embedding.weight.add_(1.0)
        torch.testing.assert_close(model.project_text(text_layers), text, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["saue", "aaue", "aaue_fused", "concat_attention", "cross_attention", "sae"])
def test_released_scalar_weights_make_w_c_one_scalar(kind):
    """Released src/modules/heads.py:61-63 and 122-124: with manager_weight_type=scalar the logits are one number
    per input (1 x N x 1 x 1) and W_C (`layer_scores_cross`, or the previous-output entry of SAUE's layer_scores)
    one number too. Ours kept W_C a 1 x D vector in scalar mode."""
    model = ManagerTower(tiny_cfg(f"model.manager={kind}", "model.manager_weights=scalar", "model.num_experts=3",
                                  "model.cross_layers=3"))
    for managers in (model.text_managers, model.image_managers):
        for m in managers:
            if hasattr(m, "logits"):
                assert tuple(m.logits.shape) == (3, 1)
            if m.uses_prev:
                assert m.prev_weight.numel() == 1 and m.prev_weight.item() == 1.0
    vector = ManagerTower(tiny_cfg(f"model.manager={kind}", "model.num_experts=3", "model.cross_layers=3"))
    assert all(tuple(m.prev_weight.shape) == (1, 64) for m in vector.text_managers if m.uses_prev)
    # a scalar W_C scales every channel of LN(C) alike, in training too
    m = randomized(SAUEManager(N, D, NORM, EPS, uses_prev=True, scalar=True).double()).train()
    x = inputs(2)
    torch.manual_seed(2)
    out, weights = m(x)
    torch.testing.assert_close(out, reference_output(m, x, weights), rtol=1e-10, atol=1e-10)
