"""Pre-training collation: MLM masking statistics, ITM pairs, determinism (docs/recipe.md §2)."""
import random

import pytest
import torch

from managertower.config import ModelConfig
from managertower.data.collate import PretrainCollator, expand_pretrain, itm_pairs, mask_tokens
from managertower.model.experts import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(size="tiny"))


def _texts(count, seed=0):
    rng = random.Random(seed)
    words = ["a", "man", "riding", "horse", "on", "the", "beach", "two", "dogs", "play", "with", "red", "ball",
             "in", "park", "woman", "holding", "umbrella", "street", "city", "green", "tree", "next", "to"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(count)]


def test_expand_pretrain_per_caption_and_single():
    meta = {"key": "k1", "image_id": 7, "captions": ["one", "two", "three"]}
    examples = expand_pretrain(meta, per_caption=True)
    assert [e["text"] for e in examples] == ["one", "two", "three"]
    assert all(e["image_id"] == 7 for e in examples)
    picks = {expand_pretrain(meta, per_caption=False, rng=random.Random(s))[0]["text"] for s in range(40)}
    assert picks == {"one", "two", "three"}  # one caption per image, drawn by the rng
    assert expand_pretrain({"key": "k2", "image_id": 1, "captions": []}, per_caption=True) == []


def test_mlm_masking_statistics(tokenizer):
    collator = PretrainCollator(tokenizer, max_text_len=24, mlm_probability=0.15, seed=3)
    examples = [{"text": t, "image_id": i} for i, t in enumerate(_texts(2000))]
    batch = collator(examples)
    ids, masked, labels, attention = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"], batch["attention_mask"]
    assert ids.shape == masked.shape == labels.shape == attention.shape == (2000, 24)
    special_ids = torch.tensor(tokenizer.all_special_ids)
    special = torch.isin(ids, special_ids) | (attention == 0)
    eligible = ~special
    picked = labels != -100
    assert not (picked & special).any(), "special or padding tokens were masked"
    assert torch.equal(labels[picked], ids[picked]), "labels must hold the original ids"
    assert torch.equal(masked[~picked], ids[~picked]), "only picked tokens may change"
    rate = picked.sum().item() / eligible.sum().item()
    assert abs(rate - 0.15) < 0.01, rate
    n = picked.sum().item()
    to_mask = (masked == tokenizer.mask_token_id) & picked
    changed = (masked != ids) & picked & ~to_mask
    kept = (masked == ids) & picked
    assert abs(to_mask.sum().item() / n - 0.8) < 0.02
    # a random replacement may draw the original id itself (1/vocab): it then counts as kept
    assert abs(changed.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert not torch.isin(masked[changed], special_ids).any(), "random replacements must not be special tokens"
    # padding and truncation: unmasked text padded to max_text_len
    assert (attention.sum(1) <= 24).all() and (ids[attention == 0] == tokenizer.pad_token_id).all()


def test_mask_tokens_never_touches_specials():
    ids = torch.arange(40).repeat(50, 1)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, :5] = True
    masked, labels = mask_tokens(ids, special, mask_token_id=99, random_token_ids=torch.arange(5, 40),
                                 mlm_probability=0.5, generator=torch.Generator().manual_seed(0))
    assert (labels[:, :5] == -100).all() and torch.equal(masked[:, :5], ids[:, :5])


@pytest.mark.parametrize("fraction", [0.5, 0.25, 1.0, 0.0])
def test_itm_pairs_exact_fraction_and_distinct_images(fraction):
    image_ids = [i // 5 for i in range(40)]  # five captions per image, as with COCO per-caption iteration
    for seed in range(20):
        index, labels = itm_pairs(image_ids, fraction, torch.Generator().manual_seed(seed))
        negatives = labels == 0
        assert negatives.sum().item() == round(fraction * 40)
        for i in range(40):
            if labels[i] == 1:
                assert index[i] == i
            else:
                assert image_ids[index[i]] != image_ids[i]


def test_itm_single_picture_batch_stays_positive():
    index, labels = itm_pairs(["same"] * 6, 0.5, torch.Generator().manual_seed(0))
    assert labels.tolist() == [1] * 6 and index.tolist() == list(range(6))


def test_collator_deterministic_by_seed_rank_and_counter(tokenizer):
    examples = [{"text": t, "image_id": i % 4} for i, t in enumerate(_texts(16, seed=1))]
    a = PretrainCollator(tokenizer, 24, seed=5, rank=1)
    first, second = a(examples), a(examples)
    assert not torch.equal(first["mlm_input_ids"], second["mlm_input_ids"])  # the counter moves on
    b = PretrainCollator(tokenizer, 24, seed=5, rank=1)
    b.load_state_dict({"batches": 1})
    again = b(examples)
    for key in second:
        assert torch.equal(second[key], again[key]), key
    other_rank = PretrainCollator(tokenizer, 24, seed=5, rank=2)(examples)
    assert not torch.equal(first["mlm_input_ids"], other_rank["mlm_input_ids"])
    assert a.state_dict() == {"batches": 2}
    assert first["itm_labels"].sum().item() == 8 and first["itm_image_index"].dtype == torch.long


def test_mlm_positions_pick_the_labelled_tokens_on_the_host(tokenizer):
    """The collator hands the MLM head the picked tokens' flat B x T positions and ids (computed here, on the CPU),
    so the device never sizes a boolean mask: the head's index_select gives the rows the boolean mask picks."""
    from managertower.model import MLMHead

    batch = PretrainCollator(tokenizer, 24, seed=3)([{"text": t, "image_id": i} for i, t in enumerate(_texts(8))])
    labels, positions, targets = batch["mlm_labels"], batch["mlm_positions"], batch["mlm_targets"]
    picked = labels != -100
    assert positions.dtype == torch.long and positions.dim() == 1 and len(positions) == int(picked.sum()) > 0
    assert torch.equal(labels.flatten()[positions], targets) and torch.equal(targets, labels[picked])
    torch.manual_seed(0)
    head = MLMHead(16, 50)
    hidden = torch.randn(*labels.shape, 16)
    by_positions, _ = head(hidden, positions=positions)
    by_mask, mask_labels = head(hidden, labels)
    assert torch.equal(by_positions, by_mask) and torch.equal(mask_labels, targets)
