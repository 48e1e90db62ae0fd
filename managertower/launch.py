"""The environment of local training ranks and the command line that starts them (the doors run it).

    env = rank_env(2)                                           # os.environ plus what the ranks need
    command = launcher_command("pretrain", ["--config", "pretrain/configs/tiny.yaml"], ranks=2)
    subprocess.run(command, env=env, check=True)

One rank runs `python -m MODULE ARGS`; more, or a hostfile, run the DeepSpeed launcher
(`python -m deepspeed.launcher.runner ... --module MODULE ARGS`), which starts every rank with `--local_rank`
and the environment it was given. Both functions only build values: nothing is started here.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

# The repository root: its top-level doors (pretrain, finetune, ...) must import in every rank, whatever the
# rank's working directory.
REPO = Path(__file__).resolve().parents[1]
RUNNER = "deepspeed.launcher.runner"


def has_cuda() -> bool:
    """Whether torch sees a CUDA device here."""
    import torch

    return torch.cuda.is_available()


def rank_env(ranks: int, environ: Mapping[str, str] | None = None, cpu_count: int | None = None) -> dict[str, str]:
    """The environment for `ranks` ranks on this machine: `environ` (default os.environ) plus

    - DS_ACCELERATOR=cpu when none is set and torch sees no CUDA device (a GPU machine keeps DeepSpeed's own
      choice; a value already set is kept),
    - OMP_NUM_THREADS = this machine's cores / ranks (at least 1), so the ranks do not oversubscribe the cores,
    - TOKENIZERS_PARALLELISM=false and HF_HUB_OFFLINE=1 unless set (no tokenizer threads in forked loader
      workers; the experts load from local paths only),
    - PYTHONPATH with the repository first.
    """
    env = dict(os.environ if environ is None else environ)
    if "DS_ACCELERATOR" not in env and not has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = str(max(1, (cpu_count or os.cpu_count() or 2) // max(1, ranks)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    path = [str(REPO)] + [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))
    return env


def local_master_port(salt: int = 0) -> int:
    """A rendezvous port for ranks on this machine, different per process and per `salt` (e.g. a job's index:
    the previous job's port may still linger in TIME_WAIT)."""
    return 29500 + (os.getpid() + 17 * salt) % 2000


def launcher_command(module: str | None, args: Sequence[str], ranks: int = 1, *, master_port: int | None = None,
                     hostfile: str | os.PathLike | None = None, master_addr: str | None = None,
                     launcher_args: Sequence[str] = (), unbuffered: bool = False,
                     python: str = sys.executable) -> list[str]:
    """The command that runs `python -m MODULE ARGS` on `ranks` local ranks, or on every slot of `hostfile`.

    One rank and no hostfile: plain `python -m MODULE ARGS`. Otherwise the DeepSpeed launcher:
    `--num_gpus RANKS` (local ranks) or `--hostfile=H` (its slots decide), then `--master_addr`, `--master_port`
    (default local_master_port()), `launcher_args` (e.g. `--no_ssh --node_rank=1`, `--launcher=pdsh`) and
    `--module MODULE ARGS`. `module=None` runs a script instead: ARGS then start with its path.
    `unbuffered` runs the launcher itself with `python -u`.
    """
    interpreter = [python, "-u"] if unbuffered else [python]
    if hostfile is None and ranks <= 1:
        if module is None:
            return [*interpreter, *args]
        return [*interpreter, "-m", module, *args]
    command = [*interpreter, "-m", RUNNER]
    command += [f"--hostfile={hostfile}"] if hostfile is not None else ["--num_gpus", str(ranks)]
    if master_addr is not None:
        command.append(f"--master_addr={master_addr}")
    command.append(f"--master_port={local_master_port() if master_port is None else master_port}")
    command += list(launcher_args)
    if module is not None:
        command += ["--module", module]
    return command + list(args)
