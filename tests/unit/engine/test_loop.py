"""The training loop on one rank: real DeepSpeed (gloo), the real loader and the tiny tower, in a fresh process
per run (a process group, once torn down, cannot be started again in the same process), watched by torch's
optimizer-step hook."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
from pathlib import Path

import pytest

from conftest import REPO


def _fit(run_dir: str, shards: str, signal_in_step: int, out_file: str) -> None:
    """Run `Trainer.fit` on a one-rank process group (`signal_in_step`: send this process SIGUSR1 in the middle
    of that step's micro-steps, as SLURM does before the time limit); write what the optimizer saw."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from managertower.config import load_config
    from managertower.engine.loop import Trainer
    from managertower.tasks.pretrain import PretrainTask

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # 4 steps of 2 micro-steps each, 2 warm-up steps: the lr changes every step; new layers at 5x the base lr
    cfg = load_config(str(REPO / "pretrain/configs/tiny.yaml"), [
        f"run.dir={run_dir}", f"data.train_shards=[{shards}/coco/train-*.tar]", "data.val_shards=[]",
        "train.steps=4", "train.warmup=2", "train.global_batch=8", "train.micro_batch=4", "train.log_every=1",
        "train.eval_every=0", "train.new_layer_lr_mult=5", "checkpoint.every=100", "run.progress=false",
        "run.tensorboard=false"])
    trainer = Trainer(cfg, PretrainTask(cfg))
    stepped: dict[int, set] = {}  # step -> the lrs of the groups torch stepped in it (ZeRO steps group by group)

    def record(optimizer, args, kwargs):
        stepped.setdefault(trainer.step + 1, set()).update(group["lr"] for group in optimizer.param_groups)
        if trainer.step + 1 == signal_in_step:
            os.kill(os.getpid(), signal.SIGUSR1)

    handler_before = signal.getsignal(signal.SIGUSR1)
    hook = register_optimizer_step_pre_hook(record)
    summary = trainer.fit()
    hook.remove()
    torch.distributed.destroy_process_group()
    Path(out_file).write_text(json.dumps({
        "summary": summary, "lr": cfg.train.lr, "stepped": {step: sorted(lrs) for step, lrs in stepped.items()},
        "handler_given_back": signal.getsignal(signal.SIGUSR1) == handler_before}))


def _fit_in_a_fresh_process(run_dir: Path, shards: Path, name: str, signal_in_step: int = 0) -> dict:
    out_file = run_dir.parent / f"{name}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_fit, args=(str(run_dir), str(shards), signal_in_step, str(out_file)))
    process.start()
    process.join(timeout=600)
    assert process.exitcode == 0, f"the run failed (exit code {process.exitcode}); its output is above"
    result = json.loads(out_file.read_text())
    result["stepped"] = {int(step): lrs for step, lrs in result["stepped"].items()}
    return result


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_logged_lr_is_the_lr_the_optimizer_stepped_with(synthetic_world, tmp_path):
    run_dir = tmp_path / "run"
    result = _fit_in_a_fresh_process(run_dir, synthetic_world[1], "fit")
    stepped, lr = result["stepped"], result["lr"]
    assert result["summary"]["steps"] == 4 and sorted(stepped) == [1, 2, 3, 4]
    logged = {step: row["lr"] for step, row in _metrics(run_dir).items()}
    # each step logs the base group's lr (the experts', the smallest here) that the step used, not the next one's
    assert logged == {step: lrs[0] for step, lrs in stepped.items()}
    assert all(lrs[-1] == pytest.approx(5 * lrs[0]) for lrs in stepped.values())
    assert logged[1] == 0.0 and logged[2] == pytest.approx(lr / 2) and logged[3] == pytest.approx(lr)
    assert logged[3] > logged[4]  # warm-up from 0 over 2 steps (released), then the linear decay


@pytest.mark.slow  # two DeepSpeed runs in fresh processes, 1-1.5 min on two cores; the lr test above stays fast
def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint_and_the_run_resumes(synthetic_world, tmp_path,
                                                                                   capfd):
    run_dir = tmp_path / "run"
    first = _fit_in_a_fresh_process(run_dir, synthetic_world[1], "preempted", signal_in_step=2)
    assert first["summary"]["preempted"] and first["summary"]["steps"] == 2  # step 2 finished, then it stopped
    assert (run_dir / "checkpoints" / "step-2" / "COMPLETE").exists()
    assert "SIGUSR1 received: checkpoint saved at step 2" in capfd.readouterr().out
    assert first["handler_given_back"]  # the signal handlers are restored once the run is over

    requeued = _fit_in_a_fresh_process(run_dir, synthetic_world[1], "requeued")
    assert not requeued["summary"]["preempted"] and requeued["summary"]["steps"] == 4
    assert sorted(requeued["stepped"]) == [3, 4]  # it continued from step 2's checkpoint
    assert "resumed from" in capfd.readouterr().out
    assert sorted(_metrics(run_dir)) == [1, 2, 3, 4]
