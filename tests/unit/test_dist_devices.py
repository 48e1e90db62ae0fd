"""Which device a rank runs on, and where collectives get their tensors (the GPU under NCCL, the CPU under gloo)."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from managertower import dist
from managertower.config import ConfigError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    return monkeypatch


def test_a_launch_that_asked_for_gpus_fails_loudly_without_one(no_cuda):
    assert dist.device() == torch.device("cpu")
    no_cuda.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # deepspeed --num_gpus 2, or SLURM --gpus
    with pytest.raises(ConfigError, match=r"asked for GPUs.*CUDA build"):
        dist.device()
    no_cuda.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator: the CPU on purpose
    assert dist.device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda"):
        dist.device("cuda")
    assert dist.device("cpu") == torch.device("cpu")


def test_auto_follows_deepspeeds_cpu_accelerator_on_a_gpu_machine(monkeypatch):
    """`make demo` / the tests set DS_ACCELERATOR=cpu: on a GPU node the batches must not go to cuda:0 while
    DeepSpeed runs on its CPU accelerator."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert dist.device() == torch.device("cpu")
    monkeypatch.delenv("DS_ACCELERATOR")
    assert dist.device() == torch.device("cuda", 0)


def test_cpu_on_a_gpu_machine_needs_the_cpu_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(ConfigError, match="DS_ACCELERATOR=cpu"):
        dist.device("cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert dist.device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("count,local,expected", [(8, 3, 3), (1, 5, 0), (2, 1, 1)])
def test_each_rank_takes_its_visible_gpu(monkeypatch, count, local, expected):
    """`srun --gpus-per-task=1` shows each rank one device (cuda:0) whatever its LOCAL_RANK."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", str(local))
    assert dist.device() == torch.device("cuda", expected)


def test_more_ranks_than_visible_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with pytest.raises(ConfigError, match="LOCAL_RANK=3 but this process sees 2 GPUs"):
        dist.device()


def test_nccl_collectives_run_on_the_rank_gpu(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "device", lambda requested="auto": torch.device("cuda", 3))
    assert dist.collective_device() == torch.device("cuda", 3)


def _collectives(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    seen = []
    real_all_reduce, real_all_gather = torch.distributed.all_reduce, torch.distributed.all_gather

    def checked(real):
        def call(first, *args, **kwargs):
            tensors = first if isinstance(first, list) else [first]
            seen.extend(str(t.device) for t in tensors + [a for a in args if isinstance(a, torch.Tensor)])
            return real(first, *args, **kwargs)
        return call

    torch.distributed.all_reduce, torch.distributed.all_gather = checked(real_all_reduce), checked(real_all_gather)
    total = dist.all_reduce_sum(torch.tensor([1.0 + rank], dtype=torch.float64))
    rows = dist.gather_rows(torch.arange(rank + 1))
    features = torch.ones(rank + 1, 2, requires_grad=True)
    dist.gather_with_grad(features).sum().backward()
    peak = dist.all_reduce_max(float(rank))
    out[rank] = (total.tolist(), rows.tolist(), features.grad.tolist(), peak, sorted(set(seen)),
                 str(dist.collective_device()))
    torch.distributed.destroy_process_group()


def test_every_collective_gets_the_backend_device():
    """A checking wrapper around the gloo collectives: every tensor they receive is on collective_device()."""
    out = mp.Manager().dict()
    mp.spawn(_collectives, args=(dist.free_port(), out), nprocs=2)
    for rank in (0, 1):
        total, rows, grad, peak, devices, backend_device = out[rank]
        assert total == [3.0] and rows == [0, 0, 1] and peak == 1.0
        assert grad == [[2.0, 2.0]] * (rank + 1)  # both ranks' losses read every row
        assert devices == [backend_device] == ["cpu"]
