"""The losses of tasks/losses.py: hard negatives (never a positive, drawn by similarity) and the ITC loss
gathered across two gloo ranks, gradients included, against a one-process reference."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from managertower.tasks.losses import itc_loss, sample_hard_negatives
from managertower.dist import free_port


def test_hard_negatives_never_pick_a_positive_even_a_same_image_caption():
    generator = torch.Generator().manual_seed(0)
    # 8 captions of 4 pictures (two captions each, side by side as the loader makes them)
    ids = torch.tensor([5, 5, 9, 9, 2, 2, 7, 7])
    for trial in range(50):
        sim = torch.randn(8, 8, generator=generator) * 10
        sim[ids[:, None] == ids[None, :]] += 30  # positives far more similar: the softmax is nearly all theirs
        picked, valid = sample_hard_negatives(sim, ids, ids, generator)
        assert valid.all()
        assert (ids[picked] != ids).all(), (trial, picked)
    # texts against distinct pictures (B x U), with an underflowing softmax on the negatives
    pictures = torch.tensor([5, 9, 2, 7])
    sim = torch.full((8, 4), -1e4)
    sim[ids[:, None] == pictures[None, :]] = 1e4
    picked, valid = sample_hard_negatives(sim, ids, pictures, generator)
    assert valid.all() and (pictures[picked] != ids).all()


def test_hard_negatives_follow_the_similarity_and_skip_rows_without_negatives():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 2, 3, 1])
    sim = torch.tensor([[0.0, 9.0, -9.0, 0.0]] * 4)
    counts = torch.zeros(4)
    for _ in range(200):
        picked, _ = sample_hard_negatives(sim[:1], ids[:1], ids, generator)
        counts[picked] += 1
    assert counts[1] > 190 and counts[0] == counts[3] == 0  # the hardest negative; never a positive
    picked, valid = sample_hard_negatives(torch.zeros(2, 2), torch.tensor([4, 4]), torch.tensor([4, 4]), generator)
    assert not valid.any()  # every column is a positive: no negative for these rows


def _features(rank: int):
    g = torch.Generator().manual_seed(100 + rank)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    image = F.normalize(torch.randn(2, 8, generator=g), dim=-1)
    text_ids = torch.tensor([10 * rank, 10 * rank, 10 * rank + 1])  # two captions of one picture
    image_ids = torch.tensor([10 * rank, 10 * rank + 1])
    return text, image, text_ids, image_ids


def _gather_worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for rank0_weight in (1.0, 0.0):  # both losses; only rank 1's loss
            text, image, text_ids, image_ids = _features(rank)
            text.requires_grad_(True)
            image.requires_grad_(True)
            loss, t2i, i2t, all_ids = itc_loss(text, image, text_ids, image_ids, torch.tensor(0.07))
            (loss * (rank0_weight if rank == 0 else 1.0)).backward()
            torch.save({"loss": loss.detach(), "t2i": t2i.detach(), "i2t": i2t.detach(), "ids": all_ids,
                        "text_grad": text.grad, "image_grad": image.grad},
                       os.path.join(out_dir, f"rank{rank}-w{rank0_weight:g}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory) -> dict:
    """Two gloo ranks (torch.multiprocessing) run itc_loss; {rank0 weight: [rank 0 result, rank 1 result]}."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("itc")
    mp.spawn(_gather_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return {w: [torch.load(out / f"rank{r}-w{w:g}.pt") for r in range(2)] for w in (1.0, 0.0)}


def _reference(rank0_weight: float):
    """One process, both ranks' features: the same losses and the gradients of their (weighted) sum."""
    feats = [_features(r) for r in range(2)]
    texts = [f[0].clone().requires_grad_(True) for f in feats]
    images = [f[1].clone().requires_grad_(True) for f in feats]
    all_text, all_image = torch.cat(texts), torch.cat(images)
    all_text_ids = torch.cat([f[2] for f in feats])
    all_image_ids = torch.cat([f[3] for f in feats])
    losses, logits = [], []
    for r in range(2):
        t2i = texts[r] @ all_image.t() / 0.07
        i2t = images[r] @ all_text.t() / 0.07

        def soft_ce(lg, rows, cols):
            pos = (rows[:, None] == cols[None, :]).float()
            return -(pos / pos.sum(1, keepdim=True) * F.log_softmax(lg, 1)).sum(1).mean()

        losses.append((soft_ce(t2i, feats[r][2], all_image_ids) + soft_ce(i2t, feats[r][3], all_text_ids)) / 2)
        logits.append((t2i.detach(), i2t.detach()))
    (rank0_weight * losses[0] + losses[1]).backward()
    return losses, logits, texts, images


def test_itc_gathers_across_two_ranks_with_gradients(gathered):
    results = gathered[1.0]
    losses, logits, texts, images = _reference(1.0)
    for r in range(2):
        assert results[r]["t2i"].shape == (3, 4) and results[r]["i2t"].shape == (2, 6)  # local x all ranks
        torch.testing.assert_close(results[r]["t2i"], logits[r][0])
        torch.testing.assert_close(results[r]["i2t"], logits[r][1])
        torch.testing.assert_close(results[r]["loss"], losses[r].detach())
        assert results[r]["ids"].tolist() == [0, 1, 10, 11]
        # each rank's features get the gradient of BOTH ranks' losses
        torch.testing.assert_close(results[r]["text_grad"], texts[r].grad)
        torch.testing.assert_close(results[r]["image_grad"], images[r].grad)


def test_gradients_reach_the_other_ranks_features(gathered):
    results = gathered[0.0]  # only rank 1's loss counts
    _, _, texts, images = _reference(0.0)
    assert results[0]["text_grad"].abs().sum() > 0 and results[0]["image_grad"].abs().sum() > 0
    torch.testing.assert_close(results[0]["text_grad"], texts[0].grad)
    torch.testing.assert_close(results[0]["image_grad"], images[0].grad)
