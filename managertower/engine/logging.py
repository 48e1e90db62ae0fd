"""Run logging on rank 0: console progress with ETA, RUN/metrics.jsonl, TensorBoard, and pictures.

metrics.jsonl holds one JSON object per logged step. On resume the lines past the resumed step are dropped
(and TensorBoard purges them), so a resumed run's log reads like an uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..io import atomic_write, atomic_write_json


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, description: str = "train"):
        self.enabled = dist.is_main()
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.start_step = start_step
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.writer = None
        self.bar = None
        self.started = time.time()
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=description, dynamic_ncols=True,
                            mininterval=2.0, smoothing=0.1)

    def _truncate_metrics(self, step: int) -> None:
        if not self.metrics_path.exists():
            return
        kept = []
        with open(self.metrics_path) as handle:
            for line in handle:
                try:
                    if json.loads(line).get("step", 0) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        atomic_write(self.metrics_path, "".join(kept))

    def log(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith(("loss_", "acc_")) else key,
                                           value, step)
        if self.bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if k in ("loss", "acc_itm", "lr") and v is not None}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def write_line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def manager_weights(self, step: int, weights: dict[str, torch.Tensor], picture: bool = True) -> None:
        """Histograms of the managers' mean aggregation weights, and (when `picture`) a per-layer heat map
        like the paper's Figure 6 in RUN/manager_weights.png and TensorBoard."""
        if not self.enabled or not weights:
            return
        # the managers record their weights where they run (a GPU): one copy to the host here, at the log step
        weights = {side: table.detach().float().cpu() for side, table in weights.items()}
        if self.writer is not None:
            for side, table in weights.items():
                for layer, row in enumerate(table):
                    self.writer.add_histogram(f"managers/{side}_layer{layer + 1}", row, step)
                    for expert, value in enumerate(row.tolist()):
                        self.writer.add_scalar(f"managers/{side}_layer{layer + 1}_expert{expert + 1}", value, step)
        if not picture:
            return
        figure = manager_weight_figure(weights, title=f"aggregation weights at step {step}")
        figure.savefig(self.run_dir / "manager_weights.png", dpi=110)
        if self.writer is not None:
            self.writer.add_figure("managers/weights", figure, step)
        import matplotlib.pyplot as plt

        plt.close(figure)
        atomic_write_json(self.run_dir / "manager_weights.json",
                          {"step": step, **{k: v.tolist() for k, v in weights.items()}})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def manager_weight_figure(weights: dict[str, torch.Tensor], title: str = ""):
    """A heat map per modality: rows are cross-modal layers, columns the experts (uni-modal layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = list(weights)
    figure, axes = plt.subplots(1, len(sides), figsize=(4.2 * len(sides), 3.4), squeeze=False)
    for axis, side in zip(axes[0], sides):
        table = weights[side].float().numpy()
        image = axis.imshow(table, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(table.max(), 1e-6))
        axis.set_title(f"{side} managers")
        axis.set_xlabel("uni-modal expert (top N layers)")
        axis.set_ylabel("cross-modal layer")
        axis.set_xticks(range(table.shape[1]), [str(i + 1) for i in range(table.shape[1])])
        axis.set_yticks(range(table.shape[0]), [str(i + 1) for i in range(table.shape[0])])
        for (row, col), value in np.ndenumerate(table):
            axis.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white")
        figure.colorbar(image, ax=axis, fraction=0.046)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def loss_curve_figure(metrics_path: str | os.PathLike, out_path: str | os.PathLike,
                      keys=("loss", "loss_mlm", "loss_itm", "acc_itm")) -> Path | None:
    """Plot metrics.jsonl (one panel per key) to a PNG people can look at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    present = [k for k in keys if any(k in r and r[k] is not None for r in rows)]
    if not present:
        return None
    figure, axes = plt.subplots(1, len(present), figsize=(3.6 * len(present), 3.0), squeeze=False)
    for axis, key in zip(axes[0], present):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        axis.plot([p[0] for p in points], [p[1] for p in points], lw=1.2)
        eval_key = f"eval_{key}"
        evals = [(r["step"], r[eval_key]) for r in rows if r.get(eval_key) is not None]
        if evals:
            axis.plot([p[0] for p in evals], [p[1] for p in evals], "o-", lw=1, ms=3, label="held-out")
            axis.legend(fontsize=7)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return Path(out_path)
