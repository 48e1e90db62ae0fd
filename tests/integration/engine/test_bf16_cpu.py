"""bf16 training through DeepSpeed's bf16 engine on this CPU (DS_ACCELERATOR=cpu, gloo), where the CPU has bf16
instructions (deepspeed_config.cpu_has_bf16; skipped elsewhere, where train.precision=bf16 runs fp32).

What a GPU run in bf16 relies on, shown on the CPU: the module in bf16 with fp32 master weights in the optimizer,
the managers' softmax in fp32, the `bf16_zero_pp_rank_*` optimizer files of a bf16 ZeRO checkpoint, an exact
resume from them, and the export of the fp32 master weights (not the bf16-rounded module's).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, launcher_command, rank_env
from managertower.engine.deepspeed_config import cpu_has_bf16

# Two or three DeepSpeed runs in fresh processes per test: minutes on two cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions: bf16 runs fp32")]

LOSSES = ("loss", "loss_mlm", "loss_itm", "loss_itc", "acc_itm", "acc_mlm", "grad_norm")


def _fit(run_dir: str, shards: str, overrides: list[str], out_file: str) -> None:
    """Trainer.fit on a one-rank process group (bf16, 4 steps of 2 micro-steps, a checkpoint every 2 steps), and
    what the engine ran: the module's dtypes, DeepSpeed's optimizer, the dtypes the softmaxes saw."""
    import torch

    from managertower import dist
    from managertower.config import load_config
    from managertower.engine.loop import Trainer
    from managertower.tasks.pretrain import PretrainTask

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(dist.free_port()))
    cfg = load_config(str(REPO / "pretrain/configs/tiny.yaml"), [
        f"run.dir={run_dir}", f"data.train_shards=[{shards}/coco/train-*.tar]", "data.val_shards=[]",
        "train.precision=bf16", "train.steps=4", "train.warmup=2", "train.global_batch=8", "train.micro_batch=4",
        "train.log_every=1", "train.eval_every=0", "checkpoint.every=2", "checkpoint.keep=5", "run.progress=false",
        "run.tensorboard=false", *overrides])
    trainer = Trainer(cfg, PretrainTask(cfg))
    softmax_dtypes: set[str] = set()
    real_softmax = torch.softmax

    def softmax(x, *args, **kwargs):  # the managers' layer weights (attention goes through its own kernels)
        softmax_dtypes.add(str(x.dtype))
        return real_softmax(x, *args, **kwargs)

    torch.softmax = softmax
    try:
        summary = trainer.fit()
    finally:
        torch.softmax = real_softmax
    Path(out_file).write_text(json.dumps({
        "summary": summary, "softmax_dtypes": sorted(softmax_dtypes),
        "module_dtypes": sorted({str(p.dtype) for p in trainer.engine.module.parameters()}),
        "optimizer": type(trainer.engine.optimizer).__name__}))
    torch.distributed.destroy_process_group()


def _fit_in_a_fresh_process(run_dir: Path, shards: Path, *overrides: str) -> dict:
    out_file = run_dir.parent / f"{run_dir.name}.json"
    process = multiprocessing.get_context("spawn").Process(
        target=_fit, args=(str(run_dir), str(shards), list(overrides), str(out_file)))
    process.start()
    process.join(timeout=900)
    assert process.exitcode == 0, f"the run failed (exit code {process.exitcode}); its output is above"
    return json.loads(out_file.read_text())


def _metrics(run_dir: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in row}


def _module_weights(step_dir: Path) -> dict:
    """The bf16 module weights DeepSpeed saved (mp_rank_00_model_states.pt), read without unpickling objects."""
    from managertower.engine.checkpoint import DEEPSPEED_GLOBALS, load_plain

    return load_plain(step_dir / "mp_rank_00_model_states.pt", allow=DEEPSPEED_GLOBALS)["module"]


def _assert_fp32_master_weights(step_dir: Path) -> dict:
    """The export of a bf16 checkpoint: every floating tensor fp32, each the master weight the bf16 module weight
    was rounded from, and not itself bf16-rounded (the master keeps the updates bf16 cannot hold)."""
    import torch

    from managertower.engine.checkpoint import fp32_state_dict

    master, module = fp32_state_dict(step_dir), _module_weights(step_dir)
    assert set(master) == set(module)
    floating = {key: value for key, value in master.items() if value.is_floating_point()}
    assert floating and all(value.dtype == torch.float32 for value in floating.values())
    assert all(module[key].dtype == torch.bfloat16 for key in floating)
    for key, value in floating.items():
        assert torch.equal(value.to(torch.bfloat16), module[key]), key
    finer = [key for key, value in floating.items() if not torch.equal(value.to(torch.bfloat16).float(), value)]
    assert len(finer) > len(floating) // 2, f"only {len(finer)} of {len(floating)} weights finer than bf16"
    return master


def test_bf16_zero2_trains_saves_resumes_exactly_and_exports_fp32_master_weights(synthetic_world, tmp_path):
    import torch

    shards = synthetic_world[1]
    whole = _fit_in_a_fresh_process(tmp_path / "whole", shards)
    assert whole["summary"]["steps"] == 4
    assert whole["module_dtypes"] == ["torch.bfloat16"] and whole["optimizer"] == "DeepSpeedZeroOptimizer"
    assert "torch.float32" in whole["softmax_dtypes"]  # the managers' weights (the model itself runs bf16)
    rows = _metrics(tmp_path / "whole")
    assert sorted(rows) == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows.values())
    step2, step4 = (tmp_path / "whole" / "checkpoints" / f"step-{n}" for n in (2, 4))
    for step_dir in (step2, step4):  # bf16 ZeRO-1/2's names for the optimizer partitions with the fp32 master
        assert [p.name for p in step_dir.glob("*optim_states.pt")] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    master = _assert_fp32_master_weights(step4)

    # a new run continuing from step 2 of the first: steps 3 and 4 again, to the bit
    resumed = _fit_in_a_fresh_process(tmp_path / "resumed", shards, f"checkpoint.resume={step2}")
    assert resumed["summary"]["steps"] == 4
    again = _metrics(tmp_path / "resumed")
    assert sorted(again) == [3, 4]
    for step in (3, 4):
        for key in LOSSES:
            assert again[step][key] == rows[step][key], (step, key, again[step][key], rows[step][key])
    master_again = _assert_fp32_master_weights(tmp_path / "resumed" / "checkpoints" / "step-4")
    assert all(torch.equal(master_again[key], master[key]) for key in master)


def test_bf16_zero1_on_two_ranks_exports_the_fp32_master_weights(synthetic_world, tmp_path):
    """bf16 at ZeRO stage 1 runs DeepSpeed's BF16_Optimizer, whose optimizer files zero_to_fp32 refuses ("not a
    zero checkpoint"): the export merges the two ranks' slices of the fp32 master vectors itself (a wrong order or
    offset would break the rounding check against the bf16 module weights)."""
    import torch

    from managertower import dist

    shards, run_dir = synthetic_world[1], tmp_path / "zero1"
    command = launcher_command("pretrain", [
        "--config", str(REPO / "pretrain/configs/tiny.yaml"), f"run.dir={run_dir}",
        f"data.train_shards=[{shards}/coco/train-*.tar]", "data.val_shards=[]", "train.precision=bf16",
        "train.zero_stage=1", "train.steps=3", "train.warmup=1", "train.global_batch=16", "train.micro_batch=8",
        "train.log_every=1", "train.eval_every=0", "checkpoint.every=3", "run.progress=false",
        "run.tensorboard=false"], ranks=2, master_port=dist.free_port())
    result = subprocess.run(command, cwd=REPO, env=rank_env(2), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "; bf16, ZeRO stage 1" in result.stdout + result.stderr
    step_dir = run_dir / "checkpoints" / "step-3"
    assert sorted(p.name for p in step_dir.glob("*optim_states.pt")) == [
        f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    master = _assert_fp32_master_weights(step_dir)
    export = tmp_path / "zero1.pt"
    result = subprocess.run([sys.executable, "-m", "pretrain", "export", str(run_dir), "--out", str(export)],
                            cwd=REPO, env=rank_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    exported = torch.load(export, weights_only=True)["state_dict"]
    assert set(exported) == set(master) and all(torch.equal(exported[key], master[key]) for key in master)
