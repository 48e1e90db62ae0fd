"""Task heads: MLM, ITM, the fine-tuning classifiers and the ITC projections (docs/recipe.md §2-3)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer_norm import LayerNorm


class MLMHead(nn.Module):
    """Linear(D,D) -> GELU -> LN(1e-12) -> Linear(D, vocab); not tied to the word embeddings.

    `forward(hidden, labels)` decodes only the masked positions (labels != -100): the vocabulary projection is
    the largest matrix of the step, and the other 85% of the tokens never reach the loss. `positions` (the flat
    B x T indices of those tokens, which the collator computes on the host) selects them without the host sync a
    boolean mask costs on a GPU (its count must come back to size the result).
    """

    def __init__(self, dim: int, vocab_size: int, norm: type[LayerNorm] = LayerNorm):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = norm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):
        if positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, positions)
        elif labels is not None:
            picked = labels != -100
            hidden, labels = hidden[picked], labels[picked]
        logits = self.decoder(self.norm(F.gelu(self.dense(hidden))))
        return logits, labels


class ITMHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim, 2)

    def forward(self, cls_feats: torch.Tensor) -> torch.Tensor:
        return self.fc(cls_feats)


class ClassifierHead(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear (VQAv2: 2D->4D->3129, SNLI-VE: 2D->4D->3, NLVR2: 4D->2D->2)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_classes: int, norm: type[LayerNorm] = LayerNorm):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm = norm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class ITCHead(nn.Module):
    """Projections of the raw uni-modal class features to a shared space, L2-normalised, with a learnable
    temperature: the parameter is the temperature itself (not its log), initialised at 0.07 and clamped in place
    to [0.001, 0.5] after each optimizer step (`clamp_temperature`, called through the task's
    `after_optimizer_step`), as the released code does; the loss divides by it unclamped."""

    TEMPERATURE_RANGE = (0.001, 0.5)

    def __init__(self, text_dim: int, image_dim: int, dim: int = 256, temperature: float = 0.07):
        super().__init__()
        self.text_proj = nn.Linear(text_dim, dim)
        self.image_proj = nn.Linear(image_dim, dim)
        # A 1-element vector, not a 0-dim scalar: DeepSpeed broadcasts parameters as bytes, which a 0-dim
        # tensor cannot be viewed as.
        self.learned_temperature = nn.Parameter(torch.tensor([temperature]))

    def temperature(self) -> torch.Tensor:
        return self.learned_temperature

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        """Clamp the temperature into TEMPERATURE_RANGE in place, in the module and, under DeepSpeed ZeRO, in the
        optimizer's fp32 master copy too (the next step would otherwise start from the unclamped value). Every
        rank calls it: reading a ZeRO master copy is a collective."""
        low, high = self.TEMPERATURE_RANGE
        param = self.learned_temperature
        param.clamp_(low, high)
        if hasattr(param, "ds_id"):
            # ZeRO-3: each rank clamps its own partition, the module's and the fp32 master's (a clamp is elementwise).
            # The full-parameter setter cannot take a parameter smaller than the world (DeepSpeed narrows past its
            # padded one-element partitions).
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            param.ds_tensor.clamp_(low, high)
            master = safe_get_local_fp32_param(param)
            if master is not None:
                safe_set_local_fp32_param(param, master.clamp(low, high))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2: the fp32 master fragment
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(low, high))

    def forward(self, text_cls: torch.Tensor, image_cls: torch.Tensor):
        return (F.normalize(self.text_proj(text_cls), dim=-1), F.normalize(self.image_proj(image_cls), dim=-1))
