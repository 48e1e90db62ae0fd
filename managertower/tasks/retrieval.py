"""Image-text retrieval, Flickr30K and COCO (docs/recipe.md §3.3): ITC + ITM with hard negatives, ITM re-ranking.

The released code (LooperXX/ManagerTower, src/modules/objectives.py: `compute_itm_itc` for training,
`compute_irtr_itm_itc_recall` for inference) is the recipe followed here.

Training step (B captions, each with its own image view; several captions of one picture may share a batch):
  ITC  the raw uni-modal class features (text expert last layer token 0 = encode_text(...)[:, -1, 0]; vision
       `ln_post` class token of the last block = encode_image(...)[:, -1, 0]) -> ITCHead (Linear D -> 256 per
       modality, L2-normalised; temperature learnable from 0.07, clamped to [0.001, 0.5]). Both sides are
       all-gathered across ranks WITH gradients (`gather_with_grad`); each rank's texts score against every
       rank's images and vice versa. One image per caption, as the released code batches them: a picture with
       two captions in the batch is two columns. Targets spread uniformly over the positives (every image /
       caption of the same picture: the released `img_index` targets), so a second caption of the same image
       is not a negative.
  ITM  one hard negative image per text and one hard negative text per image, drawn from the ITC softmax with
       every positive (same picture) zeroed (`itm_pairs`); the B positives and 2B negatives (labels [1, 0, 0])
       go through the fusion and `itm_head` (Linear 2D -> 2). With task.retrieval_global_negatives (the
       default, the released recipe's gather_global_negative=True) the negatives come from the global batch:
       every rank's projected uni-modal layers and text masks are gathered (the layers with gradients, so a
       negative's gradient goes back to the rank that encoded it). Off: from this rank's micro-batch only,
       which saves gathering world x micro_batch x N layers x 577 tokens of image features per step and the
       all-reduce of their gradients.
  loss = ITC + ITM. When captions of one picture come with the same pixels (no per-example augmentation) the
  vision expert runs once for them (the same numbers as once per caption: it has no dropout).
Heads (itc_head, itm_head) and the rest of the new parts: lr x5 (Table 9). From a pre-trained checkpoint the
ITM head starts from the pre-training ITM head when the checkpoint has one (`itm_head.*`, as the released
code reuses its ITM classifier); the ITC head is new.

Inference (evaluate): every rank encodes its part of the test images (keeping their projected layers) and a
slice of the captions; the ITC embeddings are gathered, each text gets its top-k images and each image its
top-k captions by ITC (k = task.retrieval_topk: 128 Flickr30K, 256 COCO); each candidate pair's ITM logits are
computed on the rank that holds its image and summed across ranks. The ranking is the released one
(`metrics.itm_ranking`): a text x image score matrix, the ITM positive logit on each direction's candidates and
-100 elsewhere, the element-wise maximum of the two directions, ranked both ways. Reported: IR / TR
recall@1/5/10 after re-ranking (`ir_r1`, ...) and from ITC alone (`itc_ir_r1`, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dist
from ..config import Config
from ..data.augment import mix_seed
from ..model import ITCHead, ITMHead, init_new_weights
from . import metrics
from ..data.loader import Collator
from .finetune import FinetuneTask, TextCollator
from .losses import IGNORE, itc_loss, itm_pairs


def image_key(image_id) -> int:
    """A 63-bit integer id for any image id (ints, strings), so ids can travel in tensors."""
    return mix_seed(str(image_id))


class RetrievalCollator(TextCollator):
    """Texts, picture ids and, when the examples of a picture share its pixels (`shared_views`: no per-example
    augmentation), which rows the vision expert encodes (`view_rows`) and each row's encoded row (`view_of_row`);
    worked out here on the host, so the step reads nothing back from the device."""

    def __init__(self, tokenizer, max_len: int, shared_views: bool):
        super().__init__(tokenizer, max_len)
        self.shared_views = shared_views

    def __call__(self, examples: list[dict], images=None) -> dict:
        batch = super().__call__(examples, images)
        keys = [image_key(e["image_id"]) for e in examples]
        batch["image_ids"] = torch.tensor(keys, dtype=torch.long)
        if self.shared_views:
            first, inverse = _distinct_views(keys)
            if len(first) < len(keys):
                batch["view_rows"] = torch.tensor(first, dtype=torch.long)
                batch["view_of_row"] = torch.tensor(inverse, dtype=torch.long)
        return batch


class EvalImagesCollator(Collator):
    """Eval: one example per picture, its captions kept as lists."""

    def __call__(self, examples: list[dict], images=None) -> dict:
        return {"image_id": [e["image_id"] for e in examples], "captions": [e["captions"] for e in examples]}


class RetrievalTask(FinetuneTask):
    name = "retrieval"
    head_prefixes = ("itc_head.", "itm_head.")
    checkpoint_heads = ("itm_head.", "itc_head.")
    default_head_lr_mult = 5.0

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        dim = cfg.model.hidden_size
        self.itc_head = ITCHead(self.model.text_expert.hidden_size, self.model.vision_expert.hidden_size,
                                cfg.task.itc_dim)
        self.itm_head = ITMHead(dim)
        self.itc_head.text_proj.apply(init_new_weights)
        self.itc_head.image_proj.apply(init_new_weights)
        self.itm_head.apply(init_new_weights)

    # --- data ---------------------------------------------------------------------------------------------
    def expand(self, meta: dict, rng=None) -> list[dict]:
        return [{"text": c, "image_id": meta.get("image_id", meta.get("key"))}
                for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]

    def expand_eval(self, meta: dict, rng=None) -> list[dict]:
        captions = [c for c in meta.get("captions") or [] if isinstance(c, str) and c.strip()]
        return [{"image_id": meta.get("image_id", meta.get("key")), "captions": captions}] if captions else []

    def make_collator(self, train: bool):
        if train:
            return RetrievalCollator(self.tokenizer, self.cfg.model.max_text_len,
                                     shared_views=not self.cfg.task.augment)
        return EvalImagesCollator()

    # --- the objective --------------------------------------------------------------------------------------
    def itm_logits(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.itm_head(self.model.fuse(text, mask, image).cls_feats).float()

    def forward(self, batch: dict) -> dict:
        """ITC + ITM of one micro-batch; besides the losses, `itm_rows` = (text rows, image rows, labels, where
        this rank's examples start) of the ITM pairs in the rows the negatives were drawn from (the global
        batch in rank order, or this rank's micro-batch), to see where the hard negatives came from."""
        model = self.model
        ids, mask, image_ids = batch["input_ids"], batch["attention_mask"], batch["image_ids"]
        pixels = batch["pixel_values"]
        views, view_of_row = batch.get("view_rows", slice(None)), batch.get("view_of_row")
        text_layers = model.encode_text(ids, mask)
        image_layers = model.encode_image(pixels[views].to(self.dtype))
        text_emb, view_emb = self.itc_head(text_layers[:, -1, 0], image_layers[:, -1, 0])
        image_emb = view_emb if view_of_row is None else view_emb[view_of_row]  # one image per caption
        temperature = self.itc_head.temperature()
        loss_itc, t2i, i2t, all_image_ids = itc_loss(text_emb, image_emb, image_ids, image_ids, temperature)

        text = model.project_text(text_layers)
        image = model.project_image(image_layers)
        if view_of_row is not None:
            image = image[view_of_row]
        if self.cfg.task.retrieval_global_negatives:
            # Every rank's examples are candidate negatives (column c of t2i / i2t is row c of the pools).
            text_pool, mask_pool = dist.gather_with_grad(text), dist.gather_rows(mask)
            image_pool = dist.gather_with_grad(image)
            start = _rows_before_this_rank(ids.shape[0], ids.device)
            pool_ids, t2i_neg, i2t_neg = all_image_ids, t2i.detach(), i2t.detach()
        else:
            text_pool, mask_pool, image_pool, start = text, mask, image, 0
            t2i_neg = (text_emb @ image_emb.t()).detach() / temperature.detach()
            pool_ids, i2t_neg = image_ids, t2i_neg.t()
        text_rows, image_rows, labels = itm_pairs(t2i_neg, i2t_neg, image_ids, pool_ids, start)
        logits = self.itm_logits(text_pool[text_rows], mask_pool[text_rows], image_pool[image_rows])
        loss_itm = F.cross_entropy(logits, labels)
        with torch.no_grad():
            counted = labels != IGNORE  # the pairs of a row that had no negative are left out
            acc_itm = ((logits.argmax(-1) == labels) & counted).sum() / counted.sum()
            acc_itc = (all_image_ids[t2i.argmax(1)] == image_ids).float().mean()
        return {"loss": loss_itc + loss_itm, "loss_itc": loss_itc, "loss_itm": loss_itm, "acc_itm": acc_itm,
                "acc_itc": acc_itc, "temperature": temperature.detach(), "batch_size": ids.shape[0],
                "tokens": mask.sum(), "itm_rows": (text_rows, image_rows, labels, start)}

    # --- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_texts(self, texts: list[str], device, batch_size: int):
        """(ITC embeddings, projected text layers, masks) of `texts`, in chunks."""
        collator = TextCollator(self.tokenizer, self.cfg.model.max_text_len)
        embeddings, layers, masks = [], [], []
        for start in range(0, len(texts), batch_size):
            tokens = collator.tokenize(texts[start:start + batch_size])
            ids, mask = tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
            encoded = self.model.encode_text(ids, mask)
            embeddings.append(F.normalize(self.itc_head.text_proj(encoded[:, -1, 0]), dim=-1).float())
            layers.append(self.model.project_text(encoded))
            masks.append(mask)
        if not embeddings:
            dim = self.cfg.task.itc_dim
            return torch.zeros(0, dim, device=device), None, None
        return torch.cat(embeddings), torch.cat(layers), torch.cat(masks)

    @torch.no_grad()
    def evaluate(self, rank: int, world_size: int, device: torch.device) -> dict:
        if not self.cfg.task.eval_shards:
            return {}
        batch_size = self.cfg.train.micro_batch
        # 1. This rank's pictures: ITC embeddings and projected layers (kept for the ITM re-ranking).
        loader = self.build_loader("eval", rank, world_size, device)
        local_ids, local_captions, image_emb, image_layers = [], [], [], []
        try:
            for batch in loader:
                encoded = self.model.encode_image(batch["pixel_values"].to(device, self.dtype))
                image_emb.append(F.normalize(self.itc_head.image_proj(encoded[:, -1, 0]), dim=-1).float())
                image_layers.append(self.model.project_image(encoded))
                local_ids += batch["image_id"]
                local_captions += batch["captions"]
        finally:
            loader.close()
        dim = self.cfg.task.itc_dim
        image_emb = torch.cat(image_emb) if image_emb else torch.zeros(0, dim, device=device)
        # 2. The global picture list (rank order), its captions, and who holds which picture.
        pictures = dist.gather_objects([(rank, i, c) for i, c in zip(local_ids, local_captions)])
        owners = torch.tensor([p[0] for p in pictures])
        first_local = int((owners < rank).sum())
        texts, text_to_image = [], []
        for index, (_, _, captions) in enumerate(pictures):
            texts += captions
            text_to_image += [index] * len(captions)
        n_images, n_texts = len(pictures), len(texts)
        if n_images == 0:
            return {}
        all_image_emb = dist.gather_rows(image_emb)
        # 3. ITC embeddings of the captions, a slice per rank.
        lo, hi = n_texts * rank // world_size, n_texts * (rank + 1) // world_size
        text_emb, _, _ = self.encode_texts(texts[lo:hi], device, batch_size)
        all_text_emb = dist.gather_rows(text_emb)
        # 4. ITC top-k both ways (in chunks of queries).
        k_images = min(self.cfg.task.retrieval_topk, n_images)
        k_texts = min(self.cfg.task.retrieval_topk, n_texts)
        text_top = _topk_rows(all_text_emb, all_image_emb, k_images)  # n_texts x k_images
        image_top = _topk_rows(all_image_emb, all_text_emb, k_texts)  # n_images x k_texts
        text_top_cpu, image_top_cpu = text_top.cpu(), image_top.cpu()  # one read-back: the host loops below
        itc_metrics = metrics.retrieval_recall(text_top_cpu, image_top_cpu, text_to_image, prefix="itc_")
        # 5. ITM logits of the candidate pairs whose picture this rank holds; summed across ranks.
        ir_logits = torch.zeros(n_texts, k_images, 2, device=device)
        tr_logits = torch.zeros(n_images, k_texts, 2, device=device)
        mine = (owners == rank).tolist()
        pairs: dict[tuple[int, int], list] = {}
        for t, candidates in enumerate(text_top_cpu.tolist()):
            for g, image in enumerate(candidates):
                if mine[image]:
                    pairs.setdefault((t, image), []).append(("ir", t, g))
        for image, candidates in enumerate(image_top_cpu.tolist()):
            if mine[image]:
                for s, text in enumerate(candidates):
                    pairs.setdefault((text, image), []).append(("tr", image, s))
        ordered = sorted(pairs, key=lambda pair: (pair[1], pair[0]))
        chunk = max(128, 8 * batch_size)  # pairs per fusion call, sorted by picture: few distinct texts each
        local_layers = torch.cat(image_layers) if image_layers else None
        pair_logits = torch.zeros(len(ordered), 2, device=device)
        for start in range(0, len(ordered), chunk):
            part = ordered[start:start + chunk]
            unique_texts = sorted({t for t, _ in part})
            position = {t: i for i, t in enumerate(unique_texts)}
            _, layers, masks = self.encode_texts([texts[t] for t in unique_texts], device, batch_size)
            text_rows = torch.tensor([position[t] for t, _ in part], device=device)
            image_rows = torch.tensor([g - first_local for _, g in part], device=device)
            pair_logits[start:start + len(part)] = self.itm_logits(layers[text_rows], masks[text_rows],
                                                                   local_layers[image_rows])
        # Each pair's logits to its slot(s) in the text -> image and image -> text candidate lists.
        slots: dict[str, tuple[list, list, list]] = {"ir": ([], [], []), "tr": ([], [], [])}
        for index, pair in enumerate(ordered):
            for kind, row, slot in pairs[pair]:
                rows, columns, sources = slots[kind]
                rows.append(row)
                columns.append(slot)
                sources.append(index)
        for kind, target in (("ir", ir_logits), ("tr", tr_logits)):
            rows, columns, sources = (torch.tensor(v, dtype=torch.long, device=device) for v in slots[kind])
            target[rows, columns] = pair_logits[sources]
        if dist.is_distributed():
            torch.distributed.all_reduce(ir_logits)
            torch.distributed.all_reduce(tr_logits)
        text_ranked, image_ranked = metrics.itm_ranking(text_top, ir_logits, image_top, tr_logits)
        text_ranked, image_ranked = text_ranked.cpu(), image_ranked.cpu()
        itm_metrics = metrics.retrieval_recall(text_ranked, image_ranked, text_to_image)
        results = metrics.headline_recalls(itm_metrics, itc_metrics, self.cfg.task.retrieval_rank)
        results.update({"images": float(n_images), "texts": float(n_texts), "topk": float(k_images)})
        if dist.is_main():
            self._write_rankings(pictures, texts, text_ranked, image_ranked)
        return results

    def _write_rankings(self, pictures, texts, text_ranked, image_ranked) -> None:
        import json

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.predictions_path("json")
        image_ids = [p[1] for p in pictures]
        top = min(10, text_ranked.shape[1])
        with open(path, "w") as handle:
            json.dump({"text_to_image": [{"text": texts[t], "images": [image_ids[g] for g in text_ranked[t, :top].tolist()]}
                                         for t in range(len(texts))],
                       "image_to_text": [{"image_id": image_ids[g], "texts": image_ranked[g, :top].tolist()}
                                         for g in range(len(image_ids))]}, handle)


def _distinct_views(image_ids: list[int]) -> tuple[list[int], list[int]]:
    """(the first row of each picture, each row's index into those): captions of one picture that come with the
    same pixels share one vision run; with their own augmented views each caption's image is encoded, as the
    released code does."""
    seen: dict[int, int] = {}
    first, inverse = [], []
    for row, value in enumerate(image_ids):
        if value not in seen:
            seen[value] = len(first)
            first.append(row)
        inverse.append(seen[value])
    return first, inverse


def _rows_before_this_rank(rows: int, device: torch.device) -> int:
    """How many rows the ranks before this one contribute to a gather in rank order (0 without a group)."""
    if not dist.is_distributed():
        return 0
    counts = dist.gather_rows(torch.tensor([rows], device=device))
    return int(counts[: torch.distributed.get_rank()].sum())


def _topk_rows(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    out = []
    for start in range(0, queries.shape[0], chunk):
        out.append((queries[start:start + chunk] @ keys.t()).topk(k, dim=1).indices)
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long, device=keys.device)


class Flickr30KTask(RetrievalTask):
    name = "flickr30k"


class COCORetrievalTask(RetrievalTask):
    name = "coco"
