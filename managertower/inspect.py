"""Parameters and forward multiply-adds of the tower for every manager kind (paper Table 6).

    rows = [count(kind, "base", 384, 50) for kind in MANAGER_KINDS]
    print(format_table(rows, paper_setting=True))

`mt-inspect` (doors/inspect.py) is the command line for it.

The model is built on the meta device (no weights, no memory) and one image-text pair goes through it under
torch's FLOP counter. Counted as fvcore counts: one multiply-add = one FLOP, matrix products and
convolutions only (fvcore also counts normalisation layers, about 0.2% here). Parameters are those of the
tower without task heads.
"""
from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, load_config
from .model import ManagerTower

# Table 6 of the paper (base size, image 384, text 50): (params M, GFLOPs as fvcore counts).
PAPER_TABLE6 = {"bridgetower": (326.58, 101.25), "saue": (326.77, 101.34), "aaue": (326.77, 101.35),
                "aaue_fused": (338.64, 105.52)}


def architecture_only(cfg: ModelConfig) -> ModelConfig:
    """The same tower with no weights to load: a local text expert's architecture read from its config.json, the
    vision expert from open_clip's config of its name. transformers and open_clip refuse to load weights on the
    meta device, where FLOPs are counted."""
    if cfg.text_expert is None and cfg.vision_checkpoint is None:
        return cfg
    text_config = dict(cfg.text_config)
    if cfg.text_expert is not None:
        from transformers import AutoConfig

        text_config = {**AutoConfig.from_pretrained(cfg.text_expert).to_dict(), **text_config}
    return dataclasses.replace(cfg, text_expert=None, tokenizer=None, vision_checkpoint=None, text_config=text_config)


def forward_flops(cfg: ModelConfig, fusions: int = 1) -> tuple[ManagerTower, float]:
    """(the tower on the meta device, FLOPs of one image-text sample's forward): the vision expert once, the text
    expert and the fusion `fusions` times (pre-training's MLM and ITM passes share the image)."""
    with torch.device("meta"):
        model = ManagerTower(architecture_only(cfg)).eval()
        input_ids = torch.zeros(1, cfg.max_text_len, dtype=torch.long)
        mask = torch.ones(1, cfg.max_text_len, dtype=torch.long)
        pixels = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        image = model.project_image(model.encode_image(pixels))
        for _ in range(fusions):
            # The text expert gets no mask: a full mask is a no-op, and transformers inspects mask values,
            # which meta tensors do not have.
            model.fuse(model.project_text(model.text_expert(input_ids, None)), mask, image)
    return model, float(counter.get_total_flops())


def count(manager: str, size: str = "base", image_size: int = 384, text_len: int = 50,
          overrides: list[str] | None = None) -> dict:
    cfg = load_config(None, [f"model.size={size}", f"model.manager={manager}", f"model.image_size={image_size}",
                             f"model.max_text_len={text_len}", *(overrides or [])]).model
    model, flops = forward_flops(cfg)
    managers = sum(p.numel() for name, p in model.named_parameters() if "_managers." in name)
    return {"manager": manager, "params": sum(p.numel() for p in model.parameters()),
            "manager_params": managers, "gmacs": flops / 2 / 1e9}


def format_table(rows: list[dict], paper_setting: bool) -> str:
    """`count` rows as a table; with `paper_setting` (base size at image 384) beside Table 6's values."""
    lines = [f"{'manager':<18}{'params (M)':>12}{'managers (M)':>14}{'GMACs':>10}{'paper params':>14}"
             f"{'paper GFLOPs':>14}"]
    for row in rows:
        paper = PAPER_TABLE6.get(row["manager"]) if paper_setting else None
        paper_text = f"{paper[0]:>14.2f}{paper[1]:>14.2f}" if paper else f"{'-':>14}{'-':>14}"
        lines.append(f"{row['manager']:<18}{row['params'] / 1e6:>12.2f}{row['manager_params'] / 1e6:>14.2f}"
                     f"{row['gmacs']:>10.2f}{paper_text}")
    return "\n".join(lines)
