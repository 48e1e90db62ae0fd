"""The objectives' losses, shared by the tasks that use them.

    masked_cross_entropy      MLM over the picked positions only (pre-training)
    itc_loss                  image-text contrastive loss over the global batch (retrieval; optional in pre-training)
    sample_hard_negatives     ITM hard negatives drawn from ITC similarities (retrieval)
    itm_pairs                 the retrieval ITM batch: B positives, a hard negative image per text and a hard
                              negative text per image
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist

IGNORE = -100  # the label cross_entropy leaves out (its default ignore_index)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the masked positions' logits; a batch where no token was picked gives a zero loss
    that still reaches every weight (DeepSpeed's ZeRO expects gradients for all of them)."""
    if labels.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels)


def itc_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, text_ids: torch.Tensor, image_ids: torch.Tensor,
             temperature: torch.Tensor, gather: bool = True):
    """Contrastive loss of normalised embeddings, gathered across ranks (with gradients) when `gather`.

    text_emb B x d with picture ids text_ids (B), image_emb B' x d with ids image_ids (B'). Returns
    (loss, text->all-images logits, image->all-texts logits, the gathered image ids)."""
    all_images = dist.gather_with_grad(image_emb) if gather else image_emb
    all_texts = dist.gather_with_grad(text_emb) if gather else text_emb
    all_image_ids = dist.gather_rows(image_ids) if gather else image_ids
    all_text_ids = dist.gather_rows(text_ids) if gather else text_ids
    # fp32 logits under bf16: a 0.07 temperature scales the similarities' bf16 rounding by 14
    wide = torch.promote_types(text_emb.dtype, torch.float32)
    t2i = text_emb.to(wide) @ all_images.to(wide).t() / temperature.to(wide)
    i2t = image_emb.to(wide) @ all_texts.to(wide).t() / temperature.to(wide)

    def soft_ce(logits, row_ids, column_ids):
        positives = (row_ids[:, None] == column_ids[None, :]).float()
        targets = positives / positives.sum(1, keepdim=True).clamp(min=1)
        return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()

    loss = (soft_ce(t2i, text_ids, all_image_ids) + soft_ce(i2t, image_ids, all_text_ids)) / 2
    return loss, t2i, i2t, all_image_ids


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, row_ids: torch.Tensor, column_ids: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One column per row drawn from softmax(similarity row) with every positive (same id) zeroed.

    Returns (column index per row, valid mask): a row whose every column is a positive has no negative. A row
    whose softmax underflows to zero on all negatives draws uniformly among them."""
    weights = F.softmax(similarity.float(), dim=1)
    negatives = row_ids[:, None] != column_ids[None, :]
    weights = weights * negatives
    valid = negatives.any(1)
    dead = valid & (weights.sum(1) <= 0)
    # torch.where rather than masked assignment: no read-back of how many rows are dead (a GPU sync)
    weights = torch.where(dead[:, None], negatives.float(), weights)
    weights = torch.where(valid[:, None], weights, 1.0)  # any column; the row is dropped
    picked = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return picked, valid


@torch.no_grad()
def itm_pairs(t2i: torch.Tensor, i2t: torch.Tensor, ids: torch.Tensor, column_ids: torch.Tensor, start: int = 0,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The retrieval ITM batch of the released code (objectives.py, `compute_itm_itc`): this rank's B positive
    pairs, then a hard negative image for each text, then a hard negative text for each example's image.

    The candidates are the rows of a pool of examples (text i with image i) where this rank's B examples sit at
    start..start+B: the global batch in rank order (the released gather_global_negative) or the micro-batch
    alone (start 0). t2i (B x C): this rank's texts against the pool's images; i2t (B x C): this rank's images
    against the pool's texts; ids (B) and column_ids (C): their picture ids. Negatives are drawn from the
    softmax of a row with every positive zeroed (`sample_hard_negatives`); a row whose every candidate is a
    positive gets none: its pair stays in place (3B rows always, so that no size is read back from the device)
    with the label IGNORE, which cross_entropy leaves out. Returns (text rows, image rows, labels: 1 for the B
    positives, then 0 or IGNORE) into the pool."""
    size = ids.shape[0]
    own = torch.arange(size, device=ids.device) + start
    neg_image, text_ok = sample_hard_negatives(t2i, ids, column_ids, generator)
    neg_text, image_ok = sample_hard_negatives(i2t, ids, column_ids, generator)
    text_rows = torch.cat([own, own, neg_text])
    image_rows = torch.cat([own, neg_image, own])
    negative = torch.zeros(size, dtype=torch.long, device=ids.device)
    labels = torch.cat([torch.ones_like(negative), torch.where(text_ok, negative, IGNORE),
                        torch.where(image_ok, negative, IGNORE)])
    return text_rows, image_rows, labels
