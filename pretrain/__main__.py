"""Pre-train ManagerTower with MLM + ITM.

Every launch mode runs this same entry point:

    python -m pretrain --config pretrain/configs/tiny.yaml run.dir=runs/x           # one process
    deepspeed --num_gpus 8 --module pretrain --config pretrain/configs/base.yaml    # one node, 8 ranks
    deepspeed --hostfile hosts --module pretrain --config pretrain/configs/base.yaml  # many nodes (pdsh/ssh)
    torchrun --nproc_per_node 8 -m pretrain --config pretrain/configs/base.yaml
    srun python -m pretrain --config ...                                             # SLURM, one task per GPU
    sbatch cluster/slurm/pretrain.sbatch                                             # see cluster/README.md

Overrides are dotted recipe keys (`train.steps=10 data.train_shards=[a,b]`); `--print-keys` lists them.
`resume=auto` (the default) continues from the newest complete checkpoint in RUN/checkpoints.

    python -m pretrain export RUN_DIR [--out FILE]    # one fp32 file for fine-tuning (zero_to_fp32)
    python -m pretrain export RUN_DIR --format hf --out DIR              # a weights folder (docs/weights.md)
    python -m pretrain export RUN_DIR --format hf-bridgetower --out DIR  # transformers' BridgeTower folder
"""
from __future__ import annotations

import argparse
import sys

from doors.recipe import USER_ERRORS, add_recipe_options, resolve_config, user_error
from managertower.config import ConfigError, load_config
from managertower.console import silence_known_warnings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    silence_known_warnings()
    if argv and argv[0] == "export":
        return export(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=False, help="a recipe YAML (pretrain/configs/*.yaml)")
    add_recipe_options(parser, "train.steps=100")
    args = parser.parse_intermixed_args(argv)
    cfg = resolve_config(lambda: load_config(args.config, args.overrides), args.print_keys, args.print_config)
    if isinstance(cfg, int):
        return cfg
    return run(cfg)


def run(cfg) -> int:
    from managertower.engine.loop import Trainer
    from managertower.tasks.pretrain import PretrainTask

    try:
        if not cfg.data.train_shards:
            raise ConfigError("data.train_shards is empty: give the shard folders `python -m dataprep` wrote, "
                              "e.g. data.train_shards=[shards/coco,shards/vg]")
        from managertower.data.shards import expand_shards

        for spec in [*cfg.data.train_shards, *cfg.data.val_shards]:
            expand_shards(spec)  # a wrong path fails here, before DeepSpeed and DALI start
        task = PretrainTask(cfg)
        summary = Trainer(cfg, task).fit()
    except USER_ERRORS as err:
        return user_error(err)
    return 0 if summary else 1


EXPORT_DEFAULTS = {"fp32": "model_fp32.pt", "hf": "hf", "hf-bridgetower": "hf-bridgetower"}  # under RUN/export/


def export(argv: list[str]) -> int:
    from pathlib import Path

    from managertower.engine import checkpoint as ckpt
    from managertower.hf_export import export_run

    parser = argparse.ArgumentParser(
        prog="python -m pretrain export",
        description="Export a run's newest checkpoint: fp32 (default) one .pt file for fine-tuning; hf a weights "
                    "folder (config.json, model.safetensors, tokenizer, model card; ManagerTower.from_pretrained "
                    "reads it); hf-bridgetower a folder transformers' BridgeTowerForMaskedLM.from_pretrained reads "
                    "(model.manager=bridgetower). docs/weights.md.")
    parser.add_argument("source", help="a run folder, its checkpoints/ folder, or a step-N folder")
    parser.add_argument("--format", choices=list(EXPORT_DEFAULTS), default="fp32")
    parser.add_argument("--out", default=None, help="default: RUN/export/model_fp32.pt, RUN/export/hf or "
                                                    "RUN/export/hf-bridgetower")
    args = parser.parse_args(argv)
    try:
        folder = ckpt.find_checkpoint(args.source)
        run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
        out = Path(args.out) if args.out else run_dir / "export" / EXPORT_DEFAULTS[args.format]
        export_run(folder, out, args.format)
    except USER_ERRORS as err:
        return user_error(err)
    print(f"exported {folder} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
