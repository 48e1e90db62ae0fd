"""The environment of local training ranks and the command line that starts them (the doors run it).

    env = rank_env(2)                                           # os.environ plus what the ranks need
    command = launcher_command("pretrain", ["--config", "pretrain/configs/tiny.yaml"], ranks=2)
    subprocess.run(command, env=env, check=True)

One rank runs `python -m MODULE ARGS`; more, or a hostfile, run the DeepSpeed launcher
(`python -m deepspeed.launcher.runner ... --module MODULE ARGS`), which starts every rank with `--local_rank`
and the environment it was given. For several nodes over ssh, `node_launcher_command` (DeepSpeed's per-node
launcher) and `pdsh_command` (one remote shell command, every part quoted) build what cluster.launch runs.
These functions only build values: nothing is started here.
"""
from __future__ import annotations

import base64
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Mapping, Sequence

# The repository root: its top-level doors (pretrain, finetune, ...) must import in every rank, whatever the
# rank's working directory.
REPO = Path(__file__).resolve().parents[1]
RUNNER = "deepspeed.launcher.runner"
NODE_LAUNCHER = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher: starts one node's ranks
PDSH_FAN_OUT = 1024  # as DeepSpeed's pdsh runner: every node at once


class PdshExpanded(str):
    """A part of a pdsh remote command that pdsh itself fills in (`%n`: the node's index in the host list);
    every other part reaches the node's shell exactly as given."""


PDSH_NODE_RANK = PdshExpanded("%n")


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


def world_info(hosts: Sequence[tuple[str, int]]) -> str:
    """DeepSpeed's `--world_info`: {host: [slot indices]} as url-safe base64 JSON, hosts in hostfile order (a
    node's rank is its index here)."""
    layout = {host: list(range(slots)) for host, slots in hosts}
    return base64.urlsafe_b64encode(json.dumps(layout).encode()).decode()


def node_launcher_command(module: str | None, args: Sequence[str], hosts: Sequence[tuple[str, int]], *,
                          master_addr: str, master_port: int, node_rank: int | PdshExpanded,
                          python: str = sys.executable) -> list[str]:
    """DeepSpeed's per-node launcher for one node of `hosts` ((host, slots) pairs): `python -u -m
    deepspeed.launcher.launch --world_info=... --master_addr --master_port --node_rank=R [--module] MODULE|SCRIPT
    ARGS`, which starts that node's ranks. `node_rank=PDSH_NODE_RANK` leaves the rank for pdsh to fill in."""
    rank = f"--node_rank={node_rank}"
    command = [python, "-u", "-m", NODE_LAUNCHER, f"--world_info={world_info(hosts)}",
               f"--master_addr={master_addr}", f"--master_port={master_port}",
               PdshExpanded(rank) if isinstance(node_rank, PdshExpanded) else rank]
    if module is not None:
        command += ["--module", module]
    return command + list(args)


def _pdsh_quote(part: str) -> str:
    """One shell word that pdsh passes on unchanged: pdsh replaces %h, %u, %n and %% anywhere in the remote
    command, so a literal '%' is doubled, except in the parts pdsh is meant to fill in."""
    quoted = shlex.quote(part)
    return quoted if isinstance(part, PdshExpanded) else quoted.replace("%", "%%")


def pdsh_command(hosts: Sequence[str], command: Sequence[str], *, workdir: str | os.PathLike | None = None,
                 fan_out: int = PDSH_FAN_OUT) -> list[str]:
    """`pdsh -S -f N -w HOST,... REMOTE`, REMOTE one shell command line: `cd WORKDIR && exec COMMAND`, every part
    shell-quoted (a folder with a space, an argument with a quote or a '$' arrive as given) and kept from pdsh's
    own % expansion, except PdshExpanded parts. `-S`: the exit status is the largest of the nodes'."""
    remote = " ".join(_pdsh_quote(part) for part in command)
    if workdir is not None:
        remote = f"cd {_pdsh_quote(str(workdir))} && exec {remote}"
    return ["pdsh", "-S", "-f", str(fan_out), "-w", ",".join(hosts), remote]
