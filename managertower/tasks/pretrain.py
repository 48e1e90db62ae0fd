"""Pre-training: MLM + ITM, loss = their plain sum (the paper, App. A.1; docs/recipe.md §2).

One vision pass per step: MLM and ITM use the same images (ITM's negatives are other images of the batch),
so the vision expert and the image projection run once and both objectives reuse its kept layers; the text
expert and the fusion run twice (masked text for MLM, clean text for ITM). Each fusion's last layer computes
only what its loss reads: the text stream for MLM, the first tokens the poolers read for ITM (`ManagerTower.fuse`
outputs). `forward_two_pass` is the naive step of the released code (the whole tower twice) and gives the same
losses.
"""
from __future__ import annotations

import random
from functools import partial

import torch
import torch.nn.functional as F

from .. import dist
from ..config import Config
from ..data.collate import PretrainCollator, expand_pretrain
from ..data.loader import Collator
from ..data.shards import resolve_datasets
from ..model import ITCHead, ITMHead, MLMHead, init_new_weights, load_tokenizer
from .base import Task, TaskData
from .losses import itc_loss, masked_cross_entropy

HARD_NEGATIVE_ATTRIBUTES = ("colour", "shape", "size", "position")


class CaptionsCollator(Collator):
    """Held-out ITM: the captions and picture ids as they are (the evaluation tokenizes its own variants)."""

    def __call__(self, examples: list[dict], images=None) -> dict:
        return {"captions": [e["text"] for e in examples], "image_ids": [e["image_id"] for e in examples]}


class PretrainTask(Task):
    name = "pretrain"
    checkpoint_heads = ("mlm_head.", "itm_head.", "itc_head.")  # continuing from converted or earlier weights

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        dim = cfg.model.hidden_size
        self.mlm_head = MLMHead(dim, self.model.text_expert.vocab_size)
        self.itm_head = ITMHead(dim)
        self.mlm_head.apply(init_new_weights)
        self.itm_head.apply(init_new_weights)
        self.itc_head = None
        if cfg.task.itc_weight > 0:  # not the paper's recipe: see TaskConfig.itc_weight
            self.itc_head = ITCHead(self.model.text_expert.hidden_size, self.model.vision_expert.hidden_size,
                                    cfg.task.itc_dim)
            self.itc_head.text_proj.apply(init_new_weights)
            self.itc_head.image_proj.apply(init_new_weights)
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg.model)
        return self._tokenizer

    # --- the objective ------------------------------------------------------------------------------------
    def _losses(self, mlm_out, itm_out, batch) -> dict:
        logits, _ = self.mlm_head(mlm_out.text, positions=batch["mlm_positions"])
        labels = batch["mlm_targets"]
        loss_mlm = masked_cross_entropy(logits, labels)
        itm_logits = self.itm_head(itm_out.cls_feats)
        loss_itm = F.cross_entropy(itm_logits.float(), batch["itm_labels"])
        with torch.no_grad():
            acc_mlm = (logits.argmax(-1) == labels).float().mean() if labels.numel() else loss_mlm.new_zeros(())
            acc_itm = (itm_logits.argmax(-1) == batch["itm_labels"]).float().mean()
        return {"loss": loss_mlm + loss_itm, "loss_mlm": loss_mlm, "loss_itm": loss_itm, "acc_mlm": acc_mlm,
                "acc_itm": acc_itm, "batch_size": batch["input_ids"].shape[0],
                "tokens": batch["attention_mask"].sum()}

    def forward(self, batch: dict) -> dict:
        model = self.model
        mask = batch["attention_mask"]
        image_layers = model.encode_image(batch["pixel_values"].to(self.dtype))
        image = model.project_image(image_layers)
        mlm_out = model.fuse(model.project_text(model.encode_text(batch["mlm_input_ids"], mask)), mask, image,
                             outputs="text")
        text_layers = model.encode_text(batch["input_ids"], mask)
        itm_image = image.index_select(0, batch["itm_image_index"])  # backward: index_add, not an accumulating index_put
        itm_out = model.fuse(model.project_text(text_layers), mask, itm_image, outputs="cls")
        out = self._losses(mlm_out, itm_out, batch)
        if self.itc_head is not None:
            out.update(self._itc(text_layers, image_layers, batch["image_ids"]))
            out["loss"] = out["loss"] + self.cfg.task.itc_weight * out["loss_itc"]
        return out

    def _itc(self, text_layers: torch.Tensor, image_layers: torch.Tensor, image_ids: torch.Tensor) -> dict:
        """Contrastive loss of the raw uni-modal class features over the global batch (optional, see config)."""
        text_emb, image_emb = self.itc_head(text_layers[:, -1, 0], image_layers[:, -1, 0])
        loss_itc, t2i, _, all_ids = itc_loss(text_emb, image_emb, image_ids, image_ids, self.itc_head.temperature())
        with torch.no_grad():
            acc_itc = (all_ids[t2i.argmax(1)] == image_ids).float().mean()
        return {"loss_itc": loss_itc, "acc_itc": acc_itc}

    def forward_two_pass(self, batch: dict) -> dict:
        """The released code's step: each objective runs the whole tower on its own images."""
        model = self.model
        mask = batch["attention_mask"]
        pixels = batch["pixel_values"].to(self.dtype)
        mlm_out = model(batch["mlm_input_ids"], mask, pixels)
        itm_out = model(batch["input_ids"], mask, pixels[batch["itm_image_index"]])
        return self._losses(mlm_out, itm_out, batch)

    # --- data -----------------------------------------------------------------------------------------------
    def data(self, split: str, rank: int) -> TaskData:
        """Training: data.train_shards, one dataset per entry, mixed by data.weights, MLM + ITM batches (one
        example per caption with data.per_caption). Evaluation: data.val_shards, one caption per held-out image."""
        data, task = self.cfg.data, self.cfg.task
        if split == "train":
            collator = PretrainCollator(self.tokenizer, self.cfg.model.max_text_len, task.mlm_probability,
                                        task.itm_negative_fraction, seed=self.cfg.train.seed, rank=rank)
            return TaskData(shards=resolve_datasets(data.train_shards, "data.train_shards"),
                            weights=data.weights or None, collate=collator,
                            expand=partial(expand_pretrain, per_caption=data.per_caption))
        return TaskData(shards=resolve_datasets(data.val_shards, "data.val_shards"), collate=CaptionsCollator(),
                        expand=partial(expand_pretrain, per_caption=False))

    # --- held-out ITM, with random and one-attribute hard negatives ---------------------------------------
    def evaluate(self, rank: int, world_size: int, device: torch.device) -> dict:
        if not self.cfg.data.val_shards:
            return {}
        # One caption per held-out image, in order: every rank sees its own part, the same one every time.
        loader = self.build_loader("eval", rank, world_size, device)
        counts = torch.zeros(6, dtype=torch.float64)  # pos right, pos n, rand right, rand n, hard right, hard n
        rng = random.Random(1234 + rank)
        try:
            for index, batch in enumerate(loader):
                if index >= self.cfg.train.eval_batches:
                    break
                for i, (right, total) in enumerate(self.itm_eval_batch(batch, device, rng)):
                    counts[2 * i] += right
                    counts[2 * i + 1] += total
        finally:
            loader.close()
        counts = dist.all_reduce_sum(counts)
        pos, rand, hard = (counts[2 * i] / counts[2 * i + 1].clamp(min=1) for i in range(3))
        metrics = {"acc_itm": float((pos + rand) / 2), "acc_itm_pos": float(pos), "acc_itm_random_neg": float(rand)}
        if counts[5] > 0:
            metrics["acc_itm_hard"] = float((pos + hard) / 2)
            metrics["acc_itm_hard_neg"] = float(hard)
        return metrics

    @torch.no_grad()
    def itm_eval_batch(self, batch: dict, device, rng: random.Random):
        """ITM decisions on positives, random-image negatives and (task.hard_negative_eval, synthetic captions
        only) one-attribute hard-negative captions."""
        captions, image_ids = batch["captions"], batch["image_ids"]
        pixels = batch["pixel_values"].to(device, self.dtype)
        size = len(captions)
        order = list(range(size))
        negatives = []
        for i in range(size):
            others = [j for j in order if image_ids[j] != image_ids[i]]
            negatives.append(rng.choice(others) if others else None)
        hard_captions = (self._hard_negative_captions(captions, rng) if self.cfg.task.hard_negative_eval
                         else [None] * size)
        image = self.model.project_image(self.model.encode_image(pixels))

        def matches(texts, image_index) -> torch.Tensor:
            tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.model.max_text_len,
                                    return_tensors="pt").to(device)
            text = self.model.project_text(self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]))
            out = self.model.fuse(text, tokens["attention_mask"], image[torch.tensor(image_index, device=device)])
            return self.itm_head(out.cls_feats).argmax(-1) == 1

        results = [(int(matches(captions, order).sum()), size)]
        neg_rows = [i for i in order if negatives[i] is not None]
        right = int((~matches([captions[i] for i in neg_rows], [negatives[i] for i in neg_rows])).sum()) if neg_rows else 0
        results.append((right, len(neg_rows)))
        hard_rows = [i for i in order if hard_captions[i] is not None]
        right = int((~matches([hard_captions[i] for i in hard_rows], hard_rows)).sum()) if hard_rows else 0
        results.append((right, len(hard_rows)))
        return results

    @staticmethod
    def _hard_negative_captions(captions: list[str], rng: random.Random) -> list[str | None]:
        """Each caption with one attribute word swapped (None where it names none): the synthetic world's
        captions only, which is why task.hard_negative_eval is off outside the demo recipe."""
        from ..data.synthetic import hard_negative_caption

        hard_captions = []
        for caption in captions:
            attributes = list(HARD_NEGATIVE_ATTRIBUTES)
            rng.shuffle(attributes)
            swapped = None
            for attribute in attributes:
                try:
                    swapped = hard_negative_caption(caption, attribute, rng)
                    break
                except ValueError:  # the caption names no word of this attribute
                    continue
            hard_captions.append(swapped)
        return hard_captions

    def train_flops_per_sample(self) -> float | None:
        """Forward+backward FLOPs of one pre-training sample (3 x the forward: the vision expert once, the text
        expert and fusion for MLM and ITM), counted on the meta device (a local expert's weights are not read)."""
        from ..inspect import forward_flops

        return 3.0 * forward_flops(self.cfg.model, fusions=2)[1]
