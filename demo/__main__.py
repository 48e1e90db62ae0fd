"""`make demo`: the main job end to end on the embedded synthetic data, about ten minutes on 2 CPU cores.

    python -m demo --out runs/demo              # what `make demo` runs
    python -m demo --pretrain-steps 20 --skip-finetune --out /tmp/demo-quick

    synthetic raw data (real formats) -> dataprep shards -> DeepSpeed pre-training on two local ranks
    -> fp32 export -> batch fine-tuning of every task -> results table

Everything lands under --out (default runs/demo). Each stage is skipped when its output is complete, and
pre-training resumes from its checkpoints, so an interrupted demo picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from managertower.console import silence_known_warnings
from managertower.io import atomic_write
from managertower.launch import REPO, launcher_command, local_master_port, rank_env

PRETRAIN_PORT_SALT = 1000  # the batch salts its launches' ports with job indices


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.time()


def launch(module: str, args: list[str], ranks: int) -> None:
    """`deepspeed --num_gpus RANKS --module MODULE ARGS` (plain python for one rank), from the repository. Its
    rendezvous port is not the one the fine-tuning batch, in this process too, gives its first launch (salt 0)."""
    command = launcher_command(module, args, ranks, master_port=local_master_port(salt=PRETRAIN_PORT_SALT))
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=rank_env(ranks), check=True)


def in_process(module: str, main, args: list[str]) -> None:
    """`python -m MODULE ARGS` for a door that starts no ranks itself, run in this process: the same code without
    another interpreter importing torch and DeepSpeed (seconds of CPU each)."""
    print(f"$ python -m {module} " + " ".join(args), flush=True)
    code = main(args)
    if code:
        raise SystemExit(f"python -m {module} failed with exit status {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="where every stage writes (default runs/demo)")
    parser.add_argument("--size", default="demo", help="synthetic world size (dataprep synthetic --size)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic world's seed")
    parser.add_argument("--ranks", type=int, default=2, help="local ranks for pre-training (default 2)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the tiny recipe's steps")
    parser.add_argument("--skip-finetune", action="store_true", help="stop after pre-training and its export")
    args = parser.parse_args(argv)
    silence_known_warnings()
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
    from pretrain.__main__ import main as pretrain_main

    in_process("pretrain", pretrain_main, ["export", str(pretrain_dir), "--out", str(export)])
    timings["pre-training"] = time.time() - t

    results = []
    if not args.skip_finetune:
        t = _stage("4/4 batch fine-tuning of every task")
        from finetune.batch import main as batch_main

        in_process("finetune.batch", batch_main, [str(REPO / "finetune/jobs/demo.yaml"), "--out",
                                                  str(out / "finetune"), f"init_from={export}", f"shards={shards}"])
        results_file = out / "finetune" / "results.json"
        if results_file.exists():
            results = json.loads(results_file.read_text())
            atomic_write(out / "results.json", json.dumps(results, indent=1))
            md = out / "finetune" / "results.md"
            if md.exists():
                atomic_write(out / "results.md", md.read_text())
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
