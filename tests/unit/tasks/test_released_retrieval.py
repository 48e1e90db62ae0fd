"""Retrieval follows the released code (LooperXX/ManagerTower, src/modules/objectives.py): the ITM re-ranking
of the ITC top-k at inference, one image per caption in the ITC loss, and hard negatives drawn from the batch
of every rank (two gloo ranks)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from managertower.config import load_config
from managertower.tasks import build_task, metrics
from managertower.tasks.losses import IGNORE
from managertower.dist import free_port

REPO = Path(__file__).resolve().parents[3]
TINY_FLICKR = str(REPO / "finetune/configs/tiny_flickr30k.yaml")


def test_released_ranking_uses_the_positive_logit_and_the_max_of_both_directions():
    """Released objectives.py, compute_irtr_itm_itc_recall: each direction's ITC top-k pairs score the ITM
    positive logit `itm_score(...)[:, 1]` (lines 1046-1048 and 1242-1244), every other pair -100.0 (lines 1047,
    1243), and both rankings use the element-wise max of the two matrices (lines 1266-1267, ranked at
    1269-1288). Three texts t0..t2 of images 0..2, k = 2 candidates each way; every pair scored in both
    directions has the same logits."""
    text_top = torch.tensor([[1, 0], [1, 2], [2, 0]])
    text_top_logits = torch.tensor([[[3.0, 2.0], [0.0, 1.5]],   # t0: img1 l1 2.0 (log-odds -1), img0 l1 1.5 (1.5)
                                    [[0.0, 1.0], [0.0, 0.5]],   # t1: img1 1.0, img2 0.5
                                    [[0.0, 4.0], [0.0, 0.1]]])  # t2: img2 4.0, img0 0.1
    image_top = torch.tensor([[0, 2], [1, 0], [2, 0]])
    image_top_logits = torch.tensor([[[0.0, 1.5], [0.0, 0.1]],   # img0: t0, t2
                                     [[0.0, 1.0], [3.0, 2.0]],   # img1: t1, t0
                                     [[0.0, 4.0], [0.0, 6.0]]])  # img2: t2, and t0 (not in t0's ITC top-k)
    text_ranked, image_ranked = metrics.itm_ranking(text_top, text_top_logits, image_top, image_top_logits)
    # The merged text x image matrix: t0 [1.5, 2.0, 6.0], t1 [-100, 1.0, 0.5], t2 [0.1, -100, 4.0].
    assert text_ranked.tolist() == [[2, 1], [1, 2], [2, 0]]
    assert image_ranked.tolist() == [[0, 2], [0, 1], [0, 2]]
    # The old rule (each direction's candidates alone, by the log-odds logit1 - logit0) gave t0 [0, 1] and
    # img1 [1, 0]: the released answer differs on both.
    assert text_ranked[0].tolist() != [0, 1] and image_ranked[1].tolist() != [1, 0]
    recall = metrics.retrieval_recall(text_ranked, image_ranked, [0, 1, 2], ks=(1,))
    assert recall["ir_r1"] == pytest.approx(2 / 3) and recall["tr_r1"] == pytest.approx(1 / 3)


def test_released_ranking_fills_pairs_outside_a_top_k_with_minus_100():
    """Released objectives.py lines 1047 and 1243: each direction's matrix starts as `torch.full(..., -100.0)`
    and only its top-k pairs are written; the max of the two (lines 1266-1267) leaves a pair scored in one
    direction at max(its logit, -100). One text, two images: image 1 is in both top-k lists at -150, image 0
    only in its own (the text is image 0's candidate) at -150, so image 0 scores max(-100, -150) = -100."""
    text_ranked, image_ranked = metrics.itm_ranking(
        torch.tensor([[1]]), torch.tensor([[[0.0, -150.0]]]),
        torch.tensor([[0], [0]]), torch.tensor([[[0.0, -150.0]], [[0.0, -150.0]]]))
    assert metrics.ITM_RANK_FILL == -100.0
    assert text_ranked.tolist() == [[0]] and image_ranked.tolist() == [[0], [0]]


def _tiny_task(*overrides: str):
    cfg = load_config(TINY_FLICKR, ["run.dir=/tmp/unused-run-dir", *overrides])
    task = build_task(cfg)
    task.eval()  # no dropout: the numbers can be compared
    return task


def _batch(task, pictures: list[int], views: torch.Tensor) -> dict:
    """The train collator's batch with these views; the loader hands a picture's captions the same pixels
    exactly when it does not augment each example (`shared_views`), as these views do or do not."""
    examples = [{"text": f"a {['red', 'blue', 'green', 'grey'][p % 4]} shape number {p} at the top left",
                 "image_id": p} for p in pictures]
    collator = task.make_collator(train=True)
    first = {p: row for row, p in reversed(list(enumerate(pictures)))}
    collator.shared_views = all(torch.equal(views[row], views[first[p]]) for row, p in enumerate(pictures))
    batch = collator(examples)
    batch["pixel_values"] = views
    return batch


def _released_itc(task, batch) -> torch.Tensor:
    """The released ITC of one process: every caption's image encoded on its own, one column per caption,
    targets spread over the same-picture columns (objectives.py lines 155-174)."""
    model = task.model
    text_cls = model.encode_text(batch["input_ids"], batch["attention_mask"])[:, -1, 0]
    image_cls = torch.cat([model.encode_image(view[None])[:, -1, 0] for view in batch["pixel_values"]])
    text, image = task.itc_head(text_cls, image_cls)
    scale = 1 / task.itc_head.temperature()
    same = (batch["image_ids"][:, None] == batch["image_ids"][None, :]).float()
    labels = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(scale * image @ text.t(), labels) + F.cross_entropy(scale * text @ image.t(), labels)) / 2


@torch.no_grad()
def test_released_itc_puts_one_image_per_caption():
    """Released objectives.py, compute_itm_itc: one image per caption (`assert batch["image"][0].size(0) ==
    len(batch["text"])`, line 138), so two captions of a picture are two ITC columns, both positives of the
    picture's captions (`idx_all`, lines 163-170). Ours encodes a picture once when its captions share the
    pixels and gives it a column per caption; with their own augmented views each caption's view is encoded."""
    torch.manual_seed(0)
    task = _tiny_task("task.retrieval_global_negatives=false")
    picture = torch.randn(3, 64, 64)
    shared = torch.stack([picture, picture, torch.randn(3, 64, 64)])  # two captions of picture 7, one of 9
    for views in (shared, torch.randn(3, 3, 64, 64)):  # one view per picture, then one view per caption
        batch = _batch(task, [7, 7, 9], views)
        out = task(batch)
        torch.testing.assert_close(out["loss_itc"], _released_itc(task, batch), rtol=1e-5, atol=1e-5)
    # Picture-once columns (the old rule) give another loss on the shared batch.
    batch = _batch(task, [7, 7, 9], shared)
    assert batch["view_rows"].tolist() == [0, 2] and batch["view_of_row"].tolist() == [0, 0, 1]  # encoded once
    assert "view_rows" not in _batch(task, [7, 7, 9], torch.randn(3, 3, 64, 64))
    model = task.model
    text, image = task.itc_head(model.encode_text(batch["input_ids"], batch["attention_mask"])[:, -1, 0],
                                model.encode_image(shared[[0, 2]])[:, -1, 0])
    scale = 1 / task.itc_head.temperature()
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    old = (F.cross_entropy(scale * text @ image.t(), same)
           + F.cross_entropy(scale * image @ text.t(), same.t() / same.t().sum(1, keepdim=True))) / 2
    assert not torch.allclose(old, task(batch)["loss_itc"], atol=1e-4)


# ------------------------------------------------------------------------------- hard negatives, two ranks

RANK_PICTURES = {0: [100, 100, 100, 100], 1: [200, 201, 202, 203]}  # rank 0: one picture, no negative of its own


def _rank_batch(task, rank: int) -> dict:
    generator = torch.Generator().manual_seed(10 + rank)
    if rank == 0:
        views = torch.randn(1, 3, 64, 64, generator=generator).expand(4, -1, -1, -1).contiguous()
    else:
        views = torch.randn(4, 3, 64, 64, generator=generator)
    return _batch(task, RANK_PICTURES[rank], views)


def _negatives_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        task = _tiny_task()
        results = {}
        for global_negatives in (True, False):
            task.cfg.task.retrieval_global_negatives = global_negatives
            task.zero_grad(set_to_none=True)
            torch.manual_seed(rank)
            out = task(_rank_batch(task, rank))
            (out["loss"] * (1.0 if rank == 0 else 0.0)).backward()  # only rank 0's loss counts
            text_rows, image_rows, labels, start = out["itm_rows"]
            results[global_negatives] = {
                "text_rows": text_rows, "image_rows": image_rows, "labels": labels, "start": start,
                "loss_itm": out["loss_itm"].detach(),
                "image_proj_grad": float(task.model.image_proj.weight.grad.abs().sum()),
                "text_proj_grad": float(task.model.text_proj.weight.grad.abs().sum())}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """Two gloo ranks (torch.multiprocessing) each run a training step of the tiny Flickr30K task, with global
    negatives and then with the rank's own; [rank 0 results, rank 1 results], each {global_negatives: ...}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("negatives")
    mp.spawn(_negatives_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_released_hard_negatives_come_from_every_rank(two_ranks):
    """Released objectives.py, compute_itm_itc with gather_global_negative=True (set by
    scripts/ftfpt-base-flickr.sh, EXP_GGN=True): the ITC softmax over the gathered batch with every same-picture
    column zeroed (lines 185-195), a negative image per text and a negative text per image drawn from it
    (lines 203-254) out of every rank's cross-modal-projected uni-modal layers, gathered with gradients
    (`all_gather(..., sync_grads=True)`, lines 201 and 230-231). Rank 0 holds four captions of one picture, so
    its every negative is one of rank 1's examples (rows 4..7 of the global batch)."""
    rank0, rank1 = two_ranks[0][True], two_ranks[1][True]
    assert rank0["start"] == 0 and rank1["start"] == 4
    assert rank0["labels"].tolist() == [1] * 4 + [0] * 8  # B positives, B negative images, B negative texts
    assert rank0["text_rows"][:8].tolist() == [0, 1, 2, 3] * 2 and rank0["image_rows"][8:].tolist() == [0, 1, 2, 3]
    assert all(4 <= row < 8 for row in rank0["image_rows"][4:8].tolist())  # rank 1's pictures
    assert all(4 <= row < 8 for row in rank0["text_rows"][8:].tolist())  # rank 1's captions
    # Rank 1's negatives are never its own positive, and may be any rank's.
    assert rank1["labels"].tolist() == [1] * 4 + [0] * 8
    assert all(row != own for row, own in zip(rank1["image_rows"][4:8].tolist(), range(4, 8)))
    # The gradient of rank 0's ITM reaches the projections of rank 1, whose own loss counted 0.
    assert rank1["image_proj_grad"] > 0 and rank1["text_proj_grad"] > 0


def test_released_hard_negatives_are_the_gathered_layers_of_their_rank(two_ranks):
    """The fusion of rank 0's ITM pairs sees the right rows of the gathered layers (released objectives.py lines
    201, 230-231 gather them; 319-330 pack positives, negative images, negative texts with labels [1, 0, 0]):
    rank 0's loss_itm equals one process's ITM loss over the two ranks' batches concatenated, at the same rows."""
    torch.manual_seed(0)
    task = _tiny_task()
    model = task.model
    texts, masks, images = [], [], []
    with torch.no_grad():
        for rank in range(2):
            batch = _rank_batch(task, rank)
            texts.append(model.project_text(model.encode_text(batch["input_ids"], batch["attention_mask"])))
            masks.append(batch["attention_mask"])
            images.append(model.project_image(model.encode_image(batch["pixel_values"])))
        text_pool, mask_pool, image_pool = torch.cat(texts), torch.cat(masks), torch.cat(images)
        rank0 = two_ranks[0][True]
        rows_t, rows_i = rank0["text_rows"], rank0["image_rows"]
        logits = task.itm_logits(text_pool[rows_t], mask_pool[rows_t], image_pool[rows_i])
        torch.testing.assert_close(rank0["loss_itm"], F.cross_entropy(logits, rank0["labels"]),
                                   rtol=1e-4, atol=1e-5)


def test_rank_own_negatives_stay_on_the_rank_when_switched_off(two_ranks):
    """task.retrieval_global_negatives=false keeps the released gather_global_negative=False branch (objectives.py
    lines 256-310: the rank's own columns `itc_logits[:, bs * rank:bs * (rank+1)]`, line 259-260): rank 1 never
    reads rank 0's layers. Rank 0, one picture, gets no negative: a row whose every candidate is a positive is
    dropped (`sample_hard_negatives`), where the released multinomial would fall back to `weights + 1e-5` (lines
    290-294) and label one of the picture's own captions a negative."""
    rank0, rank1 = two_ranks[0][False], two_ranks[1][False]
    assert rank0["start"] == 0 and rank1["start"] == 0
    kept = rank0["labels"] != IGNORE  # the pairs stay in place with the ignored label
    assert rank0["labels"][kept].tolist() == [1] * 4 and rank0["text_rows"][kept].tolist() == [0, 1, 2, 3]
    assert all(0 <= row < 4 for row in torch.cat([rank1["text_rows"], rank1["image_rows"]]).tolist())
    assert rank1["image_proj_grad"] == 0  # rank 0's loss does not reach rank 1
