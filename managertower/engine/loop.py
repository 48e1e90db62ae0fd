"""The one training loop: DeepSpeed around a task, exact resume, logging, evaluation, pre-emption.

Pre-training and every fine-tuning task run through `Trainer(cfg, task).fit()`, which reads as
restore -> repeat (one optimizer step -> log / evaluate / save) -> finish. The task decides what is trained
(its data, objective, step count and metrics; see managertower/tasks/base.py); the loop decides nothing of that.

Resume (checkpoint.resume=auto): the newest complete checkpoint under RUN/checkpoints is restored with its
optimizer, schedule, step, RNG states and each rank's data-loader position, so the run continues exactly
where it stopped. If the world size changed, the fp32 weights are loaded and the optimizer restarts (the log
says so): ZeRO partitions do not map onto a different number of ranks.

Pre-emption: SIGTERM or SIGUSR1 (SLURM's warning signal) makes every rank stop at the next step boundary,
save a checkpoint and exit 0 with `preempted` in the summary; the job is requeued and resumes.
"""
from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import torch

from .. import dist
from ..config import Config
from ..io import atomic_write_json
from . import checkpoint as ckpt
from .deepspeed_config import build_ds_config, effective_precision
from .logging import RunLogger, loss_curve_figure
from .optim import build_optimizer, build_scheduler, param_groups

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

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = False
        self.signal_name = ""
        self.previous = {}
        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests calling in-process from a thread)
                pass

    def _handler(self, signum, frame):
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank got a signal: all ranks save the same step and stop together."""
        return dist.all_reduce_max(1.0 if self.raised else 0.0) > 0

    def restore(self) -> None:
        """Give the signals back to their previous handlers once the run is over (in-process callers)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class _LogWindow:
    """What the micro-steps since the last log line add up to, summed on each rank: the losses and accuracies
    (means are taken over all ranks' micro-steps when logged), and the samples and tokens for the throughput."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.started = time.time()
        self.sums: dict[str, float] = {}
        self.micro_steps = 0
        self.samples = 0
        self.tokens = 0

    def add(self, out: dict, micro_batch: int) -> None:
        """One micro-step's task output (`forward`'s dict)."""
        for key, value in out.items():
            if key.startswith(("loss", "acc")):
                self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.micro_steps += 1
        self.samples += int(out.get("batch_size", micro_batch))
        self.tokens += int(out.get("tokens", 0))

    def reduce(self) -> tuple[dict[str, float], float, float]:
        """(mean of each loss / accuracy, samples/s, tokens/s) over every rank; every rank calls this."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.micro_steps, self.samples, self.tokens],
                              dtype=torch.float64)
        values = dist.all_reduce_sum(values)
        count = values[len(keys)].item()
        elapsed = max(time.time() - self.started, 1e-9)
        means = {k: values[i].item() / count for i, k in enumerate(keys)}
        return means, values[len(keys) + 1].item() / elapsed, values[len(keys) + 2].item() / elapsed


def base_lr_group(optimizer: torch.optim.Optimizer) -> dict:
    """The parameter group at the recipe's base lr (lr_mult 1: the experts), whose lr is the one logged. The
    scheduler scales every group by the same factor, so it stands for all of them."""
    for group in optimizer.param_groups:
        if group.get("lr_mult") == 1.0:
            return group
    raise ValueError("no parameter group trains at the base lr (lr_mult 1): the logged lr has no group to follow")


class Trainer:
    """Runs one task to its last step (or to a pre-emption signal) under DeepSpeed, on every rank."""

    def __init__(self, cfg: Config, task):
        self.cfg = cfg
        self.task = task
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"

    # ---------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Restore, then step -> log / evaluate / save until the last step or a pre-emption signal; finish."""
        self._set_up()
        stop = _StopFlag()
        try:
            preempted, last_eval = False, {}
            while self.step < self.total_steps:
                lr = self._optimizer_step()
                if self._log_due():
                    self._log(lr, picture=self._checkpoint_due())
                if self._eval_due():
                    last_eval = self._evaluate()
                stop_now = stop.agreed()
                if self._checkpoint_due() or stop_now:
                    self._save()
                if stop_now:
                    preempted = True
                    self._note(f"{stop.signal_name or 'a signal'} received: checkpoint saved at step {self.step}, "
                               "exiting for requeue")
                    break
            if not preempted:
                last_eval = self._evaluate() or last_eval
            return self._finish(preempted, last_eval)
        finally:
            stop.restore()

    # --- restore ---------------------------------------------------------------------------------------
    def _set_up(self) -> None:
        """Start the process group and DeepSpeed around the task, and restore where the run starts: fresh (from
        checkpoint.init_from's tower if set), an exact resume (same world size: optimizer, schedule, RNG and
        data position), or the fp32 weights of a run on another world size with a fresh optimizer."""
        cfg, task = self.cfg, self.task
        dist.init()
        self.rank, self.world, self.device = dist.rank(), dist.world_size(), dist.device()
        torch.manual_seed(cfg.train.seed + self.rank)
        ds_config, ds_path = build_ds_config(cfg.train, self.world)
        self.accum = ds_config["gradient_accumulation_steps"]
        self.total_steps = task.total_steps()
        resume, meta, exact = self._resume_decision()
        notes = [f"world size {self.world}, micro batch {cfg.train.micro_batch} x accumulation {self.accum} x "
                 f"{self.world} ranks = global batch {cfg.train.global_batch}; {effective_precision(cfg.train)}, "
                 f"ZeRO stage {ds_config['zero_optimization']['stage']} ({ds_path.name})"]
        if not torch.cuda.is_available() and cfg.train.precision != "fp32":
            notes.append(f"train.precision={cfg.train.precision} needs CUDA: running fp32 on the CPU")
        notes += self._load_start_weights(resume, meta, exact)
        self._start_deepspeed(ds_config)
        self.step = int(meta["step"]) if resume else 0
        self.samples_seen = int(meta.get("samples_seen", 0)) if resume else 0
        if exact:
            self._restore_exact(resume)
            notes.append(f"resumed from {resume} at step {self.step}")
        elif resume:
            for _ in range(self.step):  # the schedule continues where the other world size left it
                self.scheduler.step()
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(str(self.run_dir / "config.yaml"))
        self.logger = RunLogger(self.run_dir, self.total_steps, self.step, cfg.run.tensorboard, cfg.run.progress,
                                description=task.name)
        for note in notes:
            self._note(note)
        self.flops_per_sample = task.train_flops_per_sample()
        self.peak_flops = peak_flops()
        self.batches = iter(self.loader)
        self.window = _LogWindow()
        self.fit_started = time.time()
        self.engine.train()

    def _resume_decision(self) -> tuple[Path | None, dict, bool]:
        """(checkpoint to continue from or None, its meta.json, whether it resumes exactly: same world size)."""
        resume = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir)
        meta = ckpt.read_meta(resume) if resume else {}
        return resume, meta, bool(resume) and meta.get("world_size") == self.world

    def _load_start_weights(self, resume: Path | None, meta: dict, exact: bool) -> list[str]:
        """Weights loaded before DeepSpeed starts (an exact resume loads its own later); returns the log notes."""
        if resume and not exact:
            state, _ = ckpt.load_weights_file(resume)
            self.task.load_state_dict(state)
            return [f"world size changed from {meta.get('world_size')} to {self.world}: resuming {resume.name} from "
                    "its fp32 weights with a fresh optimizer and data order (ZeRO partitions are per rank)"]
        init_from = self.cfg.checkpoint.init_from
        if not resume and init_from:
            state, _ = ckpt.load_weights_file(init_from)
            missing = self.task.load_tower_weights(state, init_from)
            return [f"initialised the tower from {init_from}; the task's heads start new"
                    + (f", and {len(missing)} tower tensors the checkpoint lacks" if missing else "")]
        return []

    def _start_deepspeed(self, ds_config: dict) -> None:
        """The optimizer and schedule over the task's parameter groups, DeepSpeed's engine, the train loader."""
        import deepspeed

        cfg, task = self.cfg, self.task
        self.optimizer = build_optimizer(param_groups(task, cfg.train, task.lr_multiplier), cfg.train)
        scheduler = build_scheduler(self.optimizer, cfg.train, self.total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=task, optimizer=self.optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
        self.loader = task.build_loader("train", self.rank, self.world, self.device)

    def _restore_exact(self, resume: Path) -> None:
        """Optimizer, schedule and weights from DeepSpeed's files; this rank's data position and RNG states."""
        self.engine.load_checkpoint(str(resume.parent), tag=resume.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        rank_state = ckpt.load_rank_state(resume)
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            ckpt.set_rng_state(rank_state["rng"])

    # --- step ------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        """One optimizer step of `accum` micro-steps (DeepSpeed steps the optimizer and the schedule on the
        last one). Returns the base lr this step used, read before the schedule moves on: DeepSpeed steps this
        optimizer (ZeRO wraps it) and the schedule sets the lrs of its groups."""
        lr = base_lr_group(self.optimizer)["lr"]
        for _ in range(self.accum):
            batch = dist.batch_to_device(next(self.batches), self.device)
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self.engine.step()
            self.window.add(out, self.cfg.train.micro_batch)
        self.step += 1
        self.samples_seen += self.cfg.train.global_batch
        self.logger.advance()
        return lr

    def _log_due(self) -> bool:
        return self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps

    def _eval_due(self) -> bool:
        """Every train.eval_every steps; the last step's evaluation runs once the loop is over."""
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _checkpoint_due(self) -> bool:
        return self.step % self.cfg.checkpoint.every == 0 or self.step == self.total_steps

    # --- log, evaluate, save ---------------------------------------------------------------------------
    def _log(self, lr: float, picture: bool) -> None:
        """One metrics line (every rank takes part in the reduction), and the managers' weights."""
        means, samples_per_s, tokens_per_s = self.window.reduce()
        scalars = {**means, "lr": lr}
        grad_norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        scalars["samples_per_s"] = samples_per_s
        scalars["tokens_per_s"] = tokens_per_s
        if self.flops_per_sample and self.peak_flops:
            scalars["mfu"] = samples_per_s * self.flops_per_sample / (self.peak_flops * self.world)
        self.logger.log(self.step, scalars)
        weights = self.task.manager_weights()
        if weights:
            self.logger.manager_weights(self.step, weights, picture)
        self.window.reset()

    def _evaluate(self) -> dict:
        self.engine.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.rank, self.world, self.device)
        self.engine.train()
        if metrics:
            self.logger.log(self.step, {f"eval_{k}": v for k, v in metrics.items()})
            self._note(f"step {self.step} eval: " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def _save(self) -> None:
        ckpt.save(self.engine, self.ckpt_dir, self.step,
                  meta={"samples_seen": self.samples_seen, "task": self.task.name, "config": self.cfg.to_dict()},
                  rank_state={"loader": self.loader.state_dict()}, keep=self.cfg.checkpoint.keep)

    def _note(self, text: str) -> None:
        """A line in the console log (rank 0), above the progress bar."""
        self.logger.write_line(f"[{self.task.name}] {text}")

    # --- finish ----------------------------------------------------------------------------------------
    def _finish(self, preempted: bool, last_eval: dict) -> dict:
        """The summary (returned on every rank); rank 0 also writes curves.png and summary.json and prints it."""
        self.logger.close()
        summary = {"task": self.task.name, "steps": self.step, "total_steps": self.total_steps,
                   "samples_seen": self.samples_seen, "wall_s": round(time.time() - self.fit_started, 1),
                   "preempted": preempted, "checkpoint": str(ckpt.find_resume(self.ckpt_dir)), **last_eval}
        if dist.is_main():
            metrics_path = self.run_dir / "metrics.jsonl"
            if metrics_path.exists():
                loss_curve_figure(metrics_path, self.run_dir / "curves.png")
            atomic_write_json(self.run_dir / "summary.json", summary)
            width = max(len(k) for k in summary)
            print("\n" + "\n".join(f"  {k:<{width}}  {_fmt(v)}" for k, v in summary.items()), flush=True)
        dist.barrier()
        return summary


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    return str(value)
