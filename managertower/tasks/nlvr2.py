"""NLVR2 (docs/recipe.md §3): 384 px, two images per statement, two passes, CE over 2 classes, accuracy.

The statement is encoded once, so in training one dropout mask of the text expert serves both fusions (the
released objectives.py `compute_nlvr2` runs its whole `infer` per image, text expert included: a choice listed
in the README); each image runs through the vision expert (one batched call for both) and is
projected with its own type row (1 left, 2 right: `tower.SECOND_IMAGE_TYPE`); the text is fused with each image
separately and the two `cls_feats` are concatenated -> ClassifierHead(4D, 2D, 2) (3072 -> 1536 -> 2), lr x10.
From a pre-trained checkpoint the unused type row 2 starts as a copy of the image row 1 (as the released
code expands its token-type embedding for NLVR2).
Predictions: RUN/predictions_nlvr2_{split}.csv, `identifier,prediction` with True/False (the leaderboard's form).
"""
from __future__ import annotations

import torch

from ..config import Config
from ..data.shards import PRIMARY_IMAGE, SECOND_IMAGE
from ..model import ClassifierHead, init_new_weights
from ..model.tower import IMAGE_TYPE, SECOND_IMAGE_TYPE
from .finetune import ClassificationTask


def _label(value) -> int:
    if isinstance(value, str):
        return int(value.strip().lower() == "true")
    return int(bool(value))


class NLVR2Task(ClassificationTask):
    name = "nlvr2"
    label_names = ("False", "True")
    id_key = "identifier"
    head_prefixes = checkpoint_heads = ("classifier.",)
    default_head_lr_mult = 10.0
    images = (PRIMARY_IMAGE, SECOND_IMAGE)

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        dim = cfg.model.hidden_size
        self.classifier = ClassifierHead(4 * dim, 2 * dim, 2)
        self.classifier.apply(init_new_weights)

    def expand(self, meta: dict, rng=None) -> list[dict]:
        return [{"text": s["sentence"], "label": _label(s.get("label", 0)), "identifier": s.get("identifier", "")}
                for s in meta.get("statements") or [] if s.get("sentence")]

    def load_tower_weights(self, state_dict: dict, source: str = "") -> list[str]:
        missing = super().load_tower_weights(state_dict, source)
        if "classifier" not in self.heads_from_checkpoint:  # an NLVR2 checkpoint's own row 2 is kept
            with torch.no_grad():
                types = self.model.type_embedding.weight
                types[SECOND_IMAGE_TYPE] = types[IMAGE_TYPE]
        return missing

    def logits(self, batch: dict) -> torch.Tensor:
        model = self.model
        mask = batch["attention_mask"]
        text = model.project_text(model.encode_text(batch["input_ids"], mask))
        pixels = torch.cat([batch["pixel_values"], batch["pixel_values_2"]]).to(self.dtype)
        left, right = model.encode_image(pixels).chunk(2)
        first = model.fuse(text, mask, model.project_image(left, IMAGE_TYPE))
        second = model.fuse(text, mask, model.project_image(right, SECOND_IMAGE_TYPE))
        return self.classifier(torch.cat([first.cls_feats, second.cls_feats], dim=-1)).float()

    def write_predictions(self, records: list[dict]):
        path = self.predictions_path("csv")
        with open(path, "w") as handle:
            handle.writelines(f"{r['identifier']},{bool(r['prediction'])}\n" for r in records)
        return path
