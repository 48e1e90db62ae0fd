"""Fine-tune ManagerTower on VQAv2, NLVR2, SNLI-VE or Flickr30K / COCO retrieval (the paper, Appendix A.2).

Every launch mode runs this same entry point:

    python -m finetune --task vqav2 --from runs/pretrain run.dir=runs/ft/vqa          # one process
    python -m finetune --task nlvr2 --config finetune/configs/tiny_nlvr2.yaml --from runs/demo/pretrain
    deepspeed --num_gpus 8 --module finetune --task flickr30k --from ckpt.pt           # one node, 8 ranks
    torchrun --nproc_per_node 8 -m finetune --task snli_ve --from ckpt.pt
    python -m finetune.batch finetune/jobs/paper.yaml                                  # the paper's whole batch

--config defaults to finetune/configs/TASK.yaml (the paper's recipe). --from is a pre-trained checkpoint: a
pre-training run folder, a DeepSpeed step-N folder, or the fp32 file `python -m pretrain export RUN` writes
(the vision position embeddings are resized to the task's resolution; the task's heads start new). Without
--from the tower starts from the recipe's experts and a random cross-modal encoder.
Overrides are dotted recipe keys (`train.lr=1e-5 task.epochs=1`); `--print-keys` lists them.
`checkpoint.resume=auto` (the default) continues a killed run from its newest checkpoint in RUN/checkpoints.
Outputs in RUN (run.dir, default runs/finetune/TASK): metrics.jsonl, summary.json (with the final metrics),
tensorboard/, checkpoints/ and the predictions file of the eval split (VQAv2 server JSON, NLVR2 CSV, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from doors.recipe import USER_ERRORS, add_recipe_options, resolve_config, user_error
from managertower.config import ConfigError, load_config
from managertower.console import silence_known_warnings

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
from managertower.config import FINETUNE_TASKS as TASK_NAMES  # noqa: E402 (the tasks, listed once in config)


def default_recipe(task: str) -> str:
    return os.path.join(CONFIG_DIR, f"{task}.yaml")


def build_config(task: str | None, config: str | None, init_from: str | None, overrides: list[str]):
    """The effective config: recipe (default finetune/configs/TASK.yaml), then --task / --from, then overrides."""
    if task is not None and task not in TASK_NAMES:
        raise ConfigError(f"--task {task!r} is not one of {', '.join(TASK_NAMES)}")
    if config is None:
        if task is None:
            raise ConfigError("give --task (one of " + ", ".join(TASK_NAMES) + ") or --config RECIPE")
        config = default_recipe(task)
    head: list[str] = []
    if task is not None:
        head.append(f"task.name={task}")
    if init_from is not None:
        if not os.path.exists(init_from):
            raise ConfigError(f"--from {init_from!r} does not exist: give a pre-training run folder, a step-N "
                              "folder, an exported .pt file or a weights folder (docs/weights.md)")
        from managertower.hf_export import is_weights_folder

        if os.path.isdir(init_from) and not is_weights_folder(init_from):
            from managertower.engine.checkpoint import find_checkpoint

            find_checkpoint(init_from)  # a folder without a complete checkpoint fails here, before DeepSpeed starts
        head.append(f"checkpoint.init_from={init_from}")
    cfg = load_config(config, head + list(overrides))
    if cfg.task.name not in TASK_NAMES:
        raise ConfigError(f"{config} sets task.name={cfg.task.name!r}; fine-tuning needs one of {', '.join(TASK_NAMES)}"
                          " (--task T)")
    if task is not None and cfg.task.name != task:
        raise ConfigError(f"--task {task} but the overrides set task.name={cfg.task.name}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASK_NAMES, help="the task (picks the default recipe)")
    parser.add_argument("--config", help="a recipe YAML (default finetune/configs/TASK.yaml)")
    parser.add_argument("--from", dest="init_from", help="pre-trained checkpoint: run folder, step-N folder or .pt")
    add_recipe_options(parser, "train.lr=1e-5")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    silence_known_warnings()
    cfg = resolve_config(lambda: build_config(args.task, args.config, args.init_from, args.overrides),
                         args.print_keys, args.print_config)
    if isinstance(cfg, int):
        return cfg
    summary = run(cfg)
    return 0 if summary else (2 if summary is None else 1)


def run(cfg) -> dict | None:
    """Fine-tune with `cfg`; returns the run's summary (None after a user error, already printed)."""
    from managertower.engine.loop import Trainer
    from managertower.tasks import build_task

    try:
        task = build_task(cfg)
        return Trainer(cfg, task).fit()
    except USER_ERRORS as err:
        user_error(err)
        return None


if __name__ == "__main__":
    sys.exit(main())
