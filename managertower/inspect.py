"""Parameters and forward multiply-adds of the tower for every manager kind (paper Table 6).

    python -m managertower.inspect --size base --image-size 384 --text-len 50 --json

The model is built on the meta device (no weights, no memory) and one image-text pair goes through it under
torch's FLOP counter. Counted as fvcore counts: one multiply-add = one FLOP, matrix products and
convolutions only (fvcore also counts normalisation layers, about 0.2% here). Parameters are those of the
tower without task heads.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import MANAGER_KINDS, ConfigError, load_config
from .model import ManagerTower

# Table 6 of the paper (base size, image 384, text 50): (params M, GFLOPs as fvcore counts).
PAPER_TABLE6 = {"bridgetower": (326.58, 101.25), "saue": (326.77, 101.34), "aaue": (326.77, 101.35),
                "aaue_fused": (338.64, 105.52)}


def count(manager: str, size: str = "base", image_size: int = 384, text_len: int = 50,
          overrides: list[str] | None = None) -> dict:
    cfg = load_config(None, [f"model.size={size}", f"model.manager={manager}", f"model.image_size={image_size}",
                             f"model.max_text_len={text_len}", *(overrides or [])]).model
    with torch.device("meta"):
        model = ManagerTower(cfg).eval()
        input_ids = torch.zeros(1, text_len, dtype=torch.long)
        mask = torch.ones(1, text_len, dtype=torch.long)
        pixels = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        # The text expert gets no mask: a full mask is a no-op, and transformers inspects mask values,
        # which meta tensors do not have.
        text = model.project_text(model.text_expert(input_ids, None))
        image = model.project_image(model.encode_image(pixels))
        model.fuse(text, mask, image)
    managers = sum(p.numel() for name, p in model.named_parameters() if "_managers." in name)
    return {"manager": manager, "params": sum(p.numel() for p in model.parameters()),
            "manager_params": managers, "gmacs": counter.get_total_flops() / 2 / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m managertower.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["base", "tiny"])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--text-len", type=int, default=50)
    parser.add_argument("--manager", action="append", choices=MANAGER_KINDS,
                        help="repeatable; default: every kind")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("overrides", nargs="*", help="model.key=value overrides")
    args = parser.parse_args(argv)
    try:
        rows = [count(kind, args.size, args.image_size, args.text_len, args.overrides)
                for kind in (args.manager or MANAGER_KINDS)]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'manager':<18}{'params (M)':>12}{'managers (M)':>14}{'GMACs':>10}{'paper params':>14}{'paper GFLOPs':>14}")
    for row in rows:
        paper = PAPER_TABLE6.get(row["manager"]) if args.size == "base" and args.image_size == 384 else None
        paper_text = f"{paper[0]:>14.2f}{paper[1]:>14.2f}" if paper else f"{'-':>14}{'-':>14}"
        print(f"{row['manager']:<18}{row['params'] / 1e6:>12.2f}{row['manager_params'] / 1e6:>14.2f}"
              f"{row['gmacs']:>10.2f}{paper_text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
