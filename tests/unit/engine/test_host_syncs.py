"""A training micro-step never waits for the device: no op in the task's forward and backward, nor in the loop's
logging window, reads a tensor back to the host (`.item()`, `int()`, `float()`, `if tensor`) or needs a result's
size from the device (boolean-mask indexing, nonzero). On a GPU each of those stalls the CPU until the queued
kernels finish, every micro-step. Counted with a torch dispatch mode on the CPU, where the same ops run."""
from __future__ import annotations

import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import REPO
from managertower.config import load_config
from managertower.data.collate import mlm_selection
from managertower.engine import loop
from managertower.tasks import build_task
from managertower.tasks.pretrain import PretrainTask

aten = torch.ops.aten
# Ops that read a value back (item, int, float, bool) or whose output size depends on tensor values.
READ_BACK = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default,
             aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default,
             aten.repeat_interleave.Tensor}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


# Tensor methods that copy to the host: no op on a CPU tensor (so no dispatch to see), a wait on a GPU one.
TO_HOST = ("tolist", "numpy", "cpu")


class HostSyncs(TorchDispatchMode):
    """Records every op that would make the host wait for the device, with the project line that called it."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.methods = {name: getattr(torch.Tensor, name) for name in TO_HOST}
        self.own = {name for name in TO_HOST if name in vars(torch.Tensor)}

    def __enter__(self):
        for name, method in self.methods.items():
            setattr(torch.Tensor, name, self._recording(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self.methods.items():
            if name in self.own:
                setattr(torch.Tensor, name, method)
            else:  # inherited from the C base class: remove the shadowing attribute
                delattr(torch.Tensor, name)
        return super().__exit__(*exc)

    def _recording(self, name, method):
        def call(tensor, *args, **kwargs):
            self.seen.append(f"Tensor.{name} at {self.caller()}")
            return method(tensor, *args, **kwargs)
        return call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READ_BACK:
            self.seen.append(f"{func} at {self.caller()}")
        elif func in INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                self.seen.append(f"{func} with a boolean mask at {self.caller()}")
        return func(*args, **kwargs)

    @staticmethod
    def caller() -> str:
        frames = [f for f in traceback.extract_stack()
                  if "/managertower/" in f.filename or ("/tests/" in f.filename and __file__ not in f.filename)]
        return f"{frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else "?"


def micro_step(task, batch: dict) -> list[str]:
    """Forward, backward and the logging window's sums, as the loop's micro-step runs them."""
    window = loop._LogWindow()
    with HostSyncs() as syncs:
        out = task(batch)
        out["loss"].backward()
        window.add(out, batch["pixel_values"].shape[0])
    return syncs.seen


def test_the_counter_sees_each_kind_of_host_sync():
    x = torch.arange(6.0)
    cases = {"item": lambda: x.sum().item(), "int": lambda: int(x.sum()), "float": lambda: float(x[0]),
             "tolist": lambda: x.tolist(), "cpu": lambda: x.cpu(), "equal": lambda: torch.equal(x, x),
             "bool": lambda: bool(x.any()), "mask": lambda: x[x > 2], "nonzero": lambda: x.nonzero(),
             "masked assignment": lambda: x.clone().__setitem__(x > 2, 0.0)}
    for name, case in cases.items():
        with HostSyncs() as syncs:
            case()
        assert syncs.seen, name
    with HostSyncs() as syncs:  # device-side arithmetic, integer gathers and a logging window's sums
        window = loop._LogWindow()
        window.add({"loss": x.sum(), "acc": (x > 2).float().mean(), "batch_size": 6, "tokens": x.sum()}, 6)
        x[torch.tensor([1, 3])].sum()
    assert syncs.seen == []


def test_a_pretraining_micro_step_has_no_host_sync():
    torch.manual_seed(0)
    task = PretrainTask(load_config(None, ["model.size=tiny"]))
    generator = torch.Generator().manual_seed(0)
    size, length = 6, 12
    ids = torch.randint(5, task.model.text_expert.vocab_size, (size, length), generator=generator)
    mask = torch.ones(size, length, dtype=torch.long)
    mask[0, 8:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    index = torch.tensor([0, 2, 2, 3, 1, 5])
    batch = {"pixel_values": torch.randn(size, 3, 64, 64, generator=generator), "input_ids": ids,
             "attention_mask": mask, "mlm_input_ids": torch.where(labels >= 0, 4, ids), "mlm_labels": labels,
             "itm_image_index": index, "itm_labels": (index == torch.arange(size)).long(),
             **dict(zip(("mlm_positions", "mlm_targets"), mlm_selection(labels)))}
    task.train()
    assert micro_step(task, batch) == []


EVAL_SPLIT = {"vqav2": "val", "nlvr2": "dev", "snli_ve": "dev", "flickr30k": "test"}


@pytest.mark.parametrize("name", ["vqav2", "nlvr2", "snli_ve", "flickr30k"])
def test_a_finetuning_micro_step_has_no_host_sync(name, synthetic_world, tmp_path):
    torch.manual_seed(0)
    shards = synthetic_world[1] / name
    task = build_task(load_config(str(REPO / f"finetune/configs/tiny_{name}.yaml"), [
        f"task.train_shards=[{shards}/train-*.tar]", f"task.eval_shards=[{shards}/{EVAL_SPLIT[name]}-*.tar]",
        f"run.dir={tmp_path}", "train.micro_batch=8", "train.global_batch=8"]))
    loader = task.build_loader("train", 0, 1, torch.device("cpu"))
    batch = next(iter(loader))
    loader.close()
    task.train()
    assert micro_step(task, batch) == []
