"""Tasks: pre-training and the fine-tuning tasks, by `task.name`.

    from managertower.tasks import build_task
    task = build_task(cfg)        # cfg.task.name: pretrain, vqav2, nlvr2, snli_ve, flickr30k, coco
"""
from __future__ import annotations

import importlib

from ..config import FINETUNE_TASKS, TASK_NAMES, ConfigError  # noqa: F401 (FINETUNE_TASKS: re-exported)

# task.name -> (module, class), one entry per config.TASK_NAMES; imported on demand so `import managertower.tasks`
# stays light.
TASKS = {
    "pretrain": ("pretrain", "PretrainTask"),
    "vqav2": ("vqa", "VQATask"),
    "nlvr2": ("nlvr2", "NLVR2Task"),
    "snli_ve": ("snli_ve", "SNLIVETask"),
    "flickr30k": ("retrieval", "Flickr30KTask"),
    "coco": ("retrieval", "COCORetrievalTask"),
}
if set(TASKS) != set(TASK_NAMES):  # a task added to one list and not the other fails at import, not mid-run
    raise ImportError(f"managertower.tasks.TASKS names {sorted(TASKS)} but config.TASK_NAMES {sorted(TASK_NAMES)}")


def task_class(name: str):
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not one of {', '.join(TASK_NAMES)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def build_task(cfg):
    return task_class(cfg.task.name)(cfg)
