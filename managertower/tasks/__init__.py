"""Tasks: pre-training and the fine-tuning tasks, by `task.name`.

    from managertower.tasks import build_task
    task = build_task(cfg)        # cfg.task.name: pretrain, vqav2, nlvr2, snli_ve, flickr30k, coco
"""
from __future__ import annotations

import importlib

# task.name -> (module, class); imported on demand so `import managertower.tasks` stays light.
TASKS = {
    "pretrain": ("pretrain", "PretrainTask"),
    "vqav2": ("vqa", "VQATask"),
    "nlvr2": ("nlvr2", "NLVR2Task"),
    "snli_ve": ("snli_ve", "SNLIVETask"),
    "flickr30k": ("retrieval", "Flickr30KTask"),
    "coco": ("retrieval", "COCORetrievalTask"),
}
FINETUNE_TASKS = ("vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")


def task_class(name: str):
    if name not in TASKS:
        from ..config import ConfigError

        raise ConfigError(f"task {name!r} is not one of {', '.join(TASKS)}")
    module, cls = TASKS[name]
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def build_task(cfg):
    return task_class(cfg.task.name)(cfg)
