"""Send a signal to the training ranks of one launch on this node, and to nothing else.

    python -m cluster.signal_ranks --tag $SLURM_JOB_ID --signal USR1

A rank is a process whose environment has MT_LAUNCH_TAG=TAG (cluster.launch and the sbatch scripts set it) and
LOCAL_RANK (the per-node launcher sets it), and whose parent has no LOCAL_RANK: that leaves out the launchers
above the ranks, which would die of SIGUSR1, and the data-loader workers below them. A job that trains in its
own process (no launcher, so no LOCAL_RANK) marks that process with MT_TRAINER_PROCESS=1 instead. The training loop saves a checkpoint at
the next step boundary on SIGUSR1 and exits 0; on SIGTERM it saves if a boundary comes within MT_STOP_GRACE_S
seconds and exits 143. The launchers then exit on their own.
Prints one line per process signalled; exits 1 when it found no rank.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys


def _environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:  # gone, or not ours to read
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and ')'


def _tagged(tag: str) -> dict[int, dict[str, str]]:
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            environ = _environ(int(entry))
            if environ and environ.get("MT_LAUNCH_TAG") == tag:
                found[int(entry)] = environ
    return found


def find_ranks(tag: str) -> list[int]:
    """Tagged processes with LOCAL_RANK whose parent has none (the ranks a launcher started); where there are
    none, tagged processes with MT_TRAINER_PROCESS=1 whose parent has none (a job that trains in-process)."""
    tagged = _tagged(tag)
    for marker in ("LOCAL_RANK", "MT_TRAINER_PROCESS"):
        chosen = []
        for pid, environ in tagged.items():
            if marker not in environ:
                continue
            parent = _parent(pid)
            parent_environ = tagged.get(parent) or (_environ(parent) if parent else None) or {}
            if marker not in parent_environ:  # not a data-loader worker or another child of a rank
                chosen.append(pid)
        if chosen:
            return sorted(chosen)
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.signal_ranks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default=os.environ.get("MT_LAUNCH_TAG") or os.environ.get("SLURM_JOB_ID"),
                        help="the launch's MT_LAUNCH_TAG (default: $MT_LAUNCH_TAG, else $SLURM_JOB_ID)")
    parser.add_argument("--signal", default="USR1", help="a signal name: USR1 (default), TERM, ...")
    args = parser.parse_args(argv)
    if not args.tag:
        parser.error("no --tag and neither MT_LAUNCH_TAG nor SLURM_JOB_ID is set")
    name = args.signal.upper()
    signum = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if not isinstance(signum, signal.Signals):
        parser.error(f"unknown signal {args.signal!r}")
    host = os.uname().nodename
    ranks = find_ranks(args.tag)
    for pid in ranks:
        try:
            os.kill(pid, signum)
            print(f"signal_ranks: {host}: sent {signum.name} to rank process {pid}", flush=True)
        except ProcessLookupError:
            pass
    if not ranks:
        print(f"signal_ranks: {host}: no rank process with MT_LAUNCH_TAG={args.tag}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
