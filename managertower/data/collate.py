"""Pre-training examples and batches (docs/recipe.md §2): captions -> tokens, MLM masking, ITM pairs.

`expand_pretrain` turns one image sample's metadata into examples (one per caption: "the paper's 9M pairs",
or one random caption per image). `PretrainCollator` makes the text side of a batch; the loader adds the
images (`pixel_values`). Every random choice comes from a `torch.Generator` seeded by (seed, rank, batch
counter), and the counter is part of the loader's state, so a resumed run masks and pairs exactly as an
uninterrupted one.
"""
from __future__ import annotations

import random
from typing import Any

import torch

from .augment import mix_seed
from .loader import Collator


def expand_pretrain(meta: dict, rng: random.Random | None = None, per_caption: bool = True) -> list[dict]:
    """One example per caption (`per_caption`) or one caption drawn with `rng`; no captions -> no examples."""
    captions = [c for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
    if not captions:
        return []
    if not per_caption:
        rng = rng or random.Random(mix_seed(str(meta.get("key")), "caption"))
        captions = [captions[rng.randrange(len(captions))]]
    return [{"text": text, "image_id": meta.get("image_id"), "key": meta.get("key")} for text in captions]


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, *, mask_token_id: int,
                random_token_ids: torch.Tensor, mlm_probability: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick `mlm_probability` of the eligible tokens; 80% -> mask, 10% -> random, 10% kept.

    `special_mask` is True for special and padding tokens (never picked). `random_token_ids` are the ids a
    replaced token may take (the vocabulary without special tokens). Returns (masked ids, labels) with labels
    -100 everywhere except the picked positions, which hold the original ids.
    """
    eligible = ~special_mask
    draws = torch.rand(input_ids.shape, generator=generator)
    picked = (draws < mlm_probability) & eligible
    labels = torch.where(picked, input_ids, torch.full_like(input_ids, -100))
    split = torch.rand(input_ids.shape, generator=generator)
    to_mask = picked & (split < 0.8)
    to_random = picked & (split >= 0.8) & (split < 0.9)
    choice = torch.randint(len(random_token_ids), input_ids.shape, generator=generator)
    masked = input_ids.clone()
    masked[to_mask] = mask_token_id
    masked[to_random] = random_token_ids[choice[to_random]]
    return masked, labels


def mlm_selection(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The picked tokens' flat B x T positions and their ids, computed on the host so that the MLM head selects
    them on the device without a sync (a boolean mask's count has to come back from the GPU)."""
    positions = (labels.flatten() != -100).nonzero().flatten()
    return positions, labels.flatten()[positions]


def itm_pairs(image_ids: list[Any], negative_fraction: float,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each text, the batch index of the image to pair with, and the ITM label (1 match, 0 not).

    round(negative_fraction x B) texts get another sample's image whose image_id differs (never a second
    caption of the same picture); the rest keep their own. Texts without any other picture in the batch stay
    positive, so a batch of one picture's captions is all positive.
    """
    size = len(image_ids)
    index = torch.arange(size)
    labels = torch.ones(size, dtype=torch.long)
    wanted = int(round(negative_fraction * size))
    if wanted == 0 or size < 2:
        return index, labels
    keys = [repr(i) for i in image_ids]
    order = torch.randperm(size, generator=generator).tolist()
    made = 0
    for i in order:
        if made == wanted:
            break
        others = [j for j in range(size) if keys[j] != keys[i]]
        if not others:
            continue
        index[i] = others[int(torch.randint(len(others), (1,), generator=generator))]
        labels[i] = 0
        made += 1
    return index, labels


class PretrainCollator(Collator):
    """examples (+ images) -> {input_ids, attention_mask, mlm_input_ids, mlm_labels, mlm_positions, mlm_targets,
    itm_image_index, itm_labels, image_ids}.

    Shapes (B examples, T = max_text_len): input_ids / attention_mask / mlm_input_ids / mlm_labels B x T long;
    itm_image_index, itm_labels B long. `input_ids` is the unmasked text (ITM); `mlm_input_ids` the masked one.
    """

    def __init__(self, tokenizer, max_text_len: int, mlm_probability: float = 0.15,
                 itm_negative_fraction: float = 0.5, seed: int = 0, rank: int = 0):
        # max_text_len, mlm_probability and itm_negative_fraction were checked with the config
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no mask token; MLM needs one (<mask> or [MASK])")
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.mlm_probability = mlm_probability
        self.itm_negative_fraction = itm_negative_fraction
        self.seed = seed
        self.rank = rank
        self.batches = 0
        special = set(tokenizer.all_special_ids)
        self.random_token_ids = torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)

    def generator(self, batch_index: int) -> torch.Generator:
        return torch.Generator().manual_seed(mix_seed(self.seed, self.rank, batch_index, "collate"))

    def __call__(self, examples: list[dict], images: Any = None) -> dict:
        generator = self.generator(self.batches)
        self.batches += 1
        encoded = self.tokenizer([e["text"] for e in examples], padding="max_length", truncation=True,
                                 max_length=self.max_text_len, return_tensors="pt",
                                 return_special_tokens_mask=True)
        input_ids = encoded["input_ids"].long()
        attention_mask = encoded["attention_mask"].long()
        special = encoded["special_tokens_mask"].bool() | (attention_mask == 0)
        mlm_input_ids, mlm_labels = mask_tokens(
            input_ids, special, mask_token_id=self.tokenizer.mask_token_id, random_token_ids=self.random_token_ids,
            mlm_probability=self.mlm_probability, generator=generator)
        itm_image_index, itm_labels = itm_pairs([e.get("image_id", e.get("key")) for e in examples],
                                                self.itm_negative_fraction, generator)
        # 63-bit keys of the pictures, so objectives over the batch (ITC) can tell captions of one picture apart
        image_ids = torch.tensor([mix_seed(str(e.get("image_id", e.get("key")))) for e in examples], dtype=torch.long)
        mlm_positions, mlm_targets = mlm_selection(mlm_labels)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "mlm_input_ids": mlm_input_ids,
                "mlm_labels": mlm_labels, "mlm_positions": mlm_positions,
                "mlm_targets": mlm_targets, "itm_image_index": itm_image_index,
                "itm_labels": itm_labels, "image_ids": image_ids}

    def state_dict(self) -> dict:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.batches = int(state["batches"])
