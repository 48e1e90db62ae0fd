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
and the rank environment file are written under `RUN_DIR/launch/` when the program's arguments name a
`run.dir=RUN_DIR`, else under `runs/launch/`. The environment file (`deepspeed_env`, KEY=VALUE lines, mode 0600:
only its owner reads it) holds what every rank gets: NCCL_*, GLOO_*, CUDA_* (not CUDA_VISIBLE_DEVICES, the
launcher sets it), HF_*, TRANSFORMERS_*, TOKENIZERS_*, TORCH_*, MT_*, MANAGERTOWER_*, PYTHON*, DS_ACCELERATOR,
OMP_NUM_THREADS, LD_LIBRARY_PATH, PYTHONPATH with the repository and the working directory first, and PATH with
this Python's bin directory first; plus --forward NAME and --set NAME=VALUE. Defaults when unset:
OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1.

pdsh mode runs `pdsh -w HOSTS "cd DIR && exec python -m cluster.launch --node-env FILE -- python -m
deepspeed.launcher.launch ..."`: each node reads the file itself, so no value (an HF_TOKEN, a password) is on
any command line that `ps` shows, and every part of the remote command is shell-quoted, so a working directory
with a space or an argument with a quote or a '$' arrives as given. The file must be on a file system every
node sees (the run folder is). Variables whose names look like credentials (TOKEN, SECRET, PASSWORD,
CREDENTIAL, KEY: is_secret) are never printed: `--dry-run` shows `HF_TOKEN=<hidden>`.

Every process it starts carries MT_LAUNCH_TAG (the SLURM job id, else a random tag), which is how
`python -m cluster.signal_ranks` finds the ranks of one job to ask them to checkpoint and stop.
`--dry-run` prints the command and the environment file (credentials hidden) instead of running.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from cluster import hostfile as hostfile_lib
from managertower.io import atomic_write
from managertower.launch import (NODE_LAUNCHER, PDSH_NODE_RANK, launcher_command, node_launcher_command,
                                 pdsh_command, world_info)

REPO_ROOT = Path(__file__).resolve().parent.parent
# PYTHON, MLFLOW and MV2: what DeepSpeed's own pdsh runner forwards from the launching shell.
FORWARD_PREFIXES = (
    "NCCL_", "GLOO_", "CUDA_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "MT_", "MANAGERTOWER_",
    "FI_", "UCX_", "PYTORCH_", "PYTHON", "MLFLOW", "MV2",
)
FORWARD_NAMES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "LD_LIBRARY_PATH", "MKL_NUM_THREADS", "TMPDIR",
                 "DS_SKIP_CUDA_CHECK", "TRITON_CACHE_DIR", "WANDB_MODE")
NEVER_FORWARD = ("CUDA_VISIBLE_DEVICES", "MT_LAUNCH_TAG")  # the launcher sets these per node / per launch
DEFAULTS = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# Names of credentials (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, ...),
# whose values are never printed; TOKEN and KEY only as whole words of the name (TOKENIZERS_PARALLELISM is none).
_SECRET_NAME = re.compile(r"SECRET|PASSW(OR)?D|CREDENTIAL|(^|_)(API)?(TOKEN|KEY)(_|$)", re.IGNORECASE)
HIDDEN = "<hidden>"
ENV_FILE_MODE = 0o600  # the environment file may hold credentials: only its owner reads it


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
    for name, value in chosen.items():
        if "\n" in value:
            raise LaunchError(f"cannot forward {name}: its value holds a newline, and the environment file holds"
                              f" one variable a line; unset it for the launch")
    return chosen


def is_secret(name: str) -> bool:
    """Whether a variable's name says it holds a credential (its value is never printed)."""
    return bool(_SECRET_NAME.search(name))


def format_env_file(variables: dict[str, str], hide_secrets: bool = False) -> str:
    """KEY=VALUE lines, sorted (the format of DeepSpeed's .deepspeed_env); `hide_secrets` for printing."""
    return "".join(f"{name}={HIDDEN if hide_secrets and is_secret(name) else value}\n"
                   for name, value in sorted(variables.items()))


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """The reverse of format_env_file: everything after the first '=' is the value, byte for byte."""
    variables = {}
    for number, line in enumerate(Path(path).read_text().split("\n"), 1):
        if not line.strip():
            continue
        name, equals, value = line.partition("=")
        if not equals or not name:
            raise LaunchError(f"{path} line {number}: expected NAME=VALUE")
        variables[name] = value
    return variables


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


@dataclass
class Launch:
    """What main runs: `command` with `env`; `variables` are what every rank gets (the environment file)."""
    command: list[str]
    env: dict[str, str]
    variables: dict[str, str]
    hosts: list[str] | None = None  # pdsh over several nodes: the nodes, in node-rank order
    kill_command: list[str] | None = None  # pdsh: stops every node's launcher (on SIGINT/SIGTERM here)


def build(args, program: list[str], environ: dict[str, str]) -> Launch:
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
        return Launch(command, env, variables)

    if mode == "pdsh" and len(entries) > 1:
        hosts = [host for host, _ in entries]
        if len(set(hosts)) != len(hosts):
            raise LaunchError(f"a host is named twice in {host_path}: give each node one line with its slots")
        env_file = work_dir / "deepspeed_env"
        atomic_write(env_file, format_env_file({**variables, "MT_LAUNCH_TAG": env["MT_LAUNCH_TAG"]}),
                     mode=ENV_FILE_MODE)
        node_launch = node_launcher_command(module, script_args, entries, master_addr=master_addr,
                                            master_port=master_port, node_rank=PDSH_NODE_RANK, python=python)
        # On each node this module loads the file and becomes DeepSpeed's per-node launcher (exec): the values
        # travel in the file, never on the command line. PYTHONPATH finds this module from any folder.
        remote = ["env", f"PYTHONPATH={REPO_ROOT}", python, "-u", "-m", "cluster.launch", "--node-env",
                  str(env_file), "--", *node_launch]
        env["PDSH_RCMD_TYPE"] = "ssh"
        if args.ssh_port:
            env["PDSH_SSH_ARGS_APPEND"] = f"{environ.get('PDSH_SSH_ARGS_APPEND', '')} -p {args.ssh_port}".strip()
        # DeepSpeed's way of stopping the nodes: pkill the per-node launchers of this launch (they pass SIGTERM
        # on to their ranks); '[d]' keeps the pattern from matching the shell that runs pkill.
        pattern = f"[d]{NODE_LAUNCHER[1:]} --world_info={world_info(entries)} --master_addr={master_addr} " \
                  f"--master_port={master_port}"
        return Launch(pdsh_command(hosts, remote, workdir=os.getcwd()), env, variables, hosts=hosts,
                      kill_command=pdsh_command(hosts, ["pkill", "-f", pattern]))

    if mode == "node":
        launcher_args = ["--no_ssh", f"--node_rank={node_rank}"]
    else:  # pdsh with one host: DeepSpeed's runner starts its ranks here, with this environment
        launcher_args = ["--launcher=pdsh"] + ([f"--ssh_port={args.ssh_port}"] if args.ssh_port else [])
    command = launcher_command(module, script_args, hostfile=host_path, master_addr=master_addr,
                               master_port=master_port, launcher_args=launcher_args, unbuffered=True, python=python)
    return Launch(command, env, variables)


def run_node(env_file: str, command: list[str]) -> int:
    """On one node (what the pdsh command runs): the variables of `env_file` over this environment, then exec
    `command` (DeepSpeed's per-node launcher)."""
    if not command:
        print("cluster.launch: --node-env FILE needs the command to run after '--'", file=sys.stderr)
        return 2
    try:
        variables = read_env_file(env_file)
    except OSError as error:
        print(f"cluster.launch: {socket.gethostname()} cannot read {env_file} ({error.strerror}): the launch folder"
              " must be on a file system every node shares (--work-dir, or run.dir=...)", file=sys.stderr)
        return 2
    except LaunchError as error:
        print(f"cluster.launch: {error}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.update(variables)
    os.execvpe(command[0], command, env)
    return 127  # not reached


def ssh_unreachable(host: str, port: int | None, env: dict[str, str]) -> str | None:
    """Why `ssh HOST` without a password fails, or None (DeepSpeed's runner checks the first host the same way)."""
    command = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"] + (["-p", str(port)] if port else [])
    try:
        result = subprocess.run(command + [host, "true"], env=env, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as error:
        return str(error)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]


def run_pdsh(launch: Launch, ssh_port: int | None) -> int:
    """Run the pdsh command and wait; on SIGINT/SIGTERM stop pdsh and every node's launcher, as DeepSpeed's
    runner does, and exit 1."""
    if shutil.which("pdsh", path=launch.env.get("PATH")) is None:
        print("cluster.launch: pdsh is not installed (apt-get install pdsh); or start each node's ranks yourself"
              " with --mode node / torchrun (see cluster/README.md)", file=sys.stderr)
        return 2
    why = ssh_unreachable(launch.hosts[0], ssh_port, launch.env)
    if why is not None:
        print(f"cluster.launch: cannot ssh to {launch.hosts[0]} without a password ({why}); set up key"
              " authentication for every host (see cluster/README.md)", file=sys.stderr)
        return 2
    process = subprocess.Popen(launch.command, env=launch.env)

    def stop(signum, frame):
        process.send_signal(signal.SIGINT)
        time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        subprocess.run(launch.kill_command, env=launch.env, stdin=subprocess.DEVNULL)
        time.sleep(1)
        sys.exit(1)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    return process.wait()


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
    parser.add_argument("--node-env", metavar="FILE", help="what the pdsh command runs on each node: the variables "
                        "of FILE, then the command after '--'")
    args = parser.parse_args(ours)
    if args.node_env:
        return run_node(args.node_env, program)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set {item}: expected NAME=VALUE")
    try:
        launch = build(args, program, dict(os.environ))
    except (LaunchError, ValueError) as error:
        print(f"cluster.launch: {error}", file=sys.stderr)
        return 2
    print(f"cluster.launch: {shlex.join(launch.command)}", file=sys.stderr, flush=True)
    if args.dry_run:
        print(shlex.join(launch.command))
        sys.stdout.write(format_env_file(launch.variables, hide_secrets=True))
        return 0
    if launch.kill_command is not None:
        return run_pdsh(launch, args.ssh_port)
    if "--no_ssh" in launch.command:
        # The DeepSpeed runner has no SIGTERM handler in this mode; were it to die on SLURM's SIGTERM, the step
        # would end and take the ranks with it before they finish their checkpoint. Ignored, it waits for the
        # per-node launcher (which does handle SIGTERM: it passes it on and waits for the ranks).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.execvpe(launch.command[0], launch.command, launch.env)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
