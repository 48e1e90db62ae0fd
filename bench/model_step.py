"""One pre-training step of ManagerTower against Hugging Face's BridgeTower, same sizes, same batch, same run.

    .venv/bin/python bench/model_step.py                      # tiny and base, 5 rounds (~5 minutes on 2 cores)
    .venv/bin/python bench/model_step.py --sizes tiny --rounds 20
    .venv/bin/python bench/model_step.py --sizes base --profile   # + torch.profiler top ops of ManagerTower
    .venv/bin/python bench/model_step.py --precision both         # fp32, then both under bf16 autocast

A step is forward + backward + AdamW step on the CPU, training mode (dropout on), fp32 or (--precision bf16) under
torch.autocast("cpu", dtype=torch.bfloat16) for both models (bf16 matrix products, fp32 weights and AdamW; our
managers' softmax and the losses stay fp32 as in bf16 training). With both precisions the table adds
ManagerTower bf16 / BridgeTower fp32: our step on a bf16-capable CPU against BridgeTower's default fp32 step.
  ManagerTower  aaue_fused; MLM loss on the 15% masked text tokens (our MLMHead decodes only those) +
                ITM loss from ITMHead(cls_feats), both from one forward of the tower.
  BridgeTower   transformers.BridgeTowerForMaskedLM(labels=...) (its own MLM loss, which decodes every text
                position) + Linear(2D, 2) on the pooled output captured from the same forward.
Both are built from random weights at the same widths/depths (no hub access). The two models alternate
round by round after a warm-up so that machine noise hits both alike; the figures are medians.

Sizes
  tiny  the project's tiny config: BERT 4 x 64 (vocab 274), ViT 4 x 64 patch 8, image 64, text 24,
        2 cross-modal layers of 64 (2 heads, FFN 128), N = 2; batch 8.
  base  RoBERTa-base text, ViT-B/16 vision, 6 cross-modal layers of 768, image 288, text 50; batch 2.
BridgeTower has ~4% fewer FLOPs than ManagerTower (fused-query managers); the target is a ManagerTower step at
most BridgeTower's time like for like (fp32 and bf16), and a bf16 step at most 0.6x BridgeTower's fp32 one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from managertower.config import load_config  # noqa: E402
from managertower.model import ITMHead, ManagerTower, MLMHead  # noqa: E402

SIZES = {
    # batch, text_len, image_size, text (layers, width, heads, ffn, vocab, max_pos), vision (layers, width, patch),
    # cross (layers, width, heads, ffn)
    "tiny": dict(batch=8, text_len=24, image=64, text=(4, 64, 2, 128, 274, 64), vision=(4, 64, 8),
                 cross=(2, 64, 2, 128)),
    "base": dict(batch=2, text_len=50, image=288, text=(12, 768, 12, 3072, 50265, 514), vision=(12, 768, 16),
                 cross=(6, 768, 12, 3072)),
}


def make_batch(size: dict, vocab: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    batch, length = size["batch"], size["text_len"]
    input_ids = torch.randint(5, vocab, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length * 3 // 4:] = 0  # one padded caption
    masked = (torch.rand(batch, length, generator=gen) < 0.15) & attention_mask.bool()
    masked[:, 1] = True  # at least one masked token per caption
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, -100))
    input_ids = input_ids.masked_fill(masked, 4)
    pixels = torch.randn(batch, 3, size["image"], size["image"], generator=gen)
    itm_labels = torch.randint(0, 2, (batch,), generator=gen)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, pixel_values=pixels,
                itm_labels=itm_labels)


class ManagerTowerStep(nn.Module):
    name = "ManagerTower"

    def __init__(self, size_name: str):
        super().__init__()
        size = SIZES[size_name]
        cfg = load_config(None, [f"model.size={size_name}", "model.manager=aaue_fused",
                                 f"model.image_size={size['image']}", f"model.max_text_len={size['text_len']}",
                                 "model.layer_norm=torch"]).model
        self.tower = ManagerTower(cfg)
        dim = cfg.hidden_size
        self.mlm = MLMHead(dim, self.tower.text_expert.vocab_size)
        self.itm = ITMHead(dim)
        self.vocab = self.tower.text_expert.vocab_size

    def loss(self, batch: dict) -> torch.Tensor:
        out = self.tower(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        logits, labels = self.mlm(out.text, batch["labels"])
        return F.cross_entropy(logits, labels) + F.cross_entropy(self.itm(out.cls_feats), batch["itm_labels"])


class BridgeTowerStep(nn.Module):
    name = "BridgeTower"

    def __init__(self, size_name: str):
        super().__init__()
        from transformers import BridgeTowerConfig, BridgeTowerForMaskedLM

        size = SIZES[size_name]
        t_layers, t_width, t_heads, t_ffn, vocab, max_pos = size["text"]
        v_layers, v_width, patch = size["vision"]
        c_layers, c_width, c_heads, c_ffn = size["cross"]
        config = BridgeTowerConfig(
            text_config=dict(vocab_size=vocab, hidden_size=t_width, num_hidden_layers=t_layers,
                             num_attention_heads=t_heads, intermediate_size=t_ffn, max_position_embeddings=max_pos),
            vision_config=dict(hidden_size=v_width, num_hidden_layers=v_layers, patch_size=patch,
                               image_size=size["image"]),
            hidden_size=c_width, num_hidden_layers=c_layers, num_attention_heads=c_heads)
        # BridgeTower's cross-modal layers are built from text_config: at base both are 768/12/3072; at tiny
        # they are 64/2/128, the same as the tiny tower's.
        assert (t_width, t_heads, t_ffn) == (c_width, c_heads, c_ffn)
        self.model = BridgeTowerForMaskedLM(config)
        self.itm = nn.Linear(2 * c_width, 2)
        self.vocab = vocab
        self._pooled = None
        self.model.bridgetower.register_forward_hook(self._keep_pooled)

    def _keep_pooled(self, module, args, output):
        self._pooled = output.pooler_output

    def loss(self, batch: dict) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         pixel_values=batch["pixel_values"], labels=batch["labels"])
        return out.loss + F.cross_entropy(self.itm(self._pooled), batch["itm_labels"])


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict, bf16: bool = False) -> list[float]:
    """One step; returns the wall times (ms) of forward, backward and the optimizer step."""
    marks = [time.perf_counter()]
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(batch)
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    return [(b - a) * 1000 for a, b in zip(marks, marks[1:])]


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    extra = {"fused": dict(fused=True), "foreach": dict(foreach=True), "loop": dict(foreach=False)}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, **extra)


def bench_size(size_name: str, rounds: int, warmup: int, optimizer_kind: str, profile: bool,
               precision: str = "fp32") -> dict:
    bf16 = precision == "bf16"
    torch.manual_seed(0)
    models = [ManagerTowerStep(size_name).train(), BridgeTowerStep(size_name).train()]
    optimizers = [make_optimizer(m, optimizer_kind) for m in models]
    batch = make_batch(SIZES[size_name], models[0].vocab)
    params = [sum(p.numel() for p in m.parameters()) for m in models]
    for _ in range(warmup):
        for model, optimizer in zip(models, optimizers):
            train_step(model, optimizer, batch, bf16)
    phases = [[], []]  # per model: one [forward, backward, optimizer] per round
    for round_index in range(rounds):
        order = (0, 1) if round_index % 2 == 0 else (1, 0)
        for i in order:
            phases[i].append(train_step(models[i], optimizers[i], batch, bf16))
        print(f"  [{size_name} {precision}] round {round_index + 1}/{rounds}: ManagerTower {sum(phases[0][-1]):8.1f} ms   "
              f"BridgeTower {sum(phases[1][-1]):8.1f} ms", flush=True)
    if profile:
        from torch.profiler import ProfilerActivity, profile as torch_profile

        for model, optimizer in zip(models, optimizers):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                train_step(model, optimizer, batch, bf16)
            print(f"\n== {model.name} ({size_name}, {precision}) top ops by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    row = dict(size=size_name, precision=precision, mt_params=params[0], bt_params=params[1])
    for key, runs in (("mt", phases[0]), ("bt", phases[1])):
        row[f"{key}_ms"] = statistics.median(sum(r) for r in runs)
        for j, phase in enumerate(("fwd", "bwd", "opt")):
            row[f"{key}_{phase}"] = statistics.median(r[j] for r in runs)
    row["ratio"] = row["mt_ms"] / row["bt_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,base", help="comma-separated: tiny, base")
    parser.add_argument("--rounds", type=int, default=5, help="timed alternating rounds per size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "loop"],
                        help="torch AdamW implementation, the same for both models (default: fused)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables after timing")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"],
                        help="fp32, bf16 autocast for both models, or both one after the other (default: fp32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"unknown size {s!r}: use {', '.join(SIZES)}")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, {' and '.join(precisions)}; "
          f"step = forward + backward + AdamW ({args.optimizer}); medians of {args.rounds} alternating rounds")
    rows = [bench_size(s, args.rounds, args.warmup, args.optimizer, args.profile, p) for s in sizes for p in precisions]
    print(f"\n{'size':<6}{'prec':<6}{'model':<14}{'step ms':>9}{'fwd':>9}{'bwd':>9}{'AdamW':>9}{'params':>10}")
    for row in rows:
        head = f"{row['size']:<6}{row['precision']:<6}"
        for key, name in (("mt", "ManagerTower"), ("bt", "BridgeTower")):
            print(f"{head}{name:<14}{row[key + '_ms']:>9.1f}{row[key + '_fwd']:>9.1f}"
                  f"{row[key + '_bwd']:>9.1f}{row[key + '_opt']:>9.1f}{row[key + '_params'] / 1e6:>9.2f}M")
        print(f"{head}{'MT/BT':<14}{row['ratio']:>9.3f}{row['mt_fwd'] / row['bt_fwd']:>9.3f}"
              f"{row['mt_bwd'] / row['bt_bwd']:>9.3f}{row['mt_opt'] / row['bt_opt']:>9.3f}")
    by_key = {(row["size"], row["precision"]): row for row in rows}
    for size in sizes:
        if (size, "fp32") in by_key and (size, "bf16") in by_key:
            ratio = by_key[size, "bf16"]["mt_ms"] / by_key[size, "fp32"]["bt_ms"]
            print(f"{size:<6}{'':<6}{'MT bf16/BT fp32':<14}{ratio:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
