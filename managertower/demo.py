"""`make demo`: the main job end to end on the embedded synthetic data, about ten minutes on 2 CPU cores.

    synthetic raw data (real formats) -> dataprep shards -> DeepSpeed pre-training on two local ranks
    -> fp32 export -> batch fine-tuning of every task -> results table

Everything lands under --out (default runs/demo). Each stage is skipped when its output is complete, and
pre-training resumes from its checkpoints, so an interrupted demo picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def rank_env(ranks: int) -> dict:
    """Environment for local CPU ranks: DeepSpeed's CPU accelerator, one core's share each."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // ranks))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def launch(module: str, args: list[str], ranks: int, log_file: Path | None = None) -> None:
    """`deepspeed --num_gpus RANKS --module MODULE ARGS` (plain python for one rank)."""
    if ranks > 1:
        command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
                   "--master_port", str(29500 + os.getpid() % 1000), "--module", module, *args]
    else:
        command = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=rank_env(ranks), check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m managertower.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--size", default="demo", help="synthetic world size (dataprep synthetic --size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the tiny recipe's steps")
    parser.add_argument("--skip-finetune", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    raw, shards, pretrain_dir = out / "raw", out / "shards", out / "pretrain"
    started = time.time()
    timings = {}

    from managertower.data.synthetic import shard_world, write_world

    t = _stage("1/4 synthetic raw data in the real formats")
    if not (raw / ".complete").exists():
        write_world(raw, seed=args.seed, size=args.size)
        (raw / ".complete").write_text("")
    timings["synthetic data"] = time.time() - t

    t = _stage("2/4 dataprep: raw -> WebDataset shards")
    if not (shards / ".complete").exists():
        shard_world(raw, shards, workers=2)
        (shards / ".complete").write_text("")
    timings["dataprep"] = time.time() - t

    t = _stage(f"3/4 pre-training (DeepSpeed, {args.ranks} local ranks)")
    overrides = [f"run.dir={pretrain_dir}", f"data.train_shards=[{shards}/coco/train-*.tar]",
                 f"data.val_shards=[{shards}/coco/test-*.tar]"]
    if args.pretrain_steps:
        overrides.append(f"train.steps={args.pretrain_steps}")
    launch("pretrain", ["--config", str(REPO / "pretrain/configs/tiny.yaml"), *overrides], args.ranks)
    export = pretrain_dir / "export" / "model_fp32.pt"
    launch("pretrain", ["export", str(pretrain_dir), "--out", str(export)], 1)
    timings["pre-training"] = time.time() - t

    results = []
    if not args.skip_finetune:
        t = _stage("4/4 batch fine-tuning of every task")
        launch("finetune.batch", [str(REPO / "finetune/jobs/demo.yaml"), "--out", str(out / "finetune"),
                                  f"init_from={export}", f"shards={shards}"], 1)
        results_file = out / "finetune" / "results.json"
        if results_file.exists():
            results = json.loads(results_file.read_text())
            (out / "results.json").write_text(json.dumps(results, indent=1))
            md = out / "finetune" / "results.md"
            if md.exists():
                (out / "results.md").write_text(md.read_text())
        timings["fine-tuning"] = time.time() - t

    summary = json.loads((pretrain_dir / "summary.json").read_text())
    print("\n=== demo summary ===")
    for key in ("steps", "acc_itm", "acc_itm_hard", "wall_s"):
        if key in summary:
            print(f"  pre-training {key:<14} {summary[key]}")
    if results:
        print(f"\n  {'task':<10} {'split':<8} {'metric':<10} {'value':>8}")
        for row in results:
            print(f"  {row['task']:<10} {row['split']:<8} {row['metric']:<10} {row['value']:>8.4f}")
    for stage, seconds in timings.items():
        print(f"  {stage:<16} {seconds:7.1f} s")
    print(f"  total            {time.time() - started:7.1f} s   (outputs under {out})")
    print(f"  pictures: {pretrain_dir / 'curves.png'}, {pretrain_dir / 'manager_weights.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
