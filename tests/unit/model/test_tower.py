"""The tower: wiring of managers and cross-modal layers against a float64 reference, gradients of every
parameter, state-dict round trip, activation checkpointing, torch.compile, LayerNorm backends."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from managertower.config import MANAGER_KINDS, ConfigError, load_config
from managertower.model import ApexMissingError, ITMHead, LayerNorm, ManagerTower, MLMHead, layer_norm_class
from managertower.model.layer_norm import apex_available, resolve_backend

from test_managers import (ref_aaue, ref_ln, ref_linear, ref_saue, ref_softmax)

BATCH, TEXT_LEN, IMAGE = 2, 9, 64


def tiny_cfg(*overrides):
    return load_config(None, ["model.size=tiny", *overrides]).model


def make_batch(seed=0, vocab=274, image=IMAGE):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (BATCH, TEXT_LEN), generator=gen)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    mask[1, 6:] = 0
    pixels = torch.randn(BATCH, 3, image, image, generator=gen)
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 1], labels[1, 4] = ids[0, 2], ids[1, 1], ids[1, 4]
    return ids, mask, pixels, labels


# --- a full float64 reference of fuse() ---------------------------------------------------------------------
def ref_attention(attn, x, context, mask, heads):
    batch, length, dim = x.shape
    hd = dim // heads
    q, k, v = ref_linear(x, attn.query), ref_linear(context, attn.key), ref_linear(context, attn.value)
    out = torch.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            scores = q[b, :, sl] @ k[b, :, sl].T / math.sqrt(hd)
            if mask is not None:
                scores = scores.masked_fill(~mask[b][None, :], float("-inf"))
            out[b, :, sl] = ref_softmax(scores, -1) @ v[b, :, sl]
    return ref_linear(out, attn.out)


def ref_cross_layer(layer, x, x_mask, other, other_mask, heads):
    """BERT-style post-LN: self-attention -> cross-attention -> FFN (GELU), LayerNorm eps 1e-12 after each."""
    x = ref_ln(x + ref_attention(layer.self_attn, x, x, x_mask, heads), layer.self_norm.weight, layer.self_norm.bias,
               1e-12)
    x = ref_ln(x + ref_attention(layer.cross_attn, x, other, other_mask, heads), layer.cross_norm.weight,
               layer.cross_norm.bias, 1e-12)
    ffn = ref_linear(F.gelu(ref_linear(x, layer.ffn_in)), layer.ffn_out)
    return ref_ln(x + ffn, layer.ffn_norm.weight, layer.ffn_norm.bias, 1e-12)


def randomize_all(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_expert." in name:
                continue
            if "temperature" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("mask_padding", [False, True])
def test_fuse_matches_reference_aaue_fused(mask_padding):
    """Layer 1: SAUE on both sides; layer >= 2: AAUE with fused query; text attends to the image manager's
    output and vice versa; the image manager's fused query attends to text (padding masked if asked)."""
    cfg = tiny_cfg("model.manager=aaue_fused", "model.cross_layers=3", "model.num_experts=3",
                   f"model.manager_mask_padding={str(mask_padding).lower()}")
    torch.manual_seed(0)
    model = ManagerTower(cfg).double().eval()
    randomize_all(model)
    heads = cfg.num_heads
    ids, mask, pixels, _ = make_batch()
    with torch.no_grad():
        t_raw = model.encode_text(ids, mask)
        i_raw = model.encode_image(pixels.double())
        text, image = model.project_text(t_raw), model.project_image(i_raw)
        out = model.fuse(text, mask, image)
    # projections: Linear shared over layers + type row + layer-index row of the kept layers (2, 3 of 4 ... here 1..3)
    kept = [1, 2, 3]
    ref_text = torch.stack([ref_linear(t_raw[:, j], model.text_proj) + model.type_embedding.weight[0]
                            + model.text_layer_embedding.weight[kept[j]] for j in range(3)], dim=1)
    ref_image = torch.stack([ref_linear(i_raw[:, j], model.image_proj) + model.type_embedding.weight[1]
                             + model.image_layer_embedding.weight[kept[j]] for j in range(3)], dim=1)
    torch.testing.assert_close(text, ref_text, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(image, ref_image, rtol=1e-10, atol=1e-10)
    keep = mask.bool()
    with torch.no_grad():
        c_text = c_image = None
        for layer in range(3):
            tm, im = model.text_managers[layer], model.image_managers[layer]
            if layer == 0:
                t_in, i_in = ref_saue(tm, ref_text, None), ref_saue(im, ref_image, None)
            else:
                t_in, _ = ref_aaue(tm, ref_text, c_text, c_image, None, mask_padding)
                i_in, _ = ref_aaue(im, ref_image, c_image, c_text, keep, mask_padding)
            c_text = ref_cross_layer(model.text_layers[layer], t_in, keep, i_in, None, heads)
            c_image = ref_cross_layer(model.image_layers[layer], i_in, None, t_in, keep, heads)
        cls = torch.cat([torch.tanh(ref_linear(c_text[:, 0], model.text_pooler.dense)),
                         torch.tanh(ref_linear(c_image[:, 0], model.image_pooler.dense))], dim=-1)
    # padded text rows are never read by anything downstream; compare the real tokens
    torch.testing.assert_close(out.text[keep], c_text[keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.image, c_image, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(out.cls_feats, cls, rtol=1e-9, atol=1e-9)
    assert out.cls_feats.shape == (BATCH, 2 * cfg.hidden_size)
    weights = model.manager_weights()
    assert set(weights) == {"text", "image"} and weights["text"].shape == (3, 3)
    torch.testing.assert_close(weights["text"].sum(-1), torch.ones(3))


def test_fuse_meter_uses_last_layer_only():
    model = ManagerTower(tiny_cfg("model.manager=meter")).double().eval()
    randomize_all(model)
    ids, mask, pixels, _ = make_batch()
    with torch.no_grad():
        text, image = model.project_text(model.encode_text(ids, mask)), model.project_image(model.encode_image(pixels.double()))
        out = model.fuse(text, mask, image)
        changed = text.clone()
        changed[:, 0] += 1.0  # a lower kept layer: METER never reads it
        again = model.fuse(changed, mask, image)
    torch.testing.assert_close(out.cls_feats, again.cls_feats, rtol=0, atol=0)
    assert model.manager_weights() == {}


# --- gradients --------------------------------------------------------------------------------------------------
def pretrain_loss(model, mlm, itm, batch):
    ids, mask, pixels, labels = batch
    out = model(ids, mask, pixels)
    logits, picked = mlm(out.text, labels)
    assert logits.shape == (int((labels != -100).sum()), model.text_expert.vocab_size)
    itm_labels = torch.tensor([0, 1])
    return F.cross_entropy(logits, picked) + F.cross_entropy(itm(out.cls_feats), itm_labels)


@pytest.mark.parametrize("kind", MANAGER_KINDS)
def test_every_parameter_gets_a_gradient(kind):
    cfg = tiny_cfg(f"model.manager={kind}", "model.cross_layers=3", "model.num_experts=3")
    torch.manual_seed(0)
    model = ManagerTower(cfg).train()
    mlm, itm = MLMHead(cfg.hidden_size, model.text_expert.vocab_size), ITMHead(cfg.hidden_size)
    pretrain_loss(model, mlm, itm, make_batch()).backward()
    missing = [n for n, p in [*model.named_parameters(), *mlm.named_parameters(), *itm.named_parameters()]
               if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    if kind == "sae":
        # Eq. 4 at layer 2 normalises over one previous output (l - 1 = 1): softmax of one logit is 1 whatever
        # the logit and the temperature, so those two get an exact zero gradient by construction.
        zero = [n for n in zero if not (n.split(".")[1] == "1" and "history_" in n)]
    assert not zero, zero
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


# --- state dict, checkpointing, compile -------------------------------------------------------------------------
def test_state_dict_round_trip(tmp_path):
    cfg = tiny_cfg("model.manager=aaue_fused")
    torch.manual_seed(0)
    model = ManagerTower(cfg).eval()
    randomize_all(model)
    path = tmp_path / "tower.pt"
    torch.save(model.state_dict(), path)
    torch.manual_seed(1)
    fresh = ManagerTower(cfg).eval()
    ids, mask, pixels, _ = make_batch()
    with torch.no_grad():
        before = fresh(ids, mask, pixels).cls_feats
        result = fresh.load_state_dict(torch.load(path, weights_only=True))
        assert not result.missing_keys and not result.unexpected_keys
        after = fresh(ids, mask, pixels)
        reference = model(ids, mask, pixels)
    assert (before - reference.cls_feats).abs().max() > 1e-3
    torch.testing.assert_close(after.cls_feats, reference.cls_feats, rtol=0, atol=0)
    torch.testing.assert_close(after.text, reference.text, rtol=0, atol=0)
    # no buffers that depend on the run leak into the state dict
    assert not any("layer_ids" in k for k in model.state_dict())


def test_set_image_size_changes_token_count():
    model = ManagerTower(tiny_cfg()).eval()
    ids, mask, _, _ = make_batch()
    model.set_image_size(96)
    with torch.no_grad():
        out = model(ids, mask, torch.randn(BATCH, 3, 96, 96))
    assert out.image.shape == (BATCH, 1 + 12 * 12, 64)


NO_DROPOUT = ["model.dropout=0.0", "model.text_config={hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]


def _loss_and_grads(model, batch, seed=0):
    torch.manual_seed(seed)  # manager noise (training mode) draws from torch's RNG
    mlm_head, itm_head = model.heads
    model.zero_grad(set_to_none=True)
    loss = pretrain_loss(model, mlm_head, itm_head, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_loss_and_gradients():
    plain_cfg = tiny_cfg(*NO_DROPOUT)
    ckpt_cfg = tiny_cfg(*NO_DROPOUT, "model.activation_checkpointing=true")
    torch.manual_seed(0)
    plain = ManagerTower(plain_cfg).train()
    ckpt = ManagerTower(ckpt_cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    torch.manual_seed(5)
    heads = (MLMHead(64, plain.text_expert.vocab_size), ITMHead(64))
    plain.heads = ckpt.heads = heads
    batch = make_batch()
    loss_a, grads_a = _loss_and_grads(plain, batch)
    loss_b, grads_b = _loss_and_grads(ckpt, batch)
    assert ckpt.activation_checkpointing and ckpt.vision_expert.visual.transformer.grad_checkpointing
    encoder = ckpt.text_expert.encoder
    assert getattr(encoder, "is_activation_checkpointing", None) or encoder.is_gradient_checkpointing
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    for name, grad in grads_a.items():
        if name.startswith("heads."):
            continue
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_compile_runs_and_matches():
    # one cross-modal layer: the compiled part is CrossModalLayer, and each extra layer costs compile time
    cfg = tiny_cfg(*NO_DROPOUT, "model.compile=true", "model.cross_layers=1", "model.num_experts=1")
    torch.manual_seed(0)
    try:
        compiled = ManagerTower(cfg).eval()
        ids, mask, pixels, _ = make_batch()
        with torch.no_grad():
            out = compiled(ids, mask, pixels)
    except Exception as err:  # an environmental failure (no C++ compiler, inductor unsupported), not ours
        pytest.skip(f"torch.compile unavailable here: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    plain = ManagerTower(tiny_cfg(*NO_DROPOUT, "model.cross_layers=1", "model.num_experts=1")).eval()
    plain.load_state_dict(compiled.state_dict())
    with torch.no_grad():
        ref = plain(ids, mask, pixels)
    torch.testing.assert_close(out.cls_feats, ref.cls_feats, rtol=1e-4, atol=1e-5)


# --- LayerNorm backends --------------------------------------------------------------------------------------------
def test_apex_missing_is_a_clear_error():
    if apex_available():
        pytest.skip("NVIDIA Apex is installed here")
    with pytest.raises(ApexMissingError, match=r"model.layer_norm=apex.*not installed.*model.layer_norm=auto") as err:
        ManagerTower(tiny_cfg("model.layer_norm=apex"))
    assert isinstance(err.value, ConfigError)  # the doors print ConfigErrors as one line


def test_auto_backend_is_torch_on_cpu():
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "torch"
        assert layer_norm_class("auto").backend == "torch"
    model = ManagerTower(tiny_cfg("model.layer_norm=auto"))
    norms = [m for m in model.modules() if isinstance(m, LayerNorm)]
    assert norms and all(m.backend == resolve_backend("auto") for m in norms)
    with pytest.raises(ValueError, match="unknown layer_norm backend"):
        resolve_backend("fast")


def test_layer_norm_backends_share_state_dict_keys_with_nn_layer_norm():
    apex_like = type("LayerNorm_apex", (LayerNorm,), {"backend": "apex"})  # CPU tensors fall back to torch
    plain = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        plain.weight.normal_()
        plain.bias.normal_()
    x = torch.randn(3, 16)
    for cls in (layer_norm_class("torch"), apex_like):
        norm = cls(16, eps=1e-5)
        assert list(norm.state_dict()) == list(plain.state_dict()) == ["weight", "bias"]
        norm.load_state_dict(plain.state_dict())
        torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
        plain.load_state_dict(norm.state_dict())


def test_fusion_outputs_text_and_cls_equal_the_whole_fusion():
    """fuse(outputs="text") (MLM) and fuse(outputs="cls") (ITM, classifiers) compute only what they return, and it
    equals the whole fusion's; dropout on, so the first-token layer is checked in training too (shapes, finite)."""
    torch.manual_seed(0)
    model = ManagerTower(tiny_cfg("model.manager=aaue_fused", "model.cross_layers=3")).double().eval()
    text = torch.randn(BATCH, model.cfg.num_experts, TEXT_LEN, model.cfg.hidden_size, dtype=torch.float64)
    image = torch.randn(BATCH, model.cfg.num_experts, 65, model.cfg.hidden_size, dtype=torch.float64)
    mask = make_batch()[1]
    full = model.fuse(text, mask, image)
    text_only, cls_only = model.fuse(text, mask, image, outputs="text"), model.fuse(text, mask, image, outputs="cls")
    torch.testing.assert_close(text_only.text, full.text, rtol=1e-12, atol=1e-12)
    assert text_only.image is None and text_only.cls_feats is None
    torch.testing.assert_close(cls_only.cls_feats, full.cls_feats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cls_only.text, full.text[:, :1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cls_only.image, full.image[:, :1], rtol=1e-12, atol=1e-12)
    model.train()
    assert torch.isfinite(model.fuse(text, mask, image, outputs="cls").cls_feats).all()
    with pytest.raises(ValueError, match="unknown fusion outputs 'pooled'"):
        model.fuse(text, mask, image, outputs="pooled")


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_attention_with_dropout_draws_the_masks_of_torch_math_path(masked):
    """Training with dropout on the CPU runs the attention written out (scale and mask in the score GEMM): the
    same values as scaled_dot_product_attention's math path, dropout masks included (same seed)."""
    from managertower.model.cross_modal import Attention

    torch.manual_seed(0)
    attention = Attention(32, 4, 0.3).train()
    x, context = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    keep = torch.tensor([[True] * 5, [True, True, True, False, False]]) if masked else None

    def split(t):
        return t.view(2, -1, 4, 8).transpose(1, 2)

    torch.manual_seed(1)
    got = attention(x, context, keep)
    torch.manual_seed(1)
    attended = F.scaled_dot_product_attention(
        split(attention.query(x)), split(attention.key(context)), split(attention.value(context)),
        attn_mask=None if keep is None else keep[:, None, None, :], dropout_p=0.3)
    expected = attention.out(attended.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(got, attention.eval()(x, context, keep))  # dropout was on
