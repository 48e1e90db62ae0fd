"""The one training loop: DeepSpeed around a task, exact resume, logging, evaluation, stopping on signals.

Pre-training and every fine-tuning task run through `Trainer(cfg, task).fit()`, which reads as
restore -> repeat (one optimizer step -> log / evaluate / save) -> finish. The task decides what is trained
(its data, objective, step count and metrics; see managertower/tasks/base.py); the loop decides nothing of that.

The run folder: rank 0 holds a lock on RUN/.lock for the whole run (`_RunLock`), so a second run on the same
run.dir fails at once with one line naming the holder (host, pid, start time) instead of interleaving its
checkpoints and logs with the first one's.

Resume (checkpoint.resume=auto): the newest intact checkpoint under RUN/checkpoints is restored with its
optimizer, schedule, step, RNG states, each rank's data-loader position and logging window, so the run
continues exactly where it stopped (metrics.jsonl reads as if it had not). A checkpoint whose files no longer
match its completion record is reported and passed over (managertower/engine/checkpoint.py). If the world
size changed, the fp32 weights are loaded and the optimizer restarts (the log says so): ZeRO partitions do not
map onto a different number of ranks. The config is compared with the one the checkpoint was written with:
how long the run goes and how it logs, evaluates and saves may change (RESUMABLE_CHANGES, applied and
logged; after a world-size change the train.* and data.* settings too, since the optimizer, schedule and data
start afresh); anything else (the optimizer's hyper-parameters, the data, the model) was fixed when the
checkpoint was written and would not apply, so any such change is one error listing them (key: saved -> new)
before anything starts, and config.yaml never claims a setting the run does not use.

Stopping on signals (the handlers are installed for the run and given back after it; `_StopFlag`):
    SIGUSR1          requeue: SLURM's warning before the time limit (`#SBATCH --signal=B:USR1@180`, passed to the
                     ranks by cluster.signal_ranks; cluster/README.md). Every rank stops at the next step
                     boundary, saves a checkpoint and returns a summary with `preempted`: the process exits 0
                     and the job requeues itself.
    SIGTERM, SIGINT  stop (scancel, scontrol requeue or preemption, Ctrl-C): the run does not finish, so the
                     process never exits 0: it ends with RunInterrupted, a SystemExit with status 128 + the
                     signal's number (143, 130). If the ranks reach a step boundary within MT_STOP_GRACE_S
                     seconds (default 15) they save a checkpoint there first. If not (a loader waiting for data,
                     a long evaluation, a rank waiting in a collective for one that is stuck), RunInterrupted is
                     raised wherever the main thread is, without a checkpoint (the previous one stands); a
                     process whose main thread does not come back to Python at all (blocked in C++) ends with
                     os._exit HARD_EXIT_S seconds later. A second SIGTERM / SIGINT stops at once the same way, if
                     it comes at least REPEAT_S after the first: the DeepSpeed launcher and SLURM pass their copy
                     of one signal on within milliseconds, and that copy is not a second request.
A SLURM job stopped by `scontrol requeue` or preemption is requeued whatever the exit status, and resumes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import torch

from .. import dist
from ..config import Config, ConfigError
from ..io import atomic_write_json
from . import checkpoint as ckpt
from .deepspeed_config import build_ds_config, effective_precision, precision_notes
from .logging import RunLogger, loss_curve_figure
from .optim import build_optimizer, build_scheduler, param_groups

# Dense (no sparsity) peak TFLOP/s per GPU for the MFU estimate, by the precision a run's matrix products use: bf16
# (and fp16), tf32 (an fp32 run with train.tf32) and plain fp32; from NVIDIA's data sheets. The name
# torch.cuda.get_device_name() reports must match a pattern whole: an H100 PCIe or an H200 NVL is not an SXM part
# (a GPU not listed logs no MFU; MT_PEAK_TFLOPS sets the peak, in TFLOP/s, for any GPU).
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"(NVIDIA )?H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    (r"(NVIDIA )?H100 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"(NVIDIA )?H100( 80GB HBM3| SXM5? 80GB)?", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"(NVIDIA )?H200 NVL", {"bf16": 835.0, "tf32": 417.5, "fp32": 60.0}),
    (r"(NVIDIA )?H200( 141GB HBM3e)?", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"(NVIDIA )?GH200( 480GB| 144G HBM3e)?", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"(NVIDIA )?A100([- ]SXM4)?([- ](40|80)GB)?( PCIe)?|(NVIDIA )?A100-PCIE-(40|80)GB",
     {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"(NVIDIA )?A10", {"bf16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"(NVIDIA )?L40S", {"bf16": 362.0, "tf32": 183.0, "fp32": 91.6}),
    (r"(NVIDIA )?L40", {"bf16": 181.0, "tf32": 90.5, "fp32": 90.5}),
    (r"(NVIDIA )?L4", {"bf16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"Tesla V100-SXM2-(16|32)GB", {"fp16": 125.0, "fp32": 15.7}),
    (r"Tesla V100-PCIE-(16|32)GB", {"fp16": 112.0, "fp32": 14.0}),
)


def matmul_precision(precision: str, tf32: bool, on_gpu: bool) -> str:
    """The precision a run's matrix products use: bf16/fp16, or tf32 for an fp32 run on CUDA with train.tf32."""
    if precision == "fp32":
        return "tf32" if tf32 and on_gpu else "fp32"
    return precision


def peak_flops(matmul: str, name: str | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for `matmul` precision, where it came from); (None, why) when unknown."""
    if "MT_PEAK_TFLOPS" in os.environ:
        return float(os.environ["MT_PEAK_TFLOPS"]) * 1e12, "MT_PEAK_TFLOPS"
    if name is None:
        if not torch.cuda.is_available():
            return None, "no GPU"
        name = torch.cuda.get_device_name()
    for pattern, peaks in PEAK_TFLOPS:
        if re.fullmatch(pattern, name.strip()):
            key = "bf16" if matmul == "fp16" and "fp16" not in peaks else matmul
            if key in peaks:
                return peaks[key] * 1e12, f"{name} {matmul} dense peak {peaks[key]:g} TFLOP/s"
            return None, f"{name} has no {matmul} peak listed"
    return None, f"no peak listed for {name!r}: set MT_PEAK_TFLOPS (TFLOP/s per GPU) for an MFU figure"


# --- stopping on signals -----------------------------------------------------------------------------------------
STOP_GRACE_S = 15.0  # default of MT_STOP_GRACE_S: seconds a SIGTERM / SIGINT waits for a step boundary
REPEAT_S = 1.0  # a SIGTERM / SIGINT this soon after the first is the launcher's copy of it, not a second request
HARD_EXIT_S = 5.0  # after a stop at once, seconds before os._exit ends a process blocked outside Python


class RunInterrupted(SystemExit):
    """SIGTERM / SIGINT ended the run before its last step: the process exits with 128 + the signal's number
    (143 for SIGTERM, 130 for SIGINT), as a shell reports a process ended by that signal, so that nothing takes
    the run for finished. A SystemExit: the doors let it through and Python prints no traceback."""

    def __init__(self, signum: int, reason: str):
        super().__init__(128 + signum)
        self.signum, self.reason = signum, reason


def _say(text: str) -> None:
    """A line on stderr from rank 0, written with os.write: safe inside a signal handler or a timer thread."""
    if dist.is_main():
        os.write(2, (text + "\n").encode())


def _grace_seconds() -> float:
    text = os.environ.get("MT_STOP_GRACE_S")
    if text is None:
        return STOP_GRACE_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"MT_STOP_GRACE_S={text!r} is not a number of seconds >= 0 (unset it for "
                          f"{STOP_GRACE_S:g})")
    return seconds


class _StopFlag:
    """What SIGUSR1 / SIGTERM / SIGINT asked for. The loop agrees on it across ranks at each step boundary
    (`agreed`); a SIGTERM / SIGINT that finds no boundary within `grace_s`, or a second one, stops the run where
    it is (the module docstring has the whole protocol)."""

    REQUEUE = signal.SIGUSR1
    INTERRUPT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float | None = None, hard_exit_s: float | None = HARD_EXIT_S):
        self.grace_s = _grace_seconds() if grace_s is None else grace_s
        self.hard_exit_s = hard_exit_s  # None: never os._exit (in-process tests of the handler)
        self.requeue = False
        self.interrupt = 0  # the number of the first SIGTERM / SIGINT (0: none)
        self.first_at = 0.0
        self.expired = False  # no step boundary came within grace_s
        self.holding = False  # the boundary came: the checkpoint is being saved, the grace timer is off
        self.stopped = False  # RunInterrupted raised: the process is on its way out
        self._timer: threading.Timer | None = None
        self._hard_exit: threading.Thread | None = None
        self.previous = {}
        for sig in (self.REQUEUE, *self.INTERRUPT):
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (tests calling in-process from a thread)
                pass

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.interrupt).name if self.interrupt else (
            self.REQUEUE.name if self.requeue else "")

    def _handler(self, signum, frame):
        if signum == self.REQUEUE:
            self.requeue = True
            return
        name = signal.Signals(signum).name
        if self.stopped:
            return  # already on its way out (os._exit HARD_EXIT_S after the stop, whatever happens)
        if not self.interrupt:
            self.interrupt, self.first_at = signum, time.monotonic()
            _say(f"{name} received: stopping at the next step boundary with a checkpoint, or in {self.grace_s:g} s "
                 f"without one; {name} again stops at once")
            self._timer = threading.Timer(self.grace_s, self._expire)
            self._timer.daemon = True
            self._timer.start()
            return
        if self.expired:
            self.stop_now(f"no step boundary within {self.grace_s:g} s of {self.signal_name}: stopping without a "
                          "checkpoint (the previous one stands)")
        if time.monotonic() - self.first_at >= REPEAT_S:
            self.stop_now(f"{name} again: stopping at once without a checkpoint (the previous one stands)")
        # else: a launcher's copy of the first signal, which is already being acted on

    def _expire(self) -> None:
        """The grace timer (its own thread): no step boundary came in time; the main thread is told to stop."""
        if self.holding:
            return
        self.expired = True
        self._arm_hard_exit()
        try:  # the handler runs (and raises) in the main thread as soon as that runs Python again
            signal.pthread_kill(threading.main_thread().ident, self.interrupt)
        except (OSError, ValueError):
            pass

    def _arm_hard_exit(self) -> None:
        if self.hard_exit_s is None or self._hard_exit is not None:
            return
        code, rank = 128 + self.interrupt, dist.rank()

        def hard_exit() -> None:
            time.sleep(self.hard_exit_s)
            os.write(2, f"rank {rank}: still running {self.hard_exit_s:g} s after being told to stop (blocked outside "
                        f"Python): exiting now with status {code}\n".encode())
            os._exit(code)

        self._hard_exit = threading.Thread(target=hard_exit, name="managertower-stop", daemon=True)
        self._hard_exit.start()

    def stop_now(self, reason: str) -> None:
        """End the run here: RunInterrupted, and os._exit HARD_EXIT_S later if the process has not ended by then."""
        _say(reason)
        self.stopped = True
        self._arm_hard_exit()
        raise RunInterrupted(self.interrupt, reason)

    def agreed(self) -> int:
        """At a step boundary, on every rank: 0 (carry on), SIGUSR1 (save and return: requeue) or the SIGTERM /
        SIGINT any rank got (save and stop), the same on every rank; interrupts outrank a requeue."""
        mine = 100 + self.interrupt if self.interrupt else (1 if self.requeue else 0)
        agreed = int(dist.all_reduce_max(float(mine)))
        if agreed >= 100:
            self.interrupt = self.interrupt or agreed - 100  # a rank the signal did not reach stops the same way
            return agreed - 100
        return self.REQUEUE if agreed else 0

    def hold(self) -> None:
        """The step boundary came in time: the checkpoint is saved whatever it takes (a second signal still stops
        at once)."""
        self.holding = True
        if self._timer is not None:
            self._timer.cancel()

    def restore(self) -> None:
        """Give the signals back to their previous handlers once the run is over (in-process callers)."""
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --- the run folder's lock ----------------------------------------------------------------------------------------
LOCK_FILE = ".lock"


class RunFolderBusy(ConfigError):
    """Another run holds RUN/.lock: a user error (two runs on one run.dir), one line naming the holder."""


class _RunLock:
    """RUN/.lock, held by rank 0 for the whole run, so that a second run on the same run.dir fails at once.

    A POSIX record lock (fcntl.lockf) rather than flock: the kernel drops it when the holding process ends,
    however it ends (SIGKILL included), and it is not inherited by the processes rank 0 forks (data-loader
    workers), which would keep a flock held after rank 0 died; NFS (lockd / v4) and Lustre (mounted with
    -o flock) carry it to every node. (A POSIX lock is also dropped when its process closes any descriptor of the
    file: nothing else in rank 0 opens RUN/.lock.) Rank 0 alone holds it: the ranks of one run are one holder
    (every rank locking would shut its own run out), and a second run's rank 0 is enough to refuse the second
    run. The file says who holds it (host, pid, start time); it is written in place, never replaced or deleted,
    since a new file would be a second lock that nobody holds. Where the file system has no locks the run goes
    on, and says so.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.note = ""

    def acquire(self) -> "_RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise RunFolderBusy(f"run.dir {self.path.parent} is in use by another run ({_holder(holder)}; "
                                    f"{self.path}): wait for it to end or stop it, or give another run.dir") from None
            self.note = (f"cannot lock {self.path} ({error.strerror}): this file system has no locks, so nothing "
                         "stops a second run on the same run.dir")
            return self
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock; the file stays (see the class docstring)
            self.fd = None


def _holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not written yet"


class _LogWindow:
    """What the micro-steps since the last log line add up to, summed on each rank: the losses and accuracies
    (means are taken over all ranks' micro-steps when logged), and the samples and tokens for the throughput.

    Sums stay where the task computed them (the GPU in training) and are read back once per log line (`reduce`):
    a micro-step never waits for the device. The throughput counts only timed work: the clock starts over after
    the process's first optimizer step (start-up, JIT builds, the loader's first batches: `restart_clock`) and
    evaluation and checkpoint time is taken out (`untimed`)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.micro_steps = 0
        self.restart_clock()

    def restart_clock(self) -> None:
        """Throughput from here on (the loss sums are kept)."""
        self.started = time.time()
        self.excluded_s = 0.0
        self.samples = 0
        self.tokens: torch.Tensor | int = 0

    @contextlib.contextmanager
    def untimed(self):
        """Work other than training steps (evaluation, checkpoints): its time is left out of this window's."""
        started = time.time()
        try:
            yield
        finally:
            self.excluded_s += time.time() - started

    def add(self, out: dict, micro_batch: int) -> None:
        """One micro-step's task output (`forward`'s dict): device tensors are summed on the device."""
        for key, value in out.items():
            if key.startswith(("loss", "acc")):
                value = value.detach().to(torch.float64) if isinstance(value, torch.Tensor) else float(value)
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.micro_steps += 1
        self.samples += int(out.get("batch_size", micro_batch))
        tokens = out.get("tokens", 0)
        self.tokens = self.tokens + (tokens.detach() if isinstance(tokens, torch.Tensor) else int(tokens))

    def state_dict(self) -> dict:
        """This rank's sums so far, for the checkpoint: the first window logged after a resume then holds the
        micro-steps before the checkpoint too, as the uninterrupted run's does. (Its samples, tokens and time are
        kept as well, though the resumed process starts the throughput clock over after its first step.)"""
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "micro_steps": self.micro_steps,
                "samples": self.samples, "tokens": int(self.tokens), "elapsed_s": self.elapsed_s()}

    def load_state_dict(self, state: dict) -> None:
        self.sums = {str(k): float(v) for k, v in state["sums"].items()}
        self.micro_steps, self.samples, self.tokens = (int(state[k]) for k in ("micro_steps", "samples", "tokens"))
        self.started, self.excluded_s = time.time() - float(state["elapsed_s"]), 0.0

    def elapsed_s(self) -> float:
        return max(time.time() - self.started - self.excluded_s, 1e-9)

    def reduce(self, device: torch.device) -> tuple[dict[str, float], float | None, float | None]:
        """(mean of each loss / accuracy, samples/s, tokens/s) over every rank, with one read-back from the
        device; every rank calls this. The rates are None when the window timed no work (the first window of a
        run logging every step)."""
        keys = sorted(self.sums)
        values = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device) for k in keys]
                             + [torch.as_tensor(v, dtype=torch.float64, device=device)
                                for v in (self.micro_steps, self.samples, self.tokens)])
        totals = dist.all_reduce_sum(values).tolist()
        count, samples, tokens = totals[len(keys):]
        means = {k: totals[i] / count for i, k in enumerate(keys)}
        if not samples:
            return means, None, None
        elapsed = self.elapsed_s()
        return means, samples / elapsed, tokens / elapsed


# --- what a resumed run may change -------------------------------------------------------------------------------
# Settings a resumed run takes from its new config: how long it runs and how it logs, evaluates and saves (and
# activation checkpointing: memory, not results). Everything else was fixed when the checkpoint was written.
RESUMABLE_CHANGES = ("train.steps", "task.epochs", "train.log_every", "train.eval_every", "train.eval_batches",
                     "checkpoint.every", "checkpoint.keep", "run.progress", "run.tensorboard", "run.name",
                     "model.activation_checkpointing")
# Where the run is and where it resumed from: expected to differ (a run folder moved, checkpoint.resume=PATH).
NOT_COMPARED = ("run.dir", "checkpoint.resume")
# After a world-size change only the weights carry over: the optimizer, schedule and data start from the config.
FRESH_AFTER_RESIZE = ("train.", "data.")


def _settings(config: dict) -> dict[str, str]:
    """section.key -> the value as JSON (tuples and lists alike), for comparing two configs."""
    return {f"{section}.{key}": json.dumps(value, sort_keys=True)
            for section, values in config.items() if isinstance(values, dict) for key, value in values.items()}


def resume_changes(saved: dict, current: dict, exact: bool) -> tuple[list[str], list[str]]:
    """(applied, refused): the settings that differ between the config a checkpoint was written with (`saved`)
    and this run's (`current`), as "key: saved -> new". Keys only one of them has (added or renamed since) are
    not compared."""
    old, new = _settings(saved), _settings(current)
    applied, refused = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key] or key in NOT_COMPARED:
            continue
        change = f"{key}: {old[key]} -> {new[key]}"
        fresh = not exact and key.startswith(FRESH_AFTER_RESIZE)
        (applied if key in RESUMABLE_CHANGES or fresh else refused).append(change)
    return applied, refused


def base_lr_group(optimizer: torch.optim.Optimizer) -> dict:
    """The parameter group at the recipe's base lr (lr_mult 1: the experts), whose lr is the one logged. The
    scheduler scales every group by the same factor, so it stands for all of them."""
    for group in optimizer.param_groups:
        if group.get("lr_mult") == 1.0:
            return group
    raise ValueError("no parameter group trains at the base lr (lr_mult 1): the logged lr has no group to follow")


class Trainer:
    """Runs one task to its last step (or to a stopping signal) under DeepSpeed, on every rank."""

    def __init__(self, cfg: Config, task):
        self.cfg = cfg
        self.task = task
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.lock: _RunLock | None = None
        self.logger: RunLogger | None = None
        self.last_checkpoint: Path | None = None

    # ---------------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Restore, then step -> log / evaluate / save until the last step or a signal (SIGUSR1: save and return
        the summary; SIGTERM / SIGINT: RunInterrupted, with a checkpoint if a step boundary came in time)."""
        stop = _StopFlag()
        try:
            self._set_up()
            preempted, last_eval = False, {}
            while self.step < self.total_steps:
                lr = self._optimizer_step()
                if self._log_due():
                    self._log(lr, picture=self._checkpoint_due())
                if self._eval_due():
                    last_eval = self._evaluate()
                asked = stop.agreed()
                if asked in _StopFlag.INTERRUPT:
                    stop.hold()
                if self._checkpoint_due() or asked:
                    self._save()
                if asked == _StopFlag.REQUEUE:
                    preempted = True
                    self._note(f"SIGUSR1 received: checkpoint saved at step {self.step}, exiting for requeue")
                    break
                if asked:
                    name = signal.Signals(asked).name
                    self._note(f"{name} received: checkpoint saved at step {self.step}; stopping with exit status "
                               f"{128 + asked} (the same command continues the run)")
                    self._finish(True, last_eval)
                    raise RunInterrupted(asked, f"{name}: stopped at step {self.step} with a checkpoint")
            if not preempted:
                last_eval = self._evaluate() or last_eval
            return self._finish(preempted, last_eval)
        except RunInterrupted:
            raise
        except Exception as error:
            if stop.interrupt:  # e.g. a collective failing because another rank has already stopped
                reason = f"{stop.signal_name}: stopped ({type(error).__name__} on the way out: {error})"
                _say(reason.splitlines()[0] if reason.strip() else reason)
                raise RunInterrupted(stop.interrupt, reason) from None
            raise
        finally:
            stop.restore()
            if self.logger is not None:
                self.logger.close()
            if self.lock is not None:
                self.lock.release()

    # --- restore ---------------------------------------------------------------------------------------
    def _set_up(self) -> None:
        """Start the process group, lock the run folder, start DeepSpeed around the task, and restore where the run
        starts: fresh (from checkpoint.init_from's tower if set), an exact resume (same world size: optimizer,
        schedule, RNG, data position and logging window), or the fp32 weights of a run on another world size
        with a fresh optimizer."""
        cfg, task = self.cfg, self.task
        dist.discover_env()  # the rank, known before the process group starts (which can take a while)
        notes = self._lock_run_folder()
        dist.init()
        self.rank, self.world, self.device = dist.rank(), dist.world_size(), dist.device(self.cfg.train.device)
        torch.manual_seed(cfg.train.seed + self.rank)
        ds_config, ds_path = build_ds_config(cfg.train, self.world)
        self.accum = ds_config["gradient_accumulation_steps"]
        self.total_steps = task.total_steps()
        resume, meta, exact, resume_notes = self._resume_decision()
        notes.append(f"world size {self.world}, micro batch {cfg.train.micro_batch} x accumulation {self.accum} x "
                     f"{self.world} ranks = global batch {cfg.train.global_batch}; {effective_precision(cfg.train)}, "
                     f"ZeRO stage {ds_config['zero_optimization']['stage']} ({ds_path.name})")
        notes += resume_notes
        notes += precision_notes(cfg.train) + self._set_matmul_precision()
        notes += self._load_start_weights(resume, meta, exact)
        self._start_deepspeed(ds_config)
        self.step = int(meta["step"]) if resume else 0
        self.samples_seen = int(meta.get("samples_seen", 0)) if resume else 0
        self.window = _LogWindow()
        self.last_checkpoint = resume
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
        self.clock_started = False  # the throughput clock starts after this process's first optimizer step
        self.batches = iter(self.loader)
        self.fit_started = time.time()
        self.engine.train()

    def _set_matmul_precision(self) -> list[str]:
        """TF32 for an fp32 run's matrix products on CUDA (train.tf32), and the peak the MFU divides by (a GPU's,
        or MT_PEAK_TFLOPS for any device)."""
        train, on_gpu = self.cfg.train, self.device.type == "cuda"
        matmul = matmul_precision(effective_precision(train), train.tf32, on_gpu)
        if on_gpu:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = matmul == "tf32"
        elif "MT_PEAK_TFLOPS" not in os.environ:
            self.peak_flops = None
            return []
        self.peak_flops, source = peak_flops(matmul)
        return [f"MFU against {source}" if self.peak_flops else f"no MFU in the log: {source}"]

    def _lock_run_folder(self) -> list[str]:
        """Rank 0 takes RUN/.lock before the process group starts: RunFolderBusy at once when another run holds
        it. This run's other ranks then wait in the process group's start until their launcher stops them, as
        it does when any rank exits early (DeepSpeed's launcher, torchrun, srun --kill-on-bad-exit)."""
        if dist.is_main():
            self.lock = _RunLock(self.run_dir).acquire()
        return [self.lock.note] if self.lock is not None and self.lock.note else []

    def _resume_decision(self) -> tuple[Path | None, dict, bool, list[str]]:
        """(checkpoint to continue from or None, its meta.json, whether it resumes exactly (same world size), log
        notes). Rank 0 finds and checks the checkpoint (its files against its completion record, and the pickles
        of one named by checkpoint.resume=PATH) and every rank takes its answer, errors included."""
        found, report, error = None, [], None
        if dist.is_main():
            try:
                found = ckpt.resolve_resume(self.cfg.checkpoint.resume, self.ckpt_dir, report)
                if found is None and report:
                    raise ckpt.DamagedCheckpoint(f"no intact checkpoint under {self.ckpt_dir}: {'; '.join(report)}. "
                                                 "Move the damaged ones away to start over from an older one, or "
                                                 "start this run over with checkpoint.resume=none")
            except ConfigError as user_error:
                error = (type(user_error), str(user_error))
        found, report, error = dist.gather_objects(
            [(str(found) if found else None, report, error)] if dist.is_main() else [])[0]
        if error is not None:
            raise error[0](error[1])
        if found is None:
            return None, {}, False, []
        resume = Path(found)
        meta = ckpt.read_meta(resume)
        exact = meta.get("world_size") == self.world
        notes = list(report)
        applied, refused = resume_changes(meta.get("config") or {}, self.cfg.to_dict(), exact)
        written, running = meta.get("precision"), effective_precision(self.cfg.train)
        if exact and written and written != running:  # same train.precision, another machine (bf16 -> a CPU without)
            refused.append(f"it was trained in {written} and this machine runs train.precision="
                           f"{self.cfg.train.precision} as {running} (its optimizer files are {written}'s)")
        step = int(meta["step"])
        if self.total_steps < step:
            refused.append(f"the run would end at step {self.total_steps} (train.steps / task.epochs) but "
                           f"{resume.name} is at step {step}")
        if refused:
            raise ConfigError(f"{resume} was written with settings a resumed run cannot change: {'; '.join(refused)}."
                              " To train with them start a new run (another run.dir), or start this one over with "
                              "checkpoint.resume=none (its checkpoints are then replaced)")
        if applied:
            notes.append("resuming with changed settings: " + ", ".join(applied))
        return resume, meta, exact, notes

    def _load_start_weights(self, resume: Path | None, meta: dict, exact: bool) -> list[str]:
        """Weights loaded before DeepSpeed starts (an exact resume loads its own later); returns the log notes."""
        if resume and not exact:
            self.task.load_state_dict(ckpt.fp32_state_dict(resume))
            return [f"world size changed from {meta.get('world_size')} to {self.world}: resuming {resume.name} from "
                    "its fp32 weights with a fresh optimizer and data order (ZeRO partitions are per rank)"]
        init_from = self.cfg.checkpoint.init_from
        if not resume and init_from:
            passed_over: list[str] = []  # damaged checkpoints in a run folder given as init_from
            state, _ = ckpt.load_weights_file(init_from, passed_over)
            missing = self.task.load_tower_weights(state, init_from)
            heads = self.task.heads_from_checkpoint
            note = (f"initialised the tower from {init_from}"
                    + (f", with its {', '.join(heads)}; the task's other heads start new" if heads else
                       "; the task's heads start new")
                    + (f", and {len(missing)} tower tensors the checkpoint lacks" if missing else ""))
            return passed_over + [note]
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
        """Optimizer, schedule and weights from DeepSpeed's files; this rank's data position, logging window and
        RNG states from its rank file (read with weights_only). DeepSpeed's load_checkpoint unpickles its own
        files with weights_only=False, out of our hands: a checkpoint from elsewhere (checkpoint.resume=PATH) had
        its pickles checked first (checkpoint.check_pickles)."""
        self.engine.load_checkpoint(str(resume.parent), tag=resume.name, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
        rank_state = ckpt.load_rank_state(resume)
        if rank_state is not None:
            self.loader.load_state_dict(rank_state["loader"])
            if "log_window" in rank_state:  # checkpoints from before it was kept start an empty window
                self.window.load_state_dict(rank_state["log_window"])
            ckpt.set_rng_state(rank_state["rng"])

    # --- step ------------------------------------------------------------------------------------------
    def _optimizer_step(self) -> float:
        """One optimizer step of `accum` micro-steps (DeepSpeed steps the optimizer and the schedule on the
        last one). Returns the base lr this step used, read before the schedule moves on: DeepSpeed steps this
        optimizer (ZeRO wraps it) and the schedule sets the lrs of its groups."""
        lr = base_lr_group(self.optimizer)["lr"]
        ckpt.fault_point("loader", self.step + 1)
        for _ in range(self.accum):
            batch = dist.batch_to_device(next(self.batches), self.device)
            out = self.engine(batch)
            self.engine.backward(out["loss"])
            self.engine.step()
            self.window.add(out, self.cfg.train.micro_batch)
        self.task.after_optimizer_step()  # on every rank (the ITC temperature clamp; a collective under ZeRO)
        self.step += 1
        if not self.clock_started:  # start-up, JIT builds and the first batches stay out of the throughput
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.window.restart_clock()
            self.clock_started = True
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
        means, samples_per_s, tokens_per_s = self.window.reduce(self.device)
        scalars = {**means, "lr": lr}
        grad_norm = self.engine.get_global_grad_norm() if hasattr(self.engine, "get_global_grad_norm") else None
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        if samples_per_s is not None:
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
        ckpt.fault_point("eval", self.step)
        with self.window.untimed(), torch.no_grad():
            self.engine.eval()
            metrics = self.task.evaluate(self.rank, self.world, self.device)
            self.engine.train()
        if metrics:
            self.logger.log(self.step, {f"eval_{k}": v for k, v in metrics.items()})
            self._note(f"step {self.step} eval: " +
                       ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return metrics

    def _save(self) -> None:
        with self.window.untimed():
            self.last_checkpoint = ckpt.save(
                self.engine, self.ckpt_dir, self.step,
                meta={"samples_seen": self.samples_seen, "task": self.task.name, "config": self.cfg.to_dict(),
                      "precision": effective_precision(self.cfg.train)},
                rank_state={"loader": self.loader.state_dict(), "log_window": self.window.state_dict()},
                keep=self.cfg.checkpoint.keep)

    def _note(self, text: str) -> None:
        """A line in the console log (rank 0), above the progress bar."""
        self.logger.write_line(f"[{self.task.name}] {text}")

    # --- finish ----------------------------------------------------------------------------------------
    def _finish(self, preempted: bool, last_eval: dict) -> dict:
        """The summary (returned on every rank); rank 0 also writes curves.png and summary.json and prints it."""
        self.logger.close()
        summary = {"task": self.task.name, "steps": self.step, "total_steps": self.total_steps,
                   "samples_seen": self.samples_seen, "wall_s": round(time.time() - self.fit_started, 1),
                   "preempted": preempted, "checkpoint": str(self.last_checkpoint), **last_eval}
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
