"""SNLI-VE (docs/recipe.md §3): 384 px, text = the hypothesis only, classes contradiction 0, neutral 1, entailment 2,
CE, accuracy. Head ClassifierHead(2D, 4D, 3) (1536 -> 3072 -> 3), lr x10.
Predictions: RUN/predictions_snli_ve_{split}.csv, `pair_id,prediction,label` with the label names.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..model import ClassifierHead, init_new_weights
from .finetune import ClassificationTask

LABELS = ("contradiction", "neutral", "entailment")


def _label(value) -> int:
    if isinstance(value, str):
        return LABELS.index(value.strip().lower())
    return int(value)


class SNLIVETask(ClassificationTask):
    name = "snli_ve"
    label_names = LABELS
    id_key = "pair_id"
    head_prefixes = checkpoint_heads = ("classifier.",)
    default_head_lr_mult = 10.0

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        dim = cfg.model.hidden_size
        self.classifier = ClassifierHead(2 * dim, 4 * dim, len(LABELS))
        self.classifier.apply(init_new_weights)

    def expand(self, meta: dict, rng=None) -> list[dict]:
        return [{"text": h["text"], "label": _label(h["label"]), "pair_id": str(h.get("pair_id", ""))}
                for h in meta.get("hypotheses") or [] if h.get("text")]

    def logits(self, batch: dict) -> torch.Tensor:
        out = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"].to(self.dtype))
        return self.classifier(out.cls_feats).float()

    def write_predictions(self, records: list[dict]):
        path = self.predictions_path("csv")
        with open(path, "w") as handle:
            handle.write("pair_id,prediction,label\n")
            handle.writelines(f"{r['pair_id']},{LABELS[r['prediction']]},{LABELS[r['label']]}\n" for r in records)
        return path
