"""Rank discovery and process groups, whoever started us: deepspeed, torchrun, srun or mpirun.

The deepspeed launcher and torchrun set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under
`srun python -m pretrain` SLURM sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID instead, and under mpirun
Open MPI sets OMPI_COMM_WORLD_*; both are mapped onto the torch names. A plain `python -m pretrain` is rank 0
of a world of one.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch

from .config import ConfigError

_FALLBACKS = {
    "RANK": ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
    "WORLD_SIZE": ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
    "LOCAL_RANK": ("SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"),
}


def free_port() -> int:
    """A TCP port free on this host now (a rendezvous port for local ranks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[07-09,12],cpu1` -> `gpu07`."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist.split("]")[0]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def discover_env() -> None:
    """Fill the torch.distributed variables from the launcher's own, if they are missing."""
    for name, sources in _FALLBACKS.items():
        if name not in os.environ:
            for source in sources:
                if source in os.environ:
                    os.environ[name] = os.environ[source]
                    break
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if "MASTER_ADDR" not in os.environ:
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
        if nodelist and int(os.environ["WORLD_SIZE"]) > 1:
            os.environ["MASTER_ADDR"] = first_host(nodelist)
        else:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        job = os.environ.get("SLURM_JOB_ID")
        os.environ["MASTER_PORT"] = str(20000 + int(job) % 20000) if job else str(free_port())


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def gpus_requested() -> bool:
    """Whether the launch asked for GPUs: a CUDA_VISIBLE_DEVICES naming devices (the deepspeed launcher's
    --num_gpus, SLURM's --gpus*) outside DeepSpeed's CPU accelerator."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and visible not in ("", "-1", "none", "NoDevFiles")


def device(requested: str = "auto") -> torch.device:
    """This rank's device. On GPUs: cuda:LOCAL_RANK, or cuda:0 where each rank sees one device (`srun
    --gpus-per-task=1`). `requested` "cuda" (or a launch that asked for GPUs, `gpus_requested`) with no usable GPU
    is an error naming torch's CUDA build, instead of a silent fall back to a CPU, fp32 and gloo run."""
    if requested not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"device={requested!r} is not one of auto, cuda, cpu")
    if requested == "auto" and os.environ.get("DS_ACCELERATOR") == "cpu":
        return torch.device("cpu")  # DeepSpeed's CPU accelerator: batches on the CPU too, GPUs or not
    if requested == "cpu":
        if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
            raise ConfigError("train.device=cpu on a machine with GPUs also needs DeepSpeed's CPU accelerator: "
                              "set DS_ACCELERATOR=cpu in the ranks' environment")
        return torch.device("cpu")
    if torch.cuda.is_available():
        count, local = torch.cuda.device_count(), local_rank()
        if count == 1:
            return torch.device("cuda", 0)
        if local < count:
            return torch.device("cuda", local)
        raise ConfigError(f"LOCAL_RANK={local} but this process sees {count} GPUs "
                          f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank "
                          "per visible GPU, or give each rank one GPU")
    if requested == "cuda" or gpus_requested():
        why = ("train.device=cuda" if requested == "cuda" else
               f"the launch asked for GPUs (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")
        raise ConfigError(f"{why} but torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no "
                          "usable GPU: install the torch build for this node's driver (e.g. a cu12 wheel for a CUDA 12 "
                          "driver), or run on the CPU with train.device=cpu / DS_ACCELERATOR=cpu")
    return torch.device("cpu")


def collective_device() -> torch.device:
    """Where a tensor handed to a collective must live: this rank's GPU under NCCL, the CPU under gloo."""
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return device()
    return torch.device("cpu")


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """Move the tensors of a batch dict to `device`; other values (ids, captions) stay as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer_"


def remove_stale_shm_buffers(folder: str = "/dev/shm", min_age_s: float = 60.0) -> list[str]:
    """Unlink DeepSpeed's CPU all-reduce buffers (FOLDER/deepspeed_allreduce_buffer_*, ~69 MB per rank) that no
    live process maps and that are older than `min_age_s` (a starting job maps its own within milliseconds).

    DeepSpeed's CPU shared-memory collective never unlinks them, so every run, and every killed one, leaves its
    ranks' buffers in RAM-backed /dev/shm: about 330 of them (22 GB) filled this 24 GB machine in a day of test
    runs, and later runs stalled or were killed. Local rank 0 calls this at start-up on the CPU."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(SHM_BUFFER_PREFIX)]
    except OSError:
        return []
    if not names:
        return []
    mapped: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as handle:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in handle if SHM_BUFFER_PREFIX in line)
        except OSError:
            continue
    removed = []
    now = time.time()
    for name in names:
        path = os.path.join(folder, name)
        try:
            if name in mapped or now - os.stat(path).st_mtime < min_age_s:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    return removed


def init(timeout_s: int = 600) -> None:
    """Start the process group through DeepSpeed (gloo on the CPU, nccl on GPUs)."""
    discover_env()
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    else:
        # DeepSpeed's CPU shared-memory all-reduce serves only inference_all_reduce (training's collectives go
        # through torch.distributed): not building it saves a native build on a fresh machine (25-50 s on 2
        # cores), its load in every rank and its /dev/shm buffers (~69 MB per rank).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if local_rank() == 0:
            removed = remove_stale_shm_buffers()
            if removed:
                print(f"removed {len(removed)} stale DeepSpeed shared-memory buffers from /dev/shm", flush=True)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s))
    _start_control_group(timeout_s)


_CONTROL_GROUP = None  # a gloo group over every rank when the main backend is not gloo (control_group)


def _start_control_group(timeout_s: int) -> None:
    global _CONTROL_GROUP
    if torch.distributed.get_backend() != "gloo" and _CONTROL_GROUP is None:
        _CONTROL_GROUP = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def control_group():
    """The process group for the loop's small host-side agreements (the stop flag at every step boundary): gloo
    on CPU tensors, so that agreeing never waits for the GPU's queued work as an NCCL collective read back with
    .item() would. The default group when that is gloo already."""
    return _CONTROL_GROUP


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_max(value: float) -> float:
    """The largest of every rank's `value`, agreed on the host (control_group: no GPU synchronisation)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([float(value)])
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=control_group())
    return float(tensor.item())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `values` (a new tensor on values' device; the collective runs on the backend's)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        summed = values.to(collective_device(), copy=True)
        torch.distributed.all_reduce(summed)
        return summed.to(values.device)
    return values


# ------------------------------------------------------------------------------------- gathers across ranks


def is_distributed() -> bool:
    """A process group of more than one rank is running."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def gather_objects(items: list) -> list:
    """Concatenate every rank's list, in rank order, on every rank (world of one: the list itself)."""
    if not is_distributed():
        return list(items)
    parts: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def _padded_gather(tensor: torch.Tensor) -> tuple[list[torch.Tensor], list[int]]:
    """Every rank's rows (padded to the longest for the collective), on tensor's device."""
    home, tensor = tensor.device, tensor.to(collective_device())
    world = torch.distributed.get_world_size()
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    biggest = max(sizes)
    padded = tensor.new_zeros((biggest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded.contiguous())
    return [part[:n].to(home) for part, n in zip(parts, sizes)], sizes


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows (any count per rank), concatenated in rank order; no gradient."""
    if not is_distributed():
        return tensor
    parts, _ = _padded_gather(tensor.detach())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the SUM over ranks of the incoming gradients:
    every rank's loss reads every rank's rows, so each rank's features get the gradients of all the losses."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts, sizes = _padded_gather(tensor)
        ctx.rank, ctx.sizes = torch.distributed.get_rank(), sizes
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = all_reduce_sum(grad.contiguous())
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' rows with gradients flowing back to the rank that owns each row (world of one: as is)."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)
