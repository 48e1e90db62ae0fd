"""Managers: how each cross-modal layer aggregates the uni-modal experts' insights (paper §3, docs/recipe.md §1.1).

Every manager of layer l for one modality sees
  U_1..U_N  the N projected uni-modal layers (B x N x L x D), with their type and layer embeddings,
  C         this modality's output of cross-modal layer l-1 (None at layer 1),
  C'        the other modality's output of layer l-1 (the AAUE fused query),
  C_1..C_{l-1}  all previous outputs of this modality (SAE only),
and returns the input of cross-modal layer l (B x L x D) plus its aggregation weights.

"One LayerNorm per input" is computed as one normalisation of U shared by all managers of a modality
(`ExpertInputs.normed`, no affine) followed by each manager's own per-input affine: the statistics of
LN_i(U_i) do not depend on the manager, only its weight and bias do. Same result, 1/L_C of the work.

Noise N(0, (1/N)^2) is added in training only, before the temperature and the softmax: softmax((logits + eps) / tau).
`noise="element"` (the released code, and the default) draws eps i.i.d. for every element of B x N x L x D, so every
sample, token and channel gets its own mix of the N inputs while training; `noise="logits"` draws one eps per logit
the manager computes (SAUE: one N x D draw shared by the batch and the tokens; AAUE: one per token, shared over the
width), which keeps the training weights as small as the evaluation ones (no B x N x L x D weight tensor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer_norm import LayerNorm

NOISE_KINDS = ("element", "logits")


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 (the weights' softmax), the dtype itself when wider (float64 reference tests)."""
    return torch.promote_types(dtype, torch.float32)


@dataclass
class ExpertInputs:
    experts: torch.Tensor  # B x N x L x D
    normed: torch.Tensor  # F.layer_norm(experts) without affine
    prev: torch.Tensor | None = None  # C_{l-1}
    other: torch.Tensor | None = None  # C'_{l-1}
    other_mask: torch.Tensor | None = None  # B x L' bool, True = real token (when the other side is text)
    history: list = field(default_factory=list)  # C_1 .. C_{l-1}


def normalize_experts(experts: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(experts, experts.shape[-1:], eps=eps)


class Manager(nn.Module):
    """Shared pieces: per-input LayerNorm affine, the prev-output LayerNorm and W_C, noisy softmax.

    `scalar`: W_C is one number instead of a 1 x D vector (model.manager_weights=scalar, as the released code's
    scalar weights). `noise`: one of NOISE_KINDS (see the module docstring)."""

    def __init__(self, num_experts: int, dim: int, norm: type[LayerNorm], eps: float, uses_prev: bool,
                 scalar: bool = False, noise: str = "element"):
        super().__init__()
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown manager noise {noise!r}: one of {', '.join(NOISE_KINDS)}")
        self.num_experts = num_experts
        self.dim = dim
        self.eps = eps
        self.noise = noise
        # LN_i affine for each of the N inputs (the statistics are shared, see the module docstring).
        self.expert_norm_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.expert_norm_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.uses_prev = uses_prev
        if uses_prev:
            self.prev_norm = norm(dim, eps=eps)
            # W_C: a raw weight, init 1.0, outside the softmax
            self.prev_weight = nn.Parameter(torch.ones(1, 1 if scalar else dim))
        self.last_weights: torch.Tensor | None = None  # detached mean weight per expert, for logging

    @property
    def element_noise(self) -> bool:
        """True when this forward draws noise per element of B x N x L x D (training with noise="element")."""
        return self.training and self.noise == "element"

    # Logits, temperature, noise and softmax run in fp32 under bf16 training: the weights start near 1/N and the
    # noise is N(0, (1/N)^2), below bf16's resolution (about 1e-3 around 1/6); the weights go back to the
    # input's dtype for the weighted sum. In fp32 runs nothing changes.
    def noisy_softmax(self, logits: torch.Tensor, temperature: torch.Tensor, dim: int) -> torch.Tensor:
        """softmax((logits + eps) / tau) over `dim`, eps drawn per logit in training (noise="logits")."""
        dtype, wide = logits.dtype, _at_least_fp32(logits.dtype)
        logits = logits.to(wide)
        if self.training:
            logits = logits + torch.randn_like(logits) / self.num_experts
        return torch.softmax(logits / temperature.to(wide), dim=dim).to(dtype)

    def element_softmax(self, logits: torch.Tensor, temperature: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """softmax over axis 1 of (logits + eps) / tau, logits broadcast to `shape` (B x N x L x D) and eps drawn
        i.i.d. for each of its elements: the weights of every sample, token and channel explore on their own."""
        wide = _at_least_fp32(logits.dtype)
        noise = torch.randn(shape, dtype=wide, device=logits.device) / self.num_experts
        return torch.softmax((logits.to(wide) + noise) / temperature.to(wide), dim=1).to(logits.dtype)

    def element_mix(self, logits: torch.Tensor, temperature: torch.Tensor,
                    normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum_i w_i * LN_i(U_i), w) with w = softmax over axis 1 of (logits + eps) / tau, eps drawn per element of
        `normed` (B x N x L x D), as one autograd step (`_ElementMix`)."""
        wide = _at_least_fp32(logits.dtype)
        noise = torch.randn(normed.shape, dtype=wide, device=normed.device)
        return _ElementMix.apply(logits, noise, temperature, normed, self.expert_norm_weight, self.expert_norm_bias)

    def expert_affine(self, normed: torch.Tensor) -> torch.Tensor:
        """LN_i(U_i) for all i at once: B x N x L x D."""
        return normed * self.expert_norm_weight[:, None, :] + self.expert_norm_bias[:, None, :]

    def prev_term(self, inputs: ExpertInputs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(LN(C), W_C * LN(C)) or (None, None) at layer 1."""
        if not self.uses_prev:
            return None, None
        prev_normed = self.prev_norm(inputs.prev)
        return prev_normed, self.prev_weight * prev_normed

    def static_sum(self, normed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_i * LN_i(U_i) with w of shape N x D (or N x 1), folded into one contraction."""
        weights = weights.expand(self.num_experts, self.dim)
        scale = weights * self.expert_norm_weight
        # a broadcast multiply and a sum over N: ~2x faster forward+backward on the CPU than the einsum
        return (normed * scale[:, None, :]).sum(1) + (weights * self.expert_norm_bias).sum(0)

    def token_sum(self, normed: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_i w_{b,l,i} * LN_i(U_i) with per-token weights B x L x N, broadcast over D."""
        # One (1 x N) @ (N x D) product per token over the scaled inputs, plus the weighted biases (B x L x N @ N x D).
        # Same sum as einsum("bnld,bln,nd->bld"), whose contraction order made it ~4x slower forward+backward.
        scaled = normed * self.expert_norm_weight[:, None, :]
        mixed = torch.matmul(weights.unsqueeze(2), scaled.transpose(1, 2)).squeeze(2)
        return mixed + weights @ self.expert_norm_bias

    def static_weighted(self, normed: torch.Tensor):
        """(sum_i w_i * LN_i(U_i), w) from the learned logits `self.logits` (N x D or N x 1): w is N x D (N x 1), or
        B x N x L x D while training with element noise."""
        if self.element_noise:
            out, weights = self.element_mix(self.logits[None, :, None, :], self.temperature, normed)
            self.record(weights, expert_dim=1)
            return out, weights
        weights = self.noisy_softmax(self.logits, self.temperature, dim=0)
        self.record(weights.expand(self.num_experts, self.dim), expert_dim=0)
        return self.static_sum(normed, weights), weights

    def token_weighted(self, logits: torch.Tensor, normed: torch.Tensor, prev: torch.Tensor):
        """(sum_i w_i * LN_i(U_i) + W_C * LN(C), w) from per-token logits B x L x N: w is B x L x N, or
        B x N x L x D while training with element noise."""
        if self.element_noise:
            out, weights = self.element_mix(logits.transpose(1, 2).unsqueeze(-1), self.temperature, normed)
            self.record(weights, expert_dim=1)
            return out + prev, weights
        weights = self.noisy_softmax(logits, self.temperature, dim=-1)
        self.record(weights, expert_dim=-1)
        return self.token_sum(normed, weights) + prev, weights

    def record(self, weights: torch.Tensor, expert_dim: int) -> None:
        """The mean weight of each expert over every other axis (one reduction: no copy of B x N x L x D)."""
        with torch.no_grad():
            expert_dim %= weights.dim()
            others = [d for d in range(weights.dim()) if d != expert_dim]
            self.last_weights = weights.detach().float().mean(dim=others)


class _ElementMix(torch.autograd.Function):
    """out = sum_i w_i * (normed_i * g_i + b_i) over axis 1, w = softmax over axis 1 of (logits + noise / N) / tau.

    The element-noise managers' step written out: autograd over the plain expression keeps ~7 tensors of
    B x N x L x D per manager and makes ~25 passes over them (noise, temperature, softmax, affine, product, sum);
    this makes ~16 and keeps three (z, w and the affine inputs a). Backward with G = d out (B x 1 x L x D):
      dA = G * w;  d normed = dA * g;  dg = sum_{B,L} dA * normed;  db = sum_{B,L} dA
      dz = w * (G * a - sum_i w_i G a_i) = dA * (a - out)       (softmax backward: sum_i w_i a_i = out)
      d logits = sum over the broadcast axes of dz / tau;  d tau = -sum(dz * z) / tau.
    logits broadcast to B x N x L x D (1 x N x 1 x D static, B x N x L x 1 per token); `noise` is a fresh
    standard-normal draw of that shape, which this overwrites. z, its softmax and d logits / d tau are in fp32 at
    least (the manager softmax's rule), the weighted sum in the inputs' dtype."""

    @staticmethod
    def forward(ctx, logits, noise, temperature, normed, weight, bias):
        num_experts = normed.shape[1]
        wide = noise.dtype
        tau = temperature.to(wide)
        # (logits + noise / N) / tau in place: the same values as the three out-of-place steps
        z = noise.div_(num_experts).add_(logits.to(wide)).div_(tau)
        weights = torch.softmax(z, dim=1).to(normed.dtype)
        affine = torch.addcmul(bias[:, None, :], normed, weight[:, None, :])
        out = (weights * affine).sum(1)
        ctx.save_for_backward(logits, z, tau, weights, affine, normed, weight, out)
        ctx.temperature_dtype = temperature.dtype
        ctx.mark_non_differentiable(weights)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, _grad_weights):
        logits, z, tau, weights, affine, normed, weight, out = ctx.saved_tensors
        grad_affine = grad_out.unsqueeze(1) * weights
        grad_normed = grad_affine * weight[:, None, :] if ctx.needs_input_grad[3] else None
        grad_weight = (grad_affine * normed).sum((0, 2)) if ctx.needs_input_grad[4] else None
        grad_bias = grad_affine.sum((0, 2)) if ctx.needs_input_grad[5] else None
        grad_z = (affine - out.unsqueeze(1)).to(z.dtype).mul_(grad_affine)
        grad_logits = grad_temperature = None
        if ctx.needs_input_grad[0]:
            grad_logits = (grad_z.sum_to_size(logits.shape) / tau).to(logits.dtype)
        if ctx.needs_input_grad[2]:
            grad_temperature = (-torch.dot(grad_z.flatten(), z.flatten()) / tau).to(ctx.temperature_dtype)
        return grad_logits, None, grad_temperature, grad_normed, grad_weight, grad_bias


class SAUEManager(Manager):
    """Static: learnable logits W (N x D or N x 1, init 1/N), softmax over N with learnable temperature.

    Layer 1 has no previous output, so it is sum_i w_i LN_i(U_i) alone (paper Eq. 8-9).
    """

    def __init__(self, num_experts, dim, norm, eps, uses_prev, scalar=False, noise="element"):
        super().__init__(num_experts, dim, norm, eps, uses_prev, scalar=scalar, noise=noise)
        self.logits = nn.Parameter(torch.full((num_experts, 1 if scalar else dim), 1.0 / num_experts))
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        out, weights = self.static_weighted(inputs.normed)
        _, prev = self.prev_term(inputs)
        if prev is not None:
            out = out + prev
        return out, weights


class AAUEManager(Manager):
    """Adaptive: per-token logits generated from the query; `fused=True` is the cross-modal fused query.

    query C:       logits = Linear(D -> N)(LN(C))
    fused query:   A = softmax((LN(C) Wq + bq)(LN_q(C') Wk + bk)^T / sqrt(D)), value LN_q(C') itself,
                   logits = Linear(2D -> N)(concat(A @ LN_q(C'), LN(C)))
    """

    def __init__(self, num_experts, dim, norm, eps, fused=True, mask_padding=False, scalar=False, noise="element"):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True, scalar=scalar, noise=noise)
        self.fused = fused
        self.mask_padding = mask_padding
        if fused:
            self.other_norm = norm(dim, eps=eps)
            self.query = nn.Linear(dim, dim)
            self.key = nn.Linear(dim, dim)
        self.to_logits = nn.Linear(2 * dim if fused else dim, num_experts)
        self.temperature = nn.Parameter(torch.ones(1))

    def fused_query(self, prev_normed: torch.Tensor, inputs: ExpertInputs) -> torch.Tensor:
        other = self.other_norm(inputs.other)
        q = self.query(prev_normed).unsqueeze(1)
        k = self.key(other).unsqueeze(1)
        mask = None
        if self.mask_padding and inputs.other_mask is not None:
            mask = inputs.other_mask[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, other.unsqueeze(1), attn_mask=mask).squeeze(1)
        return torch.cat([attended, prev_normed], dim=-1)

    def forward(self, inputs: ExpertInputs):
        prev_normed, prev = self.prev_term(inputs)
        query = self.fused_query(prev_normed, inputs) if self.fused else prev_normed
        return self.token_weighted(self.to_logits(query), inputs.normed, prev)


class ConcatAttentionManager(Manager):
    """Appendix D: W_A = Linear(2D -> D)(concat(C broadcast to N, U)), N x L x D weights, softmax over N."""

    def __init__(self, num_experts, dim, norm, eps, scalar=False, noise="element"):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True, scalar=scalar, noise=noise)
        self.to_logits = nn.Linear(2 * dim, dim)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        prev_normed, prev = self.prev_term(inputs)
        experts = self.expert_affine(inputs.normed)  # B x N x L x D
        query = torch.cat([prev_normed.unsqueeze(1).expand_as(experts), experts], dim=-1)
        # the logits are already per element, so both noise kinds draw eps per element
        weights = self.noisy_softmax(self.to_logits(query), self.temperature, dim=1)  # B x N x L x D
        out = (weights * experts).sum(1) + prev
        self.record(weights, expert_dim=1)
        return out, weights


class CrossAttentionManager(Manager):
    """Appendix D: query LN(C) (L x D), keys the first token of each expert (N x D), no value projection."""

    def __init__(self, num_experts, dim, norm, eps, scalar=False, noise="element"):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True, scalar=scalar, noise=noise)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        prev_normed, prev = self.prev_term(inputs)
        first_tokens = self.expert_affine(inputs.normed[:, :, :1]).squeeze(2)  # B x N x D
        logits = self.query(prev_normed) @ self.key(first_tokens).transpose(1, 2) / math.sqrt(self.dim)  # B x L x N
        return self.token_weighted(logits, inputs.normed, prev)


class SAEManager(Manager):
    """Eq. 4 with the split initialisation: uni-modal logits (init 1/N) and cross-modal logits over
    C_1..C_{l-1} (init 1/(l-1)), each with its own softmax temperature and one LayerNorm per input."""

    def __init__(self, num_experts, dim, norm, eps, layer_index: int, scalar=False, noise="element"):
        super().__init__(num_experts, dim, norm, eps, uses_prev=False, noise=noise)
        width = 1 if scalar else dim
        self.logits = nn.Parameter(torch.full((num_experts, width), 1.0 / num_experts))
        self.temperature = nn.Parameter(torch.ones(1))
        self.num_history = layer_index  # layer l (0-based index l-1) sees l-1 previous outputs
        if layer_index > 0:
            self.history_logits = nn.Parameter(torch.full((layer_index, width), 1.0 / layer_index))
            self.history_temperature = nn.Parameter(torch.ones(1))
            self.history_norms = nn.ModuleList(norm(dim, eps=eps) for _ in range(layer_index))

    def forward(self, inputs: ExpertInputs):
        out, weights = self.static_weighted(inputs.normed)
        if self.num_history:
            if self.element_noise:  # B x (l-1) x L x D, indexed per previous output below
                batch, _, length, dim = inputs.normed.shape
                history_weights = self.element_softmax(self.history_logits[None, :, None, :], self.history_temperature,
                                                       torch.Size((batch, self.num_history, length, dim))).unbind(1)
            else:
                history_weights = self.noisy_softmax(self.history_logits, self.history_temperature, dim=0)
            for j, (norm, past) in enumerate(zip(self.history_norms, inputs.history)):
                out = out + history_weights[j] * norm(past)
        return out, weights


class BridgeManager(nn.Module):
    """BridgeTower: layer l takes uni-modal layer L-N+l... only, through LN(U + C) (LN(U) at layer 1)."""

    def __init__(self, expert_index: int, dim: int, norm: type[LayerNorm], eps: float):
        super().__init__()
        self.expert_index = expert_index
        self.norm = norm(dim, eps=eps)
        self.last_weights = None

    def forward(self, inputs: ExpertInputs):
        u = inputs.experts[:, self.expert_index]
        return self.norm(u if inputs.prev is None else u + inputs.prev), None


def build_manager(kind: str, layer_index: int, num_experts: int, num_layers: int, dim: int,
                  norm: type[LayerNorm], eps: float, scalar: bool = False, mask_padding: bool = False,
                  noise: str = "element"):
    """The manager of cross-modal layer `layer_index` (0-based). Layer 1 is SAUE for every adaptive kind."""
    if kind == "meter":
        return None
    if kind == "bridgetower":
        return BridgeManager(num_experts - num_layers + layer_index, dim, norm, eps)
    common = dict(scalar=scalar, noise=noise)
    if kind == "sae":
        return SAEManager(num_experts, dim, norm, eps, layer_index, **common)
    if kind == "saue" or layer_index == 0:
        return SAUEManager(num_experts, dim, norm, eps, uses_prev=layer_index > 0, **common)
    if kind in ("aaue", "aaue_fused"):
        return AAUEManager(num_experts, dim, norm, eps, fused=kind == "aaue_fused", mask_padding=mask_padding,
                           **common)
    if kind == "concat_attention":
        return ConcatAttentionManager(num_experts, dim, norm, eps, **common)
    if kind == "cross_attention":
        return CrossAttentionManager(num_experts, dim, norm, eps, **common)
    raise ValueError(f"unknown manager kind {kind!r}")
