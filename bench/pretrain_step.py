"""Our pre-training step against the released recipe's: two full passes of transformers' BridgeTower.

    .venv/bin/python bench/pretrain_step.py                 # tiny and base, 4 rounds each
    .venv/bin/python bench/pretrain_step.py --sizes tiny --rounds 20

A step is forward + backward + AdamW, fp32 on the CPU, on one MLM + ITM batch (half the ITM pairs with
another sample's image):
  ours      PretrainTask.forward: the vision expert runs once and both objectives reuse its kept layers;
            the text expert and the fusion run twice (masked text for MLM, clean text for ITM); MLM decodes
            only the masked positions.
  released  BridgeTowerForMaskedLM on (masked text, images) with its MLM loss, then BridgeTower again on
            (clean text, ITM images) + Linear(2D, 2): the whole tower twice, as the released code does.
The two alternate round by round after a warm-up; medians are printed with their ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_step import SIZES, BridgeTowerStep, make_batch  # noqa: E402

from managertower.config import load_config  # noqa: E402
from managertower.data.collate import mlm_selection  # noqa: E402
from managertower.tasks.pretrain import PretrainTask  # noqa: E402


def pretrain_batch(size_name: str, vocab: int, seed: int = 0) -> dict:
    base = make_batch(SIZES[size_name], vocab, seed)
    batch = base["input_ids"].shape[0]
    generator = torch.Generator().manual_seed(seed + 1)
    clean = torch.where(base["labels"] >= 0, base["labels"], base["input_ids"])
    index = torch.arange(batch)
    negatives = torch.randperm(batch, generator=generator)[: batch // 2]
    index[negatives] = (negatives + 1) % batch
    positions, targets = mlm_selection(base["labels"])
    return {"pixel_values": base["pixel_values"], "attention_mask": base["attention_mask"],
            "mlm_input_ids": base["input_ids"], "mlm_labels": base["labels"], "mlm_positions": positions,
            "mlm_targets": targets, "input_ids": clean, "itm_image_index": index,
            "itm_labels": (index == torch.arange(batch)).long()}


class ReleasedStep(BridgeTowerStep):
    def loss(self, batch: dict) -> torch.Tensor:
        mlm = self.model(input_ids=batch["mlm_input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["mlm_labels"]).loss
        self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"][batch["itm_image_index"]])
        return mlm + F.cross_entropy(self.itm(self._pooled), batch["itm_labels"])


def step(loss_fn, optimizer, batch) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss_fn(batch).backward()
    optimizer.step()
    return (time.perf_counter() - start) * 1000


def bench(size_name: str, rounds: int, warmup: int) -> dict:
    size = SIZES[size_name]
    torch.manual_seed(0)
    cfg = load_config(None, [f"model.size={size_name}", f"model.image_size={size['image']}",
                             f"model.max_text_len={size['text_len']}", "model.layer_norm=torch"])
    ours = PretrainTask(cfg).train()
    released = ReleasedStep(size_name).train()
    batch = pretrain_batch(size_name, ours.model.text_expert.vocab_size)
    runs = {
        "ours": (lambda b: ours(b)["loss"], torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True), []),
        "released": (released.loss, torch.optim.AdamW(released.parameters(), lr=1e-5, fused=True), []),
    }
    for _ in range(warmup):
        for loss_fn, optimizer, _ in runs.values():
            step(loss_fn, optimizer, batch)
    for index in range(rounds):
        names = list(runs) if index % 2 == 0 else list(reversed(runs))
        for name in names:
            loss_fn, optimizer, times = runs[name]
            times.append(step(loss_fn, optimizer, batch))
        print(f"  [{size_name}] round {index + 1}/{rounds}: ours {runs['ours'][2][-1]:8.1f} ms   "
              f"released (2 passes) {runs['released'][2][-1]:8.1f} ms", flush=True)
    ours_ms, released_ms = (statistics.median(runs[k][2]) for k in ("ours", "released"))
    return {"size": size_name, "ours_ms": ours_ms, "released_ms": released_ms, "ratio": ours_ms / released_ms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [bench(s.strip(), args.rounds, args.warmup) for s in args.sizes.split(",") if s.strip()]
    print(f"\n{'size':<6}{'ours ms':>10}{'released ms':>13}{'ratio':>8}")
    for row in rows:
        print(f"{row['size']:<6}{row['ours_ms']:>10.1f}{row['released_ms']:>13.1f}{row['ratio']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
