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

Noise N(0, (1/N)^2) is added element-wise to the N logits in training only, before the temperature and the
softmax: softmax((logits + eps) / tau).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer_norm import LayerNorm


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
    """Shared pieces: per-input LayerNorm affine, the prev-output LayerNorm and W_C, noisy softmax."""

    def __init__(self, num_experts: int, dim: int, norm: type[LayerNorm], eps: float, uses_prev: bool):
        super().__init__()
        self.num_experts = num_experts
        self.dim = dim
        self.eps = eps
        # LN_i affine for each of the N inputs (the statistics are shared, see the module docstring).
        self.expert_norm_weight = nn.Parameter(torch.ones(num_experts, dim))
        self.expert_norm_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.uses_prev = uses_prev
        if uses_prev:
            self.prev_norm = norm(dim, eps=eps)
            self.prev_weight = nn.Parameter(torch.ones(1, dim))  # W_C: a raw weight, init 1.0
        self.last_weights: torch.Tensor | None = None  # detached mean weight per expert, for logging

    def noisy_softmax(self, logits: torch.Tensor, temperature: torch.Tensor, dim: int) -> torch.Tensor:
        if self.training:
            logits = logits + torch.randn_like(logits) / self.num_experts
        return torch.softmax(logits / temperature, dim=dim)

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

    def record(self, weights: torch.Tensor) -> None:
        with torch.no_grad():
            # weights put the expert axis last (N x D is transposed by the callers that have it first)
            self.last_weights = weights.detach().float().reshape(-1, self.num_experts).mean(0)


class SAUEManager(Manager):
    """Static: learnable logits W (N x D or N x 1, init 1/N), softmax over N with learnable temperature.

    Layer 1 has no previous output, so it is sum_i w_i LN_i(U_i) alone (paper Eq. 8-9).
    """

    def __init__(self, num_experts, dim, norm, eps, uses_prev, scalar=False):
        super().__init__(num_experts, dim, norm, eps, uses_prev)
        self.logits = nn.Parameter(torch.full((num_experts, 1 if scalar else dim), 1.0 / num_experts))
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        weights = self.noisy_softmax(self.logits, self.temperature, dim=0)
        out = self.static_sum(inputs.normed, weights)
        _, prev = self.prev_term(inputs)
        if prev is not None:
            out = out + prev
        self.record(weights.expand(self.num_experts, self.dim).t())
        return out, weights


class AAUEManager(Manager):
    """Adaptive: per-token logits generated from the query; `fused=True` is the cross-modal fused query.

    query C:       logits = Linear(D -> N)(LN(C))
    fused query:   A = softmax((LN(C) Wq + bq)(LN_q(C') Wk + bk)^T / sqrt(D)), value LN_q(C') itself,
                   logits = Linear(2D -> N)(concat(A @ LN_q(C'), LN(C)))
    """

    def __init__(self, num_experts, dim, norm, eps, fused=True, mask_padding=False):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True)
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
        weights = self.noisy_softmax(self.to_logits(query), self.temperature, dim=-1)  # B x L x N
        out = self.token_sum(inputs.normed, weights) + prev
        self.record(weights)
        return out, weights


class ConcatAttentionManager(Manager):
    """Appendix D: W_A = Linear(2D -> D)(concat(C broadcast to N, U)), N x L x D weights, softmax over N."""

    def __init__(self, num_experts, dim, norm, eps):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True)
        self.to_logits = nn.Linear(2 * dim, dim)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        prev_normed, prev = self.prev_term(inputs)
        experts = self.expert_affine(inputs.normed)  # B x N x L x D
        query = torch.cat([prev_normed.unsqueeze(1).expand_as(experts), experts], dim=-1)
        weights = self.noisy_softmax(self.to_logits(query), self.temperature, dim=1)  # B x N x L x D
        out = (weights * experts).sum(1) + prev
        self.record(weights.movedim(1, -1))
        return out, weights


class CrossAttentionManager(Manager):
    """Appendix D: query LN(C) (L x D), keys the first token of each expert (N x D), no value projection."""

    def __init__(self, num_experts, dim, norm, eps):
        super().__init__(num_experts, dim, norm, eps, uses_prev=True)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.temperature = nn.Parameter(torch.ones(1))

    def forward(self, inputs: ExpertInputs):
        prev_normed, prev = self.prev_term(inputs)
        first_tokens = self.expert_affine(inputs.normed[:, :, :1]).squeeze(2)  # B x N x D
        logits = self.query(prev_normed) @ self.key(first_tokens).transpose(1, 2) / math.sqrt(self.dim)
        weights = self.noisy_softmax(logits, self.temperature, dim=-1)  # B x L x N
        out = self.token_sum(inputs.normed, weights) + prev
        self.record(weights)
        return out, weights


class SAEManager(Manager):
    """Eq. 4 with the split initialisation: uni-modal logits (init 1/N) and cross-modal logits over
    C_1..C_{l-1} (init 1/(l-1)), each with its own softmax temperature and one LayerNorm per input."""

    def __init__(self, num_experts, dim, norm, eps, layer_index: int, scalar=False):
        super().__init__(num_experts, dim, norm, eps, uses_prev=False)
        width = 1 if scalar else dim
        self.logits = nn.Parameter(torch.full((num_experts, width), 1.0 / num_experts))
        self.temperature = nn.Parameter(torch.ones(1))
        self.num_history = layer_index  # layer l (0-based index l-1) sees l-1 previous outputs
        if layer_index > 0:
            self.history_logits = nn.Parameter(torch.full((layer_index, width), 1.0 / layer_index))
            self.history_temperature = nn.Parameter(torch.ones(1))
            self.history_norms = nn.ModuleList(norm(dim, eps=eps) for _ in range(layer_index))

    def forward(self, inputs: ExpertInputs):
        weights = self.noisy_softmax(self.logits, self.temperature, dim=0)
        out = self.static_sum(inputs.normed, weights)
        self.record(weights.expand(self.num_experts, self.dim).t())
        if self.num_history:
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
                  norm: type[LayerNorm], eps: float, scalar: bool = False, mask_padding: bool = False):
    """The manager of cross-modal layer `layer_index` (0-based). Layer 1 is SAUE for every adaptive kind."""
    if kind == "meter":
        return None
    if kind == "bridgetower":
        return BridgeManager(num_experts - num_layers + layer_index, dim, norm, eps)
    if kind == "sae":
        return SAEManager(num_experts, dim, norm, eps, layer_index, scalar=scalar)
    if kind == "saue" or layer_index == 0:
        return SAUEManager(num_experts, dim, norm, eps, uses_prev=layer_index > 0, scalar=scalar)
    if kind in ("aaue", "aaue_fused"):
        return AAUEManager(num_experts, dim, norm, eps, fused=kind == "aaue_fused", mask_padding=mask_padding)
    if kind == "concat_attention":
        return ConcatAttentionManager(num_experts, dim, norm, eps)
    if kind == "cross_attention":
        return CrossAttentionManager(num_experts, dim, norm, eps)
    raise ValueError(f"unknown manager kind {kind!r}")
