"""Fine-tuning metrics against values computed by hand."""
from __future__ import annotations

import pytest
import torch

from managertower.tasks import metrics


def test_vqa_soft_scores_of_annotator_counts():
    assert [metrics.vqa_soft_score(c) for c in range(6)] == pytest.approx([0, 0.3, 0.6, 0.9, 1.0, 1.0])


def test_vqa_score_gives_partial_credit():
    answers = [{"yes": 1.0, "no": 0.3},          # predicted yes: 1.0
               {"2": 0.6, "two": 0.9},           # predicted 2: 0.6 (another spelling scored higher)
               {"blue": 1.0},                    # predicted red: 0
               {"circle": 0.3, "square": 1.0}]   # predicted circle: 0.3
    preds = ["yes", "2", "red", "circle"]
    assert metrics.vqa_score(preds, answers) == pytest.approx((1.0 + 0.6 + 0.0 + 0.3) / 4)
    assert metrics.vqa_score([], []) == 0.0


def test_vqa_majority_baseline_is_the_best_single_answer():
    answers = [{"yes": 1.0, "no": 0.3}, {"no": 1.0}, {"yes": 0.6}, {"2": 1.0}]
    # totals: yes 1.6, no 1.3, 2 1.0 -> "yes", 1.6 / 4
    assert metrics.vqa_majority_baseline(answers) == ("yes", pytest.approx(0.4))


def test_accuracy():
    assert metrics.accuracy(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 1, 0])) == 0.5


def test_recall_with_several_captions_per_image_both_directions():
    # 3 images; captions 0,1 -> image 0; caption 2 -> image 1; captions 3,4 -> image 2
    text_to_image = [0, 0, 1, 2, 2]
    # IR: each text's images, best first
    text_ranked = torch.tensor([[0, 1, 2],   # t0: right at rank 1
                                [1, 0, 2],   # t1: rank 2
                                [2, 0, 1],   # t2: rank 3
                                [2, 1, 0],   # t3: rank 1
                                [0, 1, 2]])  # t4: rank 3
    # TR: each image's texts, best first; a hit when ANY of its captions is in the top k
    image_ranked = torch.tensor([[2, 1, 0, 3, 4],   # image 0: caption 1 at rank 2
                                 [0, 1, 3, 4, 2],   # image 1: caption 2 at rank 5
                                 [4, 0, 1, 2, 3]])  # image 2: caption 4 at rank 1
    out = metrics.retrieval_recall(text_ranked, image_ranked, text_to_image, ks=(1, 2, 5))
    assert out["ir_r1"] == pytest.approx(2 / 5)       # t0, t3
    assert out["ir_r2"] == pytest.approx(3 / 5)       # + t1
    assert out["ir_r5"] == pytest.approx(5 / 5)
    assert out["tr_r1"] == pytest.approx(1 / 3)       # image 2
    assert out["tr_r2"] == pytest.approx(2 / 3)       # + image 0
    assert out["tr_r5"] == pytest.approx(3 / 3)
    assert out["rsum"] == pytest.approx(2 / 5 + 3 / 5 + 1 + 1 / 3 + 2 / 3 + 1)
    assert out["ir_mean"] == pytest.approx((2 / 5 + 3 / 5 + 1) / 3)


def test_recall_counts_a_miss_when_the_right_item_is_outside_the_candidates():
    out = metrics.retrieval_recall(torch.tensor([[1], [1]]), torch.tensor([[0], [0]]), [0, 1], ks=(1,))
    assert out["ir_r1"] == 0.5 and out["tr_r1"] == 0.5


def test_accuracy_is_the_exact_fraction():
    pred, labels = torch.zeros(300, dtype=torch.long), torch.zeros(300, dtype=torch.long)
    pred[:105] = 1
    assert metrics.accuracy(pred, labels) == 0.65  # float32's mean gives 0.6499999762


def test_headline_recalls_follow_task_retrieval_rank():
    itm, itc = {"ir_r1": 0.04, "tr_r1": 0.07}, {"itc_ir_r1": 0.10, "itc_tr_r1": 0.19}
    released = metrics.headline_recalls(itm, itc, "itm")
    assert released == {"ir_r1": 0.04, "tr_r1": 0.07, "itm_ir_r1": 0.04, "itm_tr_r1": 0.07, **itc}
    tiny = metrics.headline_recalls(itm, itc, "itc")
    assert (tiny["ir_r1"], tiny["tr_r1"], tiny["itm_ir_r1"], tiny["itc_ir_r1"]) == (0.10, 0.19, 0.04, 0.10)
