"""Start a DeepSpeed (or torchrun) job on several nodes with the environment the ranks need.

Three modes, one command line for the program after `--`:

    # pdsh: from one host, start every node over ssh (the DeepSpeed launcher's own multi-node path)
    python -m cluster.launch --hosts node1,node2 --slots 8 -- --module pretrain --config C run.dir=D ...
    python -m cluster.launch --hostfile H -- --module pretrain ...
    # node: inside `srun --ntasks-per-node=1`, each node starts its own ranks (no ssh: `--no_ssh --node_rank`)
    srun --ntasks-per-node=1 python -m cluster.launch --mode node -- --module pretrain ...
    # torchrun: the same, with torchrun as the per-node launcher
    srun --ntasks-per-node=1 python -m cluster.launch --mode torchrun -- --module pretrain ...

Hosts come from --hostfile, --hosts, --nodelist or $SLURM_JOB_NODELIST (see cluster.hostfile). The hostfile
and the DeepSpeed environment file are written under `RUN_DIR/launch/` when the program's arguments name a
`run.dir=RUN_DIR`, else under `runs/launch/`. The environment file (`DS_ENV_FILE`, the launcher's
`.deepspeed_env`) forwards to every rank: NCCL_*, GLOO_*, CUDA_* (not CUDA_VISIBLE_DEVICES, the launcher sets
it), HF_*, TRANSFORMERS_*, TOKENIZERS_*, TORCH_*, MT_*, MANAGERTOWER_*, DS_ACCELERATOR, OMP_NUM_THREADS,
LD_LIBRARY_PATH, PYTHONPATH with the repository and the working directory first, and PATH with this Python's bin directory first;
plus --forward NAME and --set NAME=VALUE. Defaults when unset: OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1.

Every process it starts carries MT_LAUNCH_TAG (the SLURM job id, else a random tag), which is how
`python -m cluster.signal_ranks` finds the ranks of one job to ask them to checkpoint and stop.
`--dry-run` prints the command and the environment file instead of running.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import sys
import uuid
from pathlib import Path

from cluster import hostfile as hostfile_lib
from managertower.io import atomic_write
from managertower.launch import launcher_command

REPO_ROOT = Path(__file__).resolve().parent.parent
FORWARD_PREFIXES = (
    "NCCL_", "GLOO_", "CUDA_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "MT_", "MANAGERTOWER_",
    "FI_", "UCX_", "PYTORCH_",
)
FORWARD_NAMES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "LD_LIBRARY_PATH", "MKL_NUM_THREADS", "TMPDIR",
                 "DS_SKIP_CUDA_CHECK", "TRITON_CACHE_DIR", "WANDB_MODE")
NEVER_FORWARD = ("CUDA_VISIBLE_DEVICES", "MT_LAUNCH_TAG")  # the launcher sets these per node / per launch
DEFAULTS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# The DeepSpeed launcher pastes each value into `export K=V;` on the remote shell, quoting only what needs it.
_UNSAFE_VALUE = re.compile(r'["`$\\\n]')


class LaunchError(RuntimeError):
    """A launch the user set up wrongly (no hosts, bad program line): one clear message."""


def rank_environment(environ: dict[str, str], forward: list[str] = (), settings: dict[str, str] | None = None,
                     python: str = sys.executable) -> dict[str, str]:
    """The variables every rank on every node gets (what goes into the DeepSpeed environment file)."""
    chosen: dict[str, str] = {}
    for name, value in environ.items():
        if name in NEVER_FORWARD:
            continue
        if name.startswith(FORWARD_PREFIXES) or name in FORWARD_NAMES or name in forward:
            chosen[name] = value
    for name in forward:
        if name not in environ:
            raise LaunchError(f"--forward {name}: the variable is not set here")
    for name, value in DEFAULTS.items():
        chosen.setdefault(name, value)
    python_path = [str(REPO_ROOT), os.getcwd()] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    chosen["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(python_path))
    bin_dir = str(Path(python).parent)
    path = [bin_dir] + [p for p in environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep) if p]
    chosen["PATH"] = os.pathsep.join(dict.fromkeys(path))
    chosen.update(settings or {})
    for name, value in list(chosen.items()):
        if _UNSAFE_VALUE.search(value):
            raise LaunchError(f"cannot forward {name}={value!r}: quotes, $, backslashes and newlines do not survive"
                              f" the launcher's remote shell; drop it or pass it with --set {name}=...")
    return chosen


def format_env_file(variables: dict[str, str]) -> str:
    return "".join(f"{name}={value}\n" for name, value in sorted(variables.items()))


def split_program(program: list[str]) -> tuple[str | None, list[str]]:
    """['--module', 'pretrain', 'a=1'] -> ('pretrain', ['a=1']); ['train.py', 'x'] -> (None, ['train.py', 'x'])."""
    if program and program[0] == "--":
        program = program[1:]
    if not program:
        raise LaunchError("no program: put it after '--', e.g. -- --module pretrain --config pretrain/configs/tiny.yaml")
    if program[0] in ("--module", "-m"):
        if len(program) < 2:
            raise LaunchError("--module needs a module name, e.g. --module pretrain")
        return program[1], program[2:]
    return None, program


def run_dir_of(program: list[str]) -> str | None:
    for item in program:
        if item.startswith("run.dir="):
            return item.split("=", 1)[1]
    return None


def default_master_port(environ: dict[str, str]) -> int:
    if environ.get("MASTER_PORT", "").isdigit():
        return int(environ["MASTER_PORT"])
    job = environ.get("SLURM_JOB_ID", "")
    if job.isdigit():
        # The same on every node of a job, and different after a requeue (the old port may linger in TIME_WAIT).
        restart = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
        return 15000 + (int(job) * 16 + restart) % 40000
    with socket.socket() as probe:  # single host / pdsh from here: a port free on this machine
        probe.bind(("", 0))
        return probe.getsockname()[1]


def resolve_hostfile(args, environ: dict[str, str], work_dir: Path) -> tuple[Path, list[tuple[str, int]]]:
    if args.hostfile:
        path = Path(args.hostfile)
        if not path.is_file():
            raise LaunchError(f"hostfile {path} does not exist; write one with python -m cluster.hostfile")
        entries = hostfile_lib.parse_hostfile(path.read_text())
        if not entries:
            raise LaunchError(f"hostfile {path} names no hosts")
        return path, entries
    try:
        hosts = hostfile_lib.resolve_hosts(args.hosts, args.nodelist, environ)
    except hostfile_lib.NodelistError as error:
        raise LaunchError(str(error)) from None
    slots = args.slots if args.slots else hostfile_lib.default_slots(environ)
    path = hostfile_lib.write_hostfile(work_dir / "hostfile", hosts, slots)
    return path, [(host, slots) for host in hosts]


def build(args, program: list[str], environ: dict[str, str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """-> (command, environment for the command, the variables forwarded to ranks)."""
    module, script_args = split_program(program)
    run_dir = run_dir_of(script_args)
    work_dir = Path(args.work_dir or (Path(run_dir) / "launch" if run_dir else Path("runs/launch"))).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(item.split("=", 1) for item in args.set)
    variables = rank_environment(environ, args.forward, settings)
    env = dict(environ)
    env.update(variables)
    env["MT_LAUNCH_TAG"] = environ.get("MT_LAUNCH_TAG") or environ.get("SLURM_JOB_ID") or uuid.uuid4().hex[:12]
    mode = args.mode
    if mode == "auto":
        mode = "node" if environ.get("SLURM_STEP_ID") is not None and environ.get("SLURM_NODEID") else "pdsh"
    host_path, entries = resolve_hostfile(args, environ, work_dir)
    master_addr = args.master_addr or entries[0][0]
    master_port = args.master_port or default_master_port(environ)
    node_rank = args.node_rank if args.node_rank is not None else int(environ.get("SLURM_NODEID", "0") or 0)
    if mode in ("node", "torchrun") and not 0 <= node_rank < len(entries):
        raise LaunchError(f"node rank {node_rank} is outside the hostfile's {len(entries)} hosts ({host_path})")
    python = sys.executable

    if mode == "torchrun":
        slots = entries[node_rank][1]
        command = [python, "-m", "torch.distributed.run", f"--nnodes={len(entries)}", f"--nproc_per_node={slots}",
                   f"--node_rank={node_rank}", f"--master_addr={master_addr}", f"--master_port={master_port}"]
        command += (["-m", module] if module else []) + script_args
        return command, env, variables

    if mode == "node":
        launcher_args = ["--no_ssh", f"--node_rank={node_rank}"]
    else:
        env_file = work_dir / "deepspeed_env"
        atomic_write(env_file, format_env_file({**variables, "MT_LAUNCH_TAG": env["MT_LAUNCH_TAG"]}))
        # An absolute DS_ENV_FILE replaces ~/.deepspeed_env and ./.deepspeed_env for this launch only.
        env["DS_ENV_FILE"] = str(env_file)
        env["PDSH_RCMD_TYPE"] = "ssh"
        launcher_args = ["--launcher=pdsh"] + ([f"--ssh_port={args.ssh_port}"] if args.ssh_port else [])
    command = launcher_command(module, script_args, hostfile=host_path, master_addr=master_addr,
                               master_port=master_port, launcher_args=launcher_args, unbuffered=True, python=python)
    return command, env, variables


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        ours, program = argv[:split], argv[split + 1:]
    else:
        ours, program = argv, []
    parser = argparse.ArgumentParser(prog="python -m cluster.launch", description=__doc__.split("\n\n")[0],
                                     epilog="The program follows '--'.")
    parser.add_argument("--mode", choices=["auto", "pdsh", "node", "torchrun"], default="auto",
                        help="auto: 'node' inside an srun step, else 'pdsh'")
    parser.add_argument("--hostfile", help="an existing DeepSpeed hostfile")
    parser.add_argument("--hosts", help="comma-separated hosts")
    parser.add_argument("--nodelist", help="a SLURM node list (default $SLURM_JOB_NODELIST)")
    parser.add_argument("--slots", type=int, help="ranks per node (default: GPUs per node, else 1)")
    parser.add_argument("--master-addr", help="rank 0's host (default: the first host)")
    parser.add_argument("--master-port", type=int, help="default: $MASTER_PORT, else derived from the SLURM job id")
    parser.add_argument("--node-rank", type=int, help="this node's index (node/torchrun modes; default $SLURM_NODEID)")
    parser.add_argument("--ssh-port", type=int)
    parser.add_argument("--forward", action="append", default=[], metavar="NAME", help="also forward this variable")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set this for every rank")
    parser.add_argument("--work-dir", help="where the hostfile and environment file go (default RUN_DIR/launch)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and environment file, run nothing")
    args = parser.parse_args(ours)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected NAME=VALUE")
    try:
        command, env, variables = build(args, program, dict(os.environ))
    except (LaunchError, ValueError) as error:
        print(f"cluster.launch: {error}", file=sys.stderr)
        return 2
    print(f"cluster.launch: {shlex.join(command)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(shlex.join(command))
        sys.stdout.write(format_env_file(variables))
        return 0
    if "--no_ssh" in command:
        # The DeepSpeed runner has no SIGTERM handler in this mode; were it to die on SLURM's SIGTERM, the step
        # would end and take the ranks with it before they finish their checkpoint. Ignored, it waits for the
        # per-node launcher (which does handle SIGTERM: it passes it on and waits for the ranks).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.execvpe(command[0], command, env)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
