"""Fine-tuning metrics (docs/recipe.md §3), as plain functions of tensors and lists so they can be checked by hand.

    vqa_score(pred_answers, answer_scores)        mean soft score of the predicted answers (VQAv2)
    accuracy(pred, labels)                        NLVR2, SNLI-VE
    retrieval_recall(ranked_images, ranked_texts, text_to_image, ks)
                                                  IR (text -> image) and TR (image -> text) recall@K with
                                                  several captions per image
    itm_ranking(text_top, text_top_logits, image_top, image_top_logits)
                                                  the released re-ranking of the ITC top-k by ITM, both ways
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch

from ..data.formats import vqa_answers


def vqa_soft_score(count: int) -> float:
    """The VQAv2 soft score of an answer given by `count` of the 10 annotators: exactly 0, .3, .6, .9, then 1,
    the released dataprep's lookup (the one dataprep stores in the metadata)."""
    return vqa_answers.answer_score(count)


def vqa_score(pred_answers: Sequence[str], answer_scores: Sequence[dict]) -> float:
    """Mean over questions of the soft score the annotators gave the predicted answer (0 if none gave it)."""
    if not pred_answers:
        return 0.0
    total = sum(float(scores.get(pred, 0.0)) for pred, scores in zip(pred_answers, answer_scores))
    return total / len(pred_answers)


def vqa_majority_baseline(answer_scores: Sequence[dict]) -> tuple[str, float]:
    """The single answer that scores best on these questions, and its VQA score: an upper bound on any
    'always answer X' model (the 'majority answer' baseline)."""
    totals: Counter = Counter()
    for scores in answer_scores:
        for answer, score in scores.items():
            totals[answer] += float(score)
    if not totals:
        return "", 0.0
    answer, total = totals.most_common(1)[0]
    return answer, total / len(answer_scores)


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """The exact fraction right (195 of 300 is 0.65, not float32's 0.6499999762)."""
    return int((pred == labels).sum()) / labels.numel() if labels.numel() else 0.0


def headline_recalls(itm: dict[str, float], itc: dict[str, float], rank: str) -> dict[str, float]:
    """Retrieval's metrics: the `rank` ranking's recalls as ir_*/tr_* (task.retrieval_rank), and both rankings
    under their own prefix (itm_*, itc_*); `itc` holds the itc_-prefixed recalls."""
    plain_itc = {name[len("itc_"):]: value for name, value in itc.items()}
    headline = itm if rank == "itm" else plain_itc
    return {**headline, **{f"itm_{name}": value for name, value in itm.items()}, **itc}


def recall_at_k(ranked: torch.Tensor, positives: list[set[int]], ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """ranked: Q x K candidate indices, best first (-1 pads a short list); positives[q]: the right candidates.
    recall@k = fraction of queries with a right candidate among their first k."""
    out = {}
    rows = ranked.tolist()
    for k in ks:
        hits = sum(any(c in positives[q] for c in row[:k]) for q, row in enumerate(rows))
        out[k] = hits / max(1, len(rows))
    return out


def retrieval_recall(text_ranked_images: torch.Tensor, image_ranked_texts: torch.Tensor,
                     text_to_image: Sequence[int], ks: Sequence[int] = (1, 5, 10), prefix: str = "") -> dict:
    """IR: each text's ranked image list against its one image; TR: each image's ranked text list against all
    of its captions (a hit when any of them is in the top k). Returns {prefix}ir_r1 ... {prefix}tr_r10 and the
    means ({prefix}ir_mean, {prefix}tr_mean, {prefix}rsum)."""
    images = image_ranked_texts.shape[0]
    captions_of: list[set[int]] = [set() for _ in range(images)]
    for text, image in enumerate(text_to_image):
        captions_of[image].add(text)
    ir = recall_at_k(text_ranked_images, [{image} for image in text_to_image], ks)
    tr = recall_at_k(image_ranked_texts, captions_of, ks)
    metrics = {}
    for k in ks:
        metrics[f"{prefix}ir_r{k}"] = ir[k]
    for k in ks:
        metrics[f"{prefix}tr_r{k}"] = tr[k]
    metrics[f"{prefix}ir_mean"] = sum(ir.values()) / len(ks)
    metrics[f"{prefix}tr_mean"] = sum(tr.values()) / len(ks)
    metrics[f"{prefix}rsum"] = sum(ir.values()) + sum(tr.values())
    return metrics


ITM_RANK_FILL = -100.0  # the score of a pair outside both directions' ITC top-k (the released code's fill)


def itm_ranking(text_top: torch.Tensor, text_top_logits: torch.Tensor, image_top: torch.Tensor,
                image_top_logits: torch.Tensor, fill: float = ITM_RANK_FILL) -> tuple[torch.Tensor, torch.Tensor]:
    """The released retrieval ranking (objectives.py, `compute_irtr_itm_itc_recall`): ITC top-k re-ranked by
    the ITM positive logit, both directions merged.

    text_top (T x Ki): each text's ITC top-k images, text_top_logits (T x Ki x 2) the ITM logits of those pairs;
    image_top (I x Kt): each image's ITC top-k texts, image_top_logits (I x Kt x 2). A pair scores its raw
    positive logit (logit[1], not the log-odds logit[1] - logit[0]) in the direction(s) whose top-k holds it and
    `fill` elsewhere; the two T x I matrices are merged by their element-wise maximum, so a text's ranking
    also holds the images whose top-k holds the text, and each row and column of the merged matrix is ranked.
    Returns (each text's Ki best images, each image's Kt best texts), best first."""
    texts, images = text_top.shape[0], image_top.shape[0]
    by_text = torch.full((texts, images), fill, dtype=torch.float32, device=text_top.device)
    by_text.scatter_(1, text_top, text_top_logits[..., 1].float())
    by_image = torch.full((images, texts), fill, dtype=torch.float32, device=text_top.device)
    by_image.scatter_(1, image_top, image_top_logits[..., 1].float())
    scores = torch.maximum(by_text, by_image.t(), out=by_text)  # in place: COCO's is 25k x 5k
    del by_image
    text_ranked = scores.topk(text_top.shape[1], dim=1).indices
    image_ranked = scores.t().topk(image_top.shape[1], dim=1).indices
    return text_ranked, image_ranked
