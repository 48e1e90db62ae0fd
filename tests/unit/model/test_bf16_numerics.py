"""Under bf16 the managers' softmax (logits, temperature, noise) and the ITC logits run in fp32."""
import torch

from managertower.model.layer_norm import layer_norm_class
from managertower.model.managers import AAUEManager, ExpertInputs, SAUEManager, normalize_experts
from managertower.tasks.losses import itc_loss

N, D, B, L = 6, 16, 2, 5


def _record_softmax(monkeypatch):
    dtypes = []
    real = torch.softmax

    def softmax(x, *args, **kwargs):
        dtypes.append(x.dtype)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", softmax)
    return dtypes


def test_manager_softmax_runs_in_fp32_under_bf16(monkeypatch):
    norm = layer_norm_class("torch")
    for noise in ("element", "logits"):
        torch.manual_seed(0)
        saue = SAUEManager(N, D, norm, 1e-5, uses_prev=True, noise=noise).to(torch.bfloat16)
        aaue = AAUEManager(N, D, norm, 1e-5, fused=True, noise=noise).to(torch.bfloat16)
        experts = torch.randn(B, N, L, D, dtype=torch.bfloat16)
        prev = torch.randn(B, L, D, dtype=torch.bfloat16)
        inputs = ExpertInputs(experts, normalize_experts(experts, 1e-5), prev, prev, torch.ones(B, L, dtype=torch.bool))
        dtypes = _record_softmax(monkeypatch)
        for manager in (saue, aaue):
            manager.train()
            out, _ = manager(inputs)
            assert out.dtype == torch.bfloat16
        weight_softmaxes = [d for d in dtypes if d != torch.bfloat16]
        assert weight_softmaxes and all(d == torch.float32 for d in weight_softmaxes), dtypes
        monkeypatch.undo()


def test_itc_logits_in_fp32_under_bf16():
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).to(torch.bfloat16)
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).to(torch.bfloat16)
    ids = torch.arange(4)
    loss, t2i, i2t, _ = itc_loss(text, image, ids, ids, torch.tensor(0.07, dtype=torch.bfloat16), gather=False)
    assert t2i.dtype == i2t.dtype == loss.dtype == torch.float32
