"""The one training loop: DeepSpeed around a task, exact resume, logging, evaluation, pre-emption.

Pre-training and every fine-tuning task run through `Trainer(cfg, task).fit()`.

Resume (checkpoint.resume=auto): the newest complete checkpoint under RUN/checkpoints is restored with its
optimizer, schedule, step, RNG states and each rank's data-loader position, so the run continues exactly
where it stopped. If the world size changed, the fp32 weights are loaded and the optimizer restarts (the log
says so): ZeRO partitions do not map onto a different number of ranks.

Pre-emption: SIGTERM or SIGUSR1 (SLURM's warning signal) makes every rank stop at the next step boundary,
save a checkpoint and exit 0 with `preempted` in the summary; the job is requeued and resumes.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch

from .. import dist
from ..config import Config
from . import checkpoint as ckpt
from .deepspeed_config import build_ds_config, effective_precision
from .logging import RunLogger, loss_curve_figure
from .optim import build_optimizer, build_scheduler, param_groups, warmup_linear_decay

# Dense bf16 peak TFLOP/s per GPU, for the MFU estimate (override with MT_PEAK_TFLOPS).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "A10": 125.0, "L40": 181.0, "V100": 125.0}


def peak_flops() -> float | None:
    if "MT_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MT_PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value * 1e12
    return None


class _StopFlag:
    """Set by SIGTERM / SIGUSR1; the loop checks it (agreed across ranks) at each step boundary."""

    def __init__(self):
        self.raised = False
        self.signal_name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests calling in-process from a thread)
                pass

    def _handler(self, signum, frame):
        self.raised = True
        self.signal_name = signal.Signals(signum).name


class Trainer:
    def __init__(self, cfg: Config, task):
        self.cfg = cfg
        self.task = task
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg, task = self.cfg, self.task
        dist.init()
        rank, world = dist.rank(), dist.world_size()
        device = dist.device()
        torch.manual_seed(cfg.train.seed + rank)
        ds_config, ds_path = build_ds_config(cfg.train, world)
        accum = ds_config["gradient_accumulation_steps"]
        total_steps = task.total_steps(world)

        resume = ckpt.resolve_resume(cfg.checkpoint.resume, self.ckpt_dir)
        meta = ckpt.read_meta(resume) if resume else {}
        same_world = bool(resume) and meta.get("world_size") == world
        notes = [f"world size {world}, micro batch {cfg.train.micro_batch} x accumulation {accum} x {world} ranks"
                 f" = global batch {cfg.train.global_batch}; {effective_precision(cfg.train)}, ZeRO stage "
                 f"{ds_config['zero_optimization']['stage']} ({ds_path.name})"]
        if not torch.cuda.is_available() and cfg.train.precision != "fp32":
            notes.append(f"train.precision={cfg.train.precision} needs CUDA: running fp32 on the CPU")
        if resume and not same_world:
            state, _ = ckpt.load_weights_file(resume)
            task.load_state_dict(state)
            notes.append(f"world size changed from {meta.get('world_size')} to {world}: resuming {resume.name} from "
                         "its fp32 weights with a fresh optimizer and data order (ZeRO partitions are per rank)")
        elif not resume and cfg.checkpoint.init_from:
            state, _ = ckpt.load_weights_file(cfg.checkpoint.init_from)
            missing = task.load_tower_weights(state, cfg.checkpoint.init_from)
            notes.append(f"initialised the tower from {cfg.checkpoint.init_from}; the task's heads start new"
                         + (f", and {len(missing)} tower tensors the checkpoint lacks" if missing else ""))

        groups = param_groups(task, cfg.train, task.lr_multiplier)
        optimizer = build_optimizer(groups, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, total_steps)
        import deepspeed

        engine, _, _, scheduler = deepspeed.initialize(model=task, optimizer=optimizer, lr_scheduler=scheduler,
                                                       config=ds_config, dist_init_required=False)
        loader = task.build_train_loader(rank, world, device)
        start_step, samples_seen = 0, 0
        if resume:
            start_step = int(meta["step"])
            samples_seen = int(meta.get("samples_seen", 0))
            if same_world:
                engine.load_checkpoint(str(resume.parent), tag=resume.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True)
                rank_state = ckpt.load_rank_state(resume)
                if rank_state is not None:
                    loader.load_state_dict(rank_state["loader"])
                    ckpt.set_rng_state(rank_state["rng"])
                notes.append(f"resumed from {resume} at step {start_step}")
            else:
                for _ in range(start_step):
                    scheduler.step()
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(str(self.run_dir / "config.yaml"))
        logger = RunLogger(self.run_dir, total_steps, start_step, cfg.run.tensorboard, cfg.run.progress,
                           description=task.name)
        for note in notes:
            logger.write_line(f"[{task.name}] {note}")

        stop = _StopFlag()
        lr_factor = warmup_linear_decay(total_steps, cfg.train.warmup_steps(), cfg.train.min_lr_ratio)
        flops_per_sample = getattr(task, "train_flops_per_sample", lambda: None)()
        peak = peak_flops()
        iterator = iter(loader)
        window = {"start": time.time(), "samples": 0, "tokens": 0, "sums": {}, "count": 0}
        step = start_step
        fit_start = time.time()
        preempted = False
        last_eval: dict = {}
        engine.train()
        while step < total_steps:
            for _ in range(accum):
                batch = dist.batch_to_device(next(iterator), device)
                out = engine(batch)
                engine.backward(out["loss"])
                engine.step()
                for key, value in out.items():
                    if key.startswith(("loss", "acc")):
                        window["sums"][key] = window["sums"].get(key, 0.0) + float(value.detach())
                window["count"] += 1
                batch_size = int(out.get("batch_size", cfg.train.micro_batch))
                window["samples"] += batch_size
                window["tokens"] += int(out.get("tokens", 0))
            step += 1
            samples_seen += cfg.train.global_batch
            logger.advance()
            if step % cfg.train.log_every == 0 or step == total_steps:
                picture = step % cfg.checkpoint.every == 0 or step == total_steps
                self._log(engine, logger, step, window, lr_factor(step - 1) * cfg.train.lr, world,
                          flops_per_sample, peak, picture)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                last_eval = self._evaluate(engine, logger, step, rank, world, device)
            stop_now = dist.all_reduce_max(1.0 if stop.raised else 0.0) > 0
            if step % cfg.checkpoint.every == 0 or step == total_steps or stop_now:
                self._save(engine, loader, step, samples_seen)
            if stop_now:
                preempted = True
                logger.write_line(f"[{task.name}] {stop.signal_name or 'a signal'} received: checkpoint saved at "
                                  f"step {step}, exiting for requeue")
                break
        if not preempted:
            last_eval = self._evaluate(engine, logger, step, rank, world, device) or last_eval
        logger.close()
        summary = {"task": task.name, "steps": step, "total_steps": total_steps, "samples_seen": samples_seen,
                   "wall_s": round(time.time() - fit_start, 1), "preempted": preempted,
                   "checkpoint": str(ckpt.find_resume(self.ckpt_dir)), **last_eval}
        if dist.is_main():
            self._finish(summary)
        dist.barrier()
        return summary

    # ---------------------------------------------------------------------------------------------------
    def _log(self, engine, logger, step, window, lr, world, flops_per_sample, peak, picture):
        keys = sorted(window["sums"])
        values = torch.tensor([window["sums"][k] for k in keys] + [window["count"], window["samples"],
                                                                   window["tokens"]], dtype=torch.float64)
        values = dist.all_reduce_sum(values)
        count = values[len(keys)].item()
        elapsed = max(time.time() - window["start"], 1e-9)
        scalars = {k: values[i].item() / count for i, k in enumerate(keys)}
        scalars["lr"] = lr
        grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        scalars["samples_per_s"] = values[len(keys) + 1].item() / elapsed
        scalars["tokens_per_s"] = values[len(keys) + 2].item() / elapsed
        if flops_per_sample and peak:
            scalars["mfu"] = scalars["samples_per_s"] * flops_per_sample / (peak * world)
        logger.log(step, scalars)
        weights = engine.module.model.manager_weights()
        if weights:
            logger.manager_weights(step, weights, picture)
        window.update(start=time.time(), samples=0, tokens=0, sums={}, count=0)

    def _evaluate(self, engine, logger, step, rank, world, device) -> dict:
        engine.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(rank, world, device)
        engine.train()
        if metrics:
            logger.log(step, {f"eval_{k}": v for k, v in metrics.items()})
            logger.write_line(f"[{self.task.name}] step {step} eval: " +
                              ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def _save(self, engine, loader, step, samples_seen):
        ckpt.save(engine, self.ckpt_dir, step,
                  meta={"samples_seen": samples_seen, "task": self.task.name, "config": self.cfg.to_dict()},
                  rank_state={"loader": loader.state_dict()}, keep=self.cfg.checkpoint.keep)

    def _finish(self, summary: dict) -> None:
        metrics_path = self.run_dir / "metrics.jsonl"
        if metrics_path.exists():
            loss_curve_figure(metrics_path, self.run_dir / "curves.png")
        with open(self.run_dir / "summary.json", "w") as handle:
            json.dump(summary, handle, indent=1, default=str)
        width = max(len(k) for k in summary)
        print("\n" + "\n".join(f"  {k:<{width}}  {_fmt(v)}" for k, v in summary.items()), flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    return str(value)
