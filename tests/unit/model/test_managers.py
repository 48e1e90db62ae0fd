"""Every manager against a float64 reference written from the paper's equations (§3, Appendix D; docs/recipe.md §1.1).

The references below use plain loops and sums with one explicit LayerNorm per input, so they also check the
shared-normalisation trick of managers.py (one normalisation of U shared by all managers, each manager applying
only its own per-input affine). Parameters are randomised first: at their init values (LN 1/0, equal logits)
many mistakes would cancel out.
"""
from __future__ import annotations

import math

import pytest
import torch

from managertower.config import load_config
from managertower.model import ManagerTower
from managertower.model.layer_norm import layer_norm_class
from managertower.model.managers import (AAUEManager, BridgeManager, ConcatAttentionManager, CrossAttentionManager,
                                         ExpertInputs, SAEManager, SAUEManager, build_manager, normalize_experts)

EPS = 1e-5
B, N, L, L_OTHER, D = 2, 4, 5, 7, 16
NORM = layer_norm_class("torch")


# --- the reference ------------------------------------------------------------------------------------------
def ref_ln(x, weight, bias, eps=EPS):
    """LayerNorm over the last axis, written out."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_softmax(logits, dim):
    e = torch.exp(logits - logits.max(dim=dim, keepdim=True).values)
    return e / e.sum(dim=dim, keepdim=True)


def ref_linear(x, linear):
    return x @ linear.weight.T + linear.bias


def ref_expert_lns(m, experts):
    """[LN_i(U_i) for i in 1..N]: one LayerNorm per input, each with its own affine."""
    return [ref_ln(experts[:, i], m.expert_norm_weight[i], m.expert_norm_bias[i]) for i in range(experts.shape[1])]


def ref_prev(m, prev):
    return ref_ln(prev, m.prev_norm.weight, m.prev_norm.bias)


def ref_saue(m, experts, prev):
    """Eq. 5: sum_i w_i * LN_i(U_i) + W_C * LN(C), w = softmax over the N layers of W / tau (W: N x D or N x 1)."""
    tau = m.temperature
    w = torch.exp(m.logits / tau)
    w = w / sum(w[j] for j in range(w.shape[0]))
    lns = ref_expert_lns(m, experts)
    out = sum(w[i] * lns[i] for i in range(len(lns)))
    if prev is not None:
        out = out + m.prev_weight[0] * ref_prev(m, prev)
    return out


def ref_token_weighted(lns, weights):
    """sum_i w[b, l, i] * LN_i(U_i)[b, l, :] with per-token weights B x L x N broadcast over D."""
    return sum(weights[..., i:i + 1] * lns[i] for i in range(len(lns)))


def ref_aaue(m, experts, prev, other=None, other_mask=None, mask_padding=False):
    """Eq. 6-7. Query C: logits = LN(C) W_M + b. Fused query: A = softmax(q k^T / sqrt(D)) over the other side's
    tokens, q = LN(C) Wq + bq, k = LN_q(C') Wk + bk, value LN_q(C'); logits = Linear(2D->N)([A LN_q(C'), LN(C)])."""
    c = ref_prev(m, prev)
    if other is None:
        query = c
    else:
        o = ref_ln(other, m.other_norm.weight, m.other_norm.bias)
        q, k = ref_linear(c, m.query), ref_linear(o, m.key)
        batch, length, dim = c.shape
        attended = torch.zeros_like(c)
        for b in range(batch):
            for t in range(length):
                scores = torch.stack([(q[b, t] * k[b, s]).sum() / math.sqrt(dim) for s in range(o.shape[1])])
                if mask_padding and other_mask is not None:
                    scores = scores.masked_fill(~other_mask[b], float("-inf"))
                a = ref_softmax(scores, 0)
                attended[b, t] = sum(a[s] * o[b, s] for s in range(o.shape[1]))
        query = torch.cat([attended, c], dim=-1)
    weights = ref_softmax(ref_linear(query, m.to_logits) / m.temperature, -1)
    return ref_token_weighted(ref_expert_lns(m, experts), weights) + m.prev_weight[0] * c, weights


def ref_cross_attention(m, experts, prev):
    """Appendix D: query LN(C) (L x D), keys the first token of each LN_i(U_i) (N x D), no value projection."""
    c = ref_prev(m, prev)
    lns = ref_expert_lns(m, experts)
    q = ref_linear(c, m.query)
    keys = torch.stack([ref_linear(ln[:, 0], m.key) for ln in lns], dim=1)  # B x N x D
    logits = torch.einsum("bld,bnd->bln", q, keys) / math.sqrt(c.shape[-1])
    weights = ref_softmax(logits / m.temperature, -1)
    return ref_token_weighted(lns, weights) + m.prev_weight[0] * c


def ref_concat_attention(m, experts, prev):
    """Appendix D: W_A[i] = Linear(2D->D)([LN(C), LN_i(U_i)]), softmax over the N layers, element-wise."""
    c = ref_prev(m, prev)
    lns = ref_expert_lns(m, experts)
    logits = torch.stack([ref_linear(torch.cat([c, ln], -1), m.to_logits) for ln in lns], dim=0) / m.temperature
    weights = ref_softmax(logits, 0)
    return sum(weights[i] * lns[i] for i in range(len(lns))) + m.prev_weight[0] * c


def ref_sae(m, experts, history):
    """Eq. 4, split: softmax(W_uni / tau_1) over N uni-modal layers + softmax(W_cross / tau_2) over C_1..C_{l-1}."""
    w = ref_softmax(m.logits / m.temperature, 0)
    lns = ref_expert_lns(m, experts)
    out = sum(w[i] * lns[i] for i in range(len(lns)))
    if history:
        wh = ref_softmax(m.history_logits / m.history_temperature, 0)
        for j, past in enumerate(history):
            norm = m.history_norms[j]
            out = out + wh[j] * ref_ln(past, norm.weight, norm.bias)
    return out


# --- helpers --------------------------------------------------------------------------------------------------
def randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "temperature" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.7)
    return module


def make_inputs(seed=0, history=0, padded=True):
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randn(B, N, L, D, generator=gen, dtype=torch.float64) * 3 + 1
    prev = torch.randn(B, L, D, generator=gen, dtype=torch.float64) * 2
    other = torch.randn(B, L_OTHER, D, generator=gen, dtype=torch.float64)
    other_mask = torch.ones(B, L_OTHER, dtype=torch.bool)
    if padded:
        other_mask[1, 4:] = False
    past = [torch.randn(B, L, D, generator=gen, dtype=torch.float64) for _ in range(history)]
    return experts, prev, other, other_mask, past


def run(manager, experts, prev=None, other=None, other_mask=None, history=()):
    inputs = ExpertInputs(experts, normalize_experts(experts, EPS), prev, other, other_mask, list(history))
    return manager(inputs)


def prepared(manager):
    return randomize(manager.double().eval())


# --- each manager against its reference ---------------------------------------------------------------------
@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("layer", [0, 1])
def test_saue_matches_reference(scalar, layer):
    m = prepared(SAUEManager(N, D, NORM, EPS, uses_prev=layer > 0, scalar=scalar))
    assert m.logits.shape == (N, 1 if scalar else D)
    experts, prev, *_ = make_inputs()
    out, weights = run(m, experts, prev if layer else None)
    torch.testing.assert_close(out, ref_saue(m, experts, prev if layer else None), rtol=1e-10, atol=1e-10)
    assert torch.allclose(weights.sum(0), torch.ones((), dtype=torch.float64))


@pytest.mark.parametrize("mask_padding", [False, True])
def test_aaue_fused_matches_reference(mask_padding):
    m = prepared(AAUEManager(N, D, NORM, EPS, fused=True, mask_padding=mask_padding))
    experts, prev, other, other_mask, _ = make_inputs()
    out, weights = run(m, experts, prev, other, other_mask)
    ref_out, ref_weights = ref_aaue(m, experts, prev, other, other_mask, mask_padding)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    # The released behaviour (no mask) and the masked one really differ when the other side is padded ...
    other_ref, _ = ref_aaue(m, experts, prev, other, other_mask, not mask_padding)
    assert (out - other_ref).abs().max() > 1e-6
    # ... and coincide without padding.
    full = torch.ones_like(other_mask)
    torch.testing.assert_close(run(m, experts, prev, other, full)[0], ref_aaue(m, experts, prev, other, full, False)[0],
                               rtol=1e-10, atol=1e-10)


def test_aaue_query_c_matches_reference():
    m = prepared(AAUEManager(N, D, NORM, EPS, fused=False))
    assert m.to_logits.in_features == D and not hasattr(m, "query")
    experts, prev, other, other_mask, _ = make_inputs()
    out, weights = run(m, experts, prev, other, other_mask)  # C' is given but unused by the query-C variant
    ref_out, ref_weights = ref_aaue(m, experts, prev)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("layer", [0, 1, 3])
def test_sae_matches_reference_with_split_init(scalar, layer):
    m = SAEManager(N, D, NORM, EPS, layer_index=layer, scalar=scalar).double().eval()
    width = 1 if scalar else D
    # Eq. 4 with the split initialisation: uni-modal part 1/N, cross-modal part 1/(l-1), two temperatures.
    # (built in float32, then .double(): compare at float32 precision)
    torch.testing.assert_close(m.logits, torch.full((N, width), 1.0 / N, dtype=torch.float64))
    if layer:
        torch.testing.assert_close(m.history_logits, torch.full((layer, width), 1.0 / layer, dtype=torch.float64))
        assert m.history_temperature.item() == 1.0 and len(m.history_norms) == layer
    else:
        assert not hasattr(m, "history_logits")
    randomize(m)
    experts, _, _, _, history = make_inputs(history=layer)
    out, _ = run(m, experts, history=history)
    torch.testing.assert_close(out, ref_sae(m, experts, history), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layer", [0, 1])
def test_bridgetower_manager_matches_reference(layer):
    num_layers = 3
    m = build_manager("bridgetower", layer, N, num_layers, D, NORM, EPS).double().eval()
    assert isinstance(m, BridgeManager)
    randomize(m)
    experts, prev, *_ = make_inputs()
    # layer l (1-based) takes uni-modal layer L - L_C + l of the kept top N: index N - L_C + l - 1 here.
    u = experts[:, N - num_layers + layer]
    ref = ref_ln(u if layer == 0 else u + prev, m.norm.weight, m.norm.bias)
    out, weights = run(m, experts, prev if layer else None)
    assert weights is None
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_concat_attention_matches_reference():
    m = prepared(ConcatAttentionManager(N, D, NORM, EPS))
    experts, prev, *_ = make_inputs()
    out, weights = run(m, experts, prev)
    assert weights.shape == (B, N, L, D)
    torch.testing.assert_close(out, ref_concat_attention(m, experts, prev), rtol=1e-10, atol=1e-10)


def test_cross_attention_matches_reference():
    m = prepared(CrossAttentionManager(N, D, NORM, EPS))
    experts, prev, *_ = make_inputs()
    out, weights = run(m, experts, prev)
    assert weights.shape == (B, L, N)
    torch.testing.assert_close(out, ref_cross_attention(m, experts, prev), rtol=1e-10, atol=1e-10)


def test_shared_normalisation_equals_one_layer_norm_per_input():
    """normalize_experts + per-input affine == an independent nn.LayerNorm for each U_i."""
    m = prepared(SAUEManager(N, D, NORM, EPS, uses_prev=False))
    experts, *_ = make_inputs()
    affine = m.expert_affine(normalize_experts(experts, EPS))
    for i in range(N):
        ln = torch.nn.LayerNorm(D, eps=EPS).double()
        with torch.no_grad():
            ln.weight.copy_(m.expert_norm_weight[i])
            ln.bias.copy_(m.expert_norm_bias[i])
        torch.testing.assert_close(affine[:, i], ln(experts[:, i]), rtol=1e-10, atol=1e-10)


# --- structure, init and noise -------------------------------------------------------------------------------
ADAPTIVE = ["saue", "aaue", "aaue_fused", "concat_attention", "cross_attention"]


@pytest.mark.parametrize("kind", ADAPTIVE)
def test_layer_one_is_saue_for_every_adaptive_kind(kind):
    managers = [build_manager(kind, layer, N, 3, D, NORM, EPS) for layer in range(3)]
    assert type(managers[0]) is SAUEManager and not managers[0].uses_prev  # no C at layer 1 (Eq. 8-9)
    expected = {"saue": SAUEManager, "aaue": AAUEManager, "aaue_fused": AAUEManager,
                "concat_attention": ConcatAttentionManager, "cross_attention": CrossAttentionManager}[kind]
    for m in managers[1:]:
        assert type(m) is expected and m.uses_prev
    if kind.startswith("aaue"):
        assert all(m.fused == (kind == "aaue_fused") for m in managers[1:])


def test_meter_has_no_managers_and_unknown_kind_fails():
    assert build_manager("meter", 0, N, 3, D, NORM, EPS) is None
    with pytest.raises(ValueError, match="unknown manager kind"):
        build_manager("nope", 1, N, 3, D, NORM, EPS)


@pytest.mark.parametrize("kind", ["saue", "aaue", "aaue_fused", "concat_attention", "cross_attention", "sae"])
def test_init_values_in_the_tower(kind):
    """logits 1/N, W_C 1.0, tau 1, per-input LN 1/0; new Linear layers N(0, 0.02) with zero bias."""
    cfg = load_config(None, ["model.size=tiny", f"model.manager={kind}", "model.num_experts=3",
                             "model.cross_layers=3"]).model
    torch.manual_seed(0)
    model = ManagerTower(cfg)
    for managers in (model.text_managers, model.image_managers):
        for layer, m in enumerate(managers):
            assert torch.equal(m.expert_norm_weight, torch.ones(3, 64))
            assert torch.equal(m.expert_norm_bias, torch.zeros(3, 64))
            if hasattr(m, "logits"):
                assert torch.equal(m.logits, torch.full((3, 64), 1 / 3))
            assert torch.equal(m.temperature, torch.ones(1))
            if m.uses_prev:
                assert torch.equal(m.prev_weight, torch.ones(1, 64))
                assert torch.equal(m.prev_norm.weight, torch.ones(64)) and torch.equal(m.prev_norm.bias, torch.zeros(64))
            for sub in m.modules():
                if isinstance(sub, torch.nn.Linear):
                    assert torch.equal(sub.bias, torch.zeros_like(sub.bias))
                    assert abs(sub.weight.std().item() - 0.02) < 0.004
            if kind == "sae" and layer:
                assert torch.allclose(m.history_logits, torch.full((layer, 64), 1 / layer))


def _centred_noise(logits, weights, tau, axis):
    """Recover eps - mean(eps) over the N axis from softmax((logits + eps) / tau)."""
    z = torch.log(weights) * tau - logits
    return z - z.mean(dim=axis, keepdim=True)


def test_saue_noise_only_in_training_with_std_one_over_n():
    m = SAUEManager(N, D, NORM, EPS, uses_prev=True, noise="logits").double()
    randomize(m)
    experts, prev, *_ = make_inputs()
    m.eval()
    first, w_eval = run(m, experts, prev)
    torch.testing.assert_close(run(m, experts, prev)[0], first, rtol=0, atol=0)  # deterministic in eval
    torch.testing.assert_close(first, ref_saue(m, experts, prev), rtol=1e-10, atol=1e-10)
    m.train()
    torch.manual_seed(1)
    a, w_a = run(m, experts, prev)
    torch.manual_seed(1)
    a_again, _ = run(m, experts, prev)
    torch.manual_seed(2)
    b, _ = run(m, experts, prev)
    torch.testing.assert_close(a, a_again, rtol=0, atol=0)  # noise follows torch's RNG
    assert (a - b).abs().max() > 1e-4 and (a - first).abs().max() > 1e-4
    # The training output uses the noisy weights it returns; W_C * LN(C) carries no noise.
    lns = ref_expert_lns(m, experts)
    torch.testing.assert_close(a, sum(w_a[i] * lns[i] for i in range(N)) + m.prev_weight[0] * ref_prev(m, prev),
                               rtol=1e-10, atol=1e-10)
    # std of the noise on the logits: centred over N its variance is s^2 (1 - 1/N); s should be 1/N.
    samples = torch.cat([_centred_noise(m.logits.detach(), run(m, experts, prev)[1].detach(),
                                        m.temperature.detach(), 0).flatten() for _ in range(200)])
    std = samples.std().item() / math.sqrt(1 - 1 / N)
    assert abs(std - 1 / N) < 0.03 / N, std
    assert abs(samples.mean().item()) < 1e-10


def test_aaue_noise_only_in_training_with_std_one_over_n():
    m = AAUEManager(N, D, NORM, EPS, fused=True, noise="logits").double()
    randomize(m)
    experts, prev, other, other_mask, _ = make_inputs()
    m.eval()
    out_eval, w_eval = run(m, experts, prev, other, other_mask)
    torch.testing.assert_close(run(m, experts, prev, other, other_mask)[0], out_eval, rtol=0, atol=0)
    m.train()
    torch.manual_seed(3)
    out_a, w_a = run(m, experts, prev, other, other_mask)
    torch.manual_seed(3)
    out_a2, _ = run(m, experts, prev, other, other_mask)
    torch.testing.assert_close(out_a, out_a2, rtol=0, atol=0)
    assert (out_a - out_eval).abs().max() > 1e-4
    clean_logits = torch.log(w_eval.detach()) * m.temperature.detach()  # up to a per-token constant
    samples = torch.cat([_centred_noise(clean_logits, run(m, experts, prev, other, other_mask)[1].detach(),
                                        m.temperature.detach(), -1).flatten() for _ in range(300)])
    std = samples.std().item() / math.sqrt(1 - 1 / N)
    assert abs(std - 1 / N) < 0.04 / N, std


@pytest.mark.parametrize("fused", [True, False])
def test_aaue_weights_differ_between_tokens_and_samples(fused):
    m = prepared(AAUEManager(N, D, NORM, EPS, fused=fused))
    experts, prev, other, other_mask, _ = make_inputs()
    _, weights = run(m, experts, prev, other, other_mask)  # B x L x N, eval mode: no noise
    assert weights.shape == (B, L, N)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L, dtype=torch.float64))
    assert (weights[:, 0] - weights[:, 1]).abs().max() > 1e-3  # between tokens of one sample
    assert (weights[0] - weights[1]).abs().max() > 1e-3  # between samples at the same token
    # SAUE by contrast gives one weight vector for every token and sample.
    saue = prepared(SAUEManager(N, D, NORM, EPS, uses_prev=True))
    _, static = run(saue, experts, prev)
    assert static.shape == (N, D)


def test_manager_weights_logging():
    m = prepared(AAUEManager(N, D, NORM, EPS, fused=True))
    experts, prev, other, other_mask, _ = make_inputs()
    _, weights = run(m, experts, prev, other, other_mask)
    torch.testing.assert_close(m.last_weights, weights.reshape(-1, N).mean(0).float())


@pytest.mark.parametrize("logits_shape", [(1, N, 1, D), (B, N, L, 1)], ids=["static", "per_token"])
def test_element_mix_matches_autograd_of_the_plain_expression(logits_shape):
    """The element-noise managers' hand-written forward/backward (_ElementMix) against autograd over
    sum_i softmax_i((logits + noise / N) / tau) * (normed_i * g_i + b_i), in float64, every input's gradient."""
    from managertower.model.managers import _ElementMix

    torch.manual_seed(0)
    leaves = [torch.randn(logits_shape), torch.tensor([0.7]), torch.randn(B, N, L, D), torch.randn(N, D),
              torch.randn(N, D)]
    leaves = [t.double().requires_grad_() for t in leaves]
    noise = torch.randn(B, N, L, D, dtype=torch.float64)
    grad_out = torch.randn(B, L, D, dtype=torch.float64)
    logits, tau, normed, weight, bias = leaves
    weights = torch.softmax((logits + noise / N) / tau, dim=1)
    expected = (weights * (normed * weight[:, None] + bias[:, None])).sum(1)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    out, got_weights = _ElementMix.apply(logits, noise.clone(), tau, normed, weight, bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_weights, weights.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, leaves, grad_out), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
