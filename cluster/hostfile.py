"""Write a DeepSpeed hostfile (`HOST slots=N`, one line per node) from SLURM or from a list of hosts.

    python -m cluster.hostfile                                  # inside a SLURM job: $SLURM_JOB_NODELIST
    python -m cluster.hostfile --nodelist 'gpu[01-04,07]' --slots 8 --out runs/x/hostfile
    python -m cluster.hostfile --hosts mt-node1,mt-node2 --slots 1

The node list is expanded with `scontrol show hostnames` when SLURM is installed (it knows every syntax SLURM
accepts), else by `expand_nodelist`, a pure-python expander of the common forms: `a,b`, `node[01-04,07]`,
`rack[1-2]-gpu[1-3]`, `n[1-2],m5`. Slots per node default to the GPUs SLURM gave each node
($SLURM_GPUS_ON_NODE), else the GPUs torch sees, else 1.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from managertower.io import atomic_write

_BRACKET = re.compile(r"\[([^\[\]]*)\]")


class NodelistError(ValueError):
    """A SLURM node list this module cannot read."""


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: 'a[1,2],b' -> ['a[1,2]', 'b']."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise NodelistError(f"unbalanced ']' in node list {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise NodelistError(f"unbalanced '[' in node list {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_range_set(body: str, nodelist: str) -> list[str]:
    """'01-04,07' -> ['01', '02', '03', '04', '07'] (zero padding kept, as SLURM does)."""
    values = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            continue
        if "-" in item:
            low, high = item.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(high) < int(low):
                raise NodelistError(f"bad range {item!r} in node list {nodelist!r}")
            width = len(low) if low.startswith("0") else 0
            values.extend(str(number).zfill(width) for number in range(int(low), int(high) + 1))
        elif item.isdigit():
            values.append(item)
        else:
            raise NodelistError(f"bad range item {item!r} in node list {nodelist!r}")
    return values


def _expand_one(pattern: str, nodelist: str) -> list[str]:
    match = _BRACKET.search(pattern)
    if not match:
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [
        expanded
        for value in _expand_range_set(match.group(1), nodelist)
        for expanded in _expand_one(head + value + tail, nodelist)
    ]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list without SLURM: 'node[01-03,07],login1' -> node01 node02 node03 node07 login1."""
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist.strip()):
        for host in _expand_one(pattern, nodelist):
            if host not in hosts:
                hosts.append(host)
    if not hosts:
        raise NodelistError(f"empty node list {nodelist!r}")
    return hosts


def scontrol_hostnames(nodelist: str) -> list[str] | None:
    """`scontrol show hostnames NODELIST`, or None when scontrol is absent or fails."""
    if not shutil.which("scontrol"):
        return None
    try:
        result = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    hosts = result.stdout.split()
    return hosts or None


def hosts_from_nodelist(nodelist: str, use_scontrol: bool = True) -> list[str]:
    hosts = scontrol_hostnames(nodelist) if use_scontrol else None
    return hosts if hosts else expand_nodelist(nodelist)


def default_slots(environ: dict[str, str] | None = None) -> int:
    """Ranks per node: what SLURM gave each node, else the GPUs visible here, else 1."""
    environ = os.environ if environ is None else environ
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = environ.get(name, "")
        digits = value.rsplit(":", 1)[-1]  # SLURM_GPUS_PER_NODE may be 'a100:4'
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return torch.cuda.device_count()
    except Exception:  # torch absent or broken: the hostfile is still useful
        pass
    return 1


def format_hostfile(hosts: list[str], slots: int | list[int]) -> str:
    slot_list = [slots] * len(hosts) if isinstance(slots, int) else list(slots)
    if len(slot_list) != len(hosts):
        raise ValueError(f"{len(hosts)} hosts but {len(slot_list)} slot counts")
    for host, count in zip(hosts, slot_list):
        if count < 1:
            raise ValueError(f"host {host}: slots must be >= 1, got {count}")
        if not host or any(char.isspace() for char in host):
            raise ValueError(f"bad host name {host!r}")
    return "".join(f"{host} slots={count}\n" for host, count in zip(hosts, slot_list))


def parse_hostfile(text: str) -> list[tuple[str, int]]:
    """The reverse of format_hostfile, with DeepSpeed's rules: '#' comments and blank lines are skipped."""
    entries = []
    for line_number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match:
            raise ValueError(f"hostfile line {line_number}: expected 'HOST slots=N', got {raw!r}")
        entries.append((match.group(1), int(match.group(2))))
    return entries


def write_hostfile(path: str | os.PathLike, hosts: list[str], slots: int | list[int]) -> Path:
    """Written whole (managertower.io.atomic_write), so a launcher never reads half a hostfile; every node of a
    job may write the same hostfile at once."""
    return atomic_write(path, format_hostfile(hosts, slots))


def resolve_hosts(hosts: str | None, nodelist: str | None, environ: dict[str, str] | None = None) -> list[str]:
    """--hosts wins, then --nodelist, then $SLURM_JOB_NODELIST (or $SLURM_NODELIST)."""
    environ = os.environ if environ is None else environ
    if hosts:
        return [host.strip() for host in hosts.replace(" ", ",").split(",") if host.strip()]
    nodelist = nodelist or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        raise NodelistError("no hosts: give --hosts a,b or --nodelist 'node[01-04]', or run inside a SLURM job")
    return hosts_from_nodelist(nodelist)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.hostfile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", help="comma-separated host names (instead of a SLURM node list)")
    parser.add_argument("--nodelist", help="a SLURM node list, e.g. 'gpu[01-04,07]' (default: $SLURM_JOB_NODELIST)")
    parser.add_argument("--slots", type=int, default=None, help="ranks per node (default: GPUs per node, else 1)")
    parser.add_argument("--out", "-o", help="write here (default: print to stdout)")
    args = parser.parse_args(argv)
    try:
        hosts = resolve_hosts(args.hosts, args.nodelist)
        slots = args.slots if args.slots is not None else default_slots()
        text = format_hostfile(hosts, slots)
    except ValueError as error:  # NodelistError included
        print(f"cluster.hostfile: {error}", file=sys.stderr)
        return 2
    if args.out:
        write_hostfile(args.out, hosts, slots)
        print(f"cluster.hostfile: wrote {args.out} ({len(hosts)} nodes x {slots} slots)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
