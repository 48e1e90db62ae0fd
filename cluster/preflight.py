"""Check a machine (or every node of a job) before a long run, and print one PASS/FAIL/SKIP row per check.

    python -m cluster.preflight                                   # this machine
    python -m cluster.preflight --run-dir runs/pt --shards /shared/shards
    python -m cluster.preflight --hosts node1,node2 --run-dir ...  # every host, over pdsh/ssh
    srun -N4 --ntasks-per-node=1 ... / inside an allocation:      # every node of the job, over srun

Checks: the Python environment (python, torch, deepspeed versions); GPUs visible to torch.cuda (SKIP on CPU
runs, DS_ACCELERATOR=cpu); NCCL_*/GLOO_* variables (named interfaces exist); the run directory writable, and
shared: a file written by each node is seen by all; the shards readable (every tar opens, its first member
reads) from every node; the same Python environment everywhere (versions plus a hash of the installed
distributions, what `pip freeze` lists). Nodes are reached with srun inside a SLURM allocation of several
nodes, pdsh over ssh with --hosts, or not at all (this machine only). Exits 1 when a row says FAIL.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

REPORT_MARKER = "MT_PREFLIGHT_REPORT "
REPO_ROOT = Path(__file__).resolve().parent.parent
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass
class Row:
    check: str
    status: str
    detail: str


# --- what one node measures --------------------------------------------------------------------------------
def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_fingerprint() -> dict:
    """Python, torch, deepspeed versions and a hash of every installed distribution (name==version)."""
    installed = sorted({f"{(dist.metadata['Name'] or '?').lower()}=={dist.version}" for dist in metadata.distributions()})
    return {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "deepspeed": _version("deepspeed"),
        "packages": len(installed),
        "freeze_sha256": hashlib.sha256("\n".join(installed).encode()).hexdigest()[:16],
    }


def gpu_info() -> dict:
    try:
        import torch
    except Exception as error:  # a broken torch is itself the finding
        return {"error": f"import torch failed: {error}"}
    info = {"count": 0, "names": [], "cuda": torch.version.cuda, "nccl": False}
    try:
        info["count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        info["names"] = sorted({torch.cuda.get_device_name(i) for i in range(info["count"])})
        import torch.distributed as dist

        info["nccl"] = bool(dist.is_available() and dist.is_nccl_available())
    except Exception as error:
        info["error"] = f"torch.cuda failed: {error}"
    return info


def split_shard_spec(spec: str) -> list[str]:
    """'[a/*.tar,b/{0..3}.tar]' or 'a,b' (a recipe's list override, or plain) -> entries; commas inside braces stay."""
    spec = spec.strip()
    if spec.startswith("[") and spec.endswith("]"):
        spec = spec[1:-1]
    entries, depth, current = [], 0, ""
    for char in spec:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += char
    entries.append(current)
    return [entry.strip().strip("'\"") for entry in entries if entry.strip().strip("'\"")]


def find_shards(spec: str) -> tuple[list[str], list[str]]:
    """Shard paths the way training finds them (managertower.data.shards.expand_shards: a folder, a glob, a brace
    range, several of them); a folder without tars of its own is searched below (a whole shard root).
    -> (paths, problems)."""
    from managertower.data.shards import expand_shards

    found: list[str] = []
    problems: list[str] = []
    for entry in split_shard_spec(spec):
        if os.path.isdir(entry) and not glob.glob(os.path.join(entry, "*.tar")):
            found += glob.glob(os.path.join(entry, "**", "*.tar"), recursive=True)
            continue
        try:
            found += expand_shards(entry)
        except FileNotFoundError as error:
            problems.append(str(error).split(";")[0])
    return sorted(set(found)), problems


def check_shards(spec: str) -> dict:
    shards, problems = find_shards(spec)
    if problems:
        return {"ok": False, "detail": "; ".join(problems)}
    if not shards:
        return {"ok": False, "detail": f"no .tar shards match {spec} (python -m dataprep writes them)"}
    bad = []
    for path in shards:
        try:
            with tarfile.open(path, "r:") as archive:
                member = archive.next()
                if member is None:
                    raise tarfile.ReadError("empty archive")
                if member.isfile():
                    archive.extractfile(member).read(1024)
        except (OSError, tarfile.TarError) as error:
            bad.append(f"{path}: {error}")
    if bad:
        return {"ok": False, "detail": f"{len(bad)}/{len(shards)} unreadable, first: {bad[0]}"}
    total = sum(os.path.getsize(path) for path in shards)
    return {"ok": True, "detail": f"{len(shards)} shards readable ({total / 1e6:.1f} MB)"}


def shared_fs_probe(run_dir: str, token: str) -> dict:
    """Write this node's file into RUN_DIR/.preflight/TOKEN/ (the coordinator checks every node's is there)."""
    probe_dir = Path(run_dir) / ".preflight" / token
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
        mine = probe_dir / f"{socket.gethostname()}-{os.getpid()}"
        mine.write_text(socket.gethostname())
        seen_coordinator = (probe_dir / "coordinator").is_file()
        return {"ok": True, "file": mine.name, "sees_coordinator": seen_coordinator}
    except OSError as error:
        return {"ok": False, "detail": f"cannot write {probe_dir}: {error}"}


def node_report(run_dir: str | None, shards: str | None, token: str) -> dict:
    report = {"host": socket.gethostname(), "env": environment_fingerprint(), "gpu": gpu_info()}
    if run_dir:
        report["fs"] = shared_fs_probe(run_dir, token)
    if shards:
        report["shards"] = check_shards(shards)
    return report


# --- reaching the nodes ------------------------------------------------------------------------------------
def _report_command(args, token: str) -> list[str]:
    command = [sys.executable, "-m", "cluster.preflight", "--node-report", "--token", token]
    if args.run_dir:
        command += ["--run-dir", os.path.abspath(args.run_dir)]
    if args.shards:
        command += ["--shards", ",".join(os.path.abspath(p) for p in split_shard_spec(args.shards))]
    return command


def _parse_reports(output: str) -> list[dict]:
    reports = []
    for line in output.splitlines():
        if REPORT_MARKER in line:
            try:
                reports.append(json.loads(line.split(REPORT_MARKER, 1)[1]))
            except json.JSONDecodeError:
                pass
    return reports


def gather_reports(args, token: str) -> tuple[str, list[str], list[dict], str]:
    """-> (method, expected hosts, reports, error text)."""
    command = _report_command(args, token)
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if args.hosts:
        hosts = [host for host in args.hosts.split(",") if host]
        if not shutil.which("pdsh"):
            return "pdsh", hosts, [], "pdsh is not installed (apt-get install pdsh), needed for --hosts"
        remote = f"cd {shlex.quote(os.getcwd())} && PYTHONPATH={shlex.quote(environ['PYTHONPATH'])} {shlex.join(command)}"
        runner = ["pdsh", "-S", "-w", ",".join(hosts), remote]
        environ["PDSH_RCMD_TYPE"] = "ssh"
        method = f"pdsh over ssh ({len(hosts)} hosts)"
    elif int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1) > 1 and shutil.which("srun"):
        from cluster.hostfile import hosts_from_nodelist

        hosts = hosts_from_nodelist(os.environ["SLURM_JOB_NODELIST"])
        runner = ["srun", "--overlap", f"--nodes={len(hosts)}", "--ntasks-per-node=1", "--kill-on-bad-exit=0"] + command
        method = f"srun ({len(hosts)} nodes of job {os.environ.get('SLURM_JOB_ID', '?')})"
    else:
        return "local", [socket.gethostname()], [node_report(args.run_dir, args.shards, token)], ""
    try:
        result = subprocess.run(runner, capture_output=True, text=True, timeout=args.timeout, env=environ)
        output, error = result.stdout, (result.stderr.strip() if result.returncode else "")
    except subprocess.TimeoutExpired as timeout:
        output = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        error = f"timed out after {args.timeout}s"
    return method, hosts, _parse_reports(output), error


# --- judging ----------------------------------------------------------------------------------------------
def evaluate(args, method: str, hosts: list[str], reports: list[dict], error: str, token: str) -> list[Row]:
    rows: list[Row] = []
    count = len(hosts)
    if len(reports) < count:
        rows.append(Row("nodes answer", FAIL, f"{len(reports)}/{count} answered via {method}"
                        + (f": {error.splitlines()[-1]}" if error else "")))
    else:
        rows.append(Row("nodes answer", PASS, f"{len(reports)}/{count} via {method}"))
    if not reports:
        return rows

    first = reports[0]["env"]
    rows.append(Row("python environment", PASS,
                    f"python {first['python']}, torch {first['torch']}, deepspeed {first['deepspeed']}"))
    missing = [name for name in ("torch", "deepspeed") if first[name] == "absent"]
    if missing:
        rows[-1] = Row("python environment", FAIL, f"not installed: {', '.join(missing)} (pip install -e .)")

    # GPUs
    accelerator = os.environ.get("DS_ACCELERATOR", "")
    gpu_rows = []
    for report in reports:
        gpu = report["gpu"]
        if "error" in gpu:
            gpu_rows.append((FAIL, f"{report['host']}: {gpu['error']}"))
        elif gpu["count"] == 0:
            if accelerator == "cpu" and not args.expect_gpus:
                gpu_rows.append((SKIP, f"{report['host']}: no GPU (DS_ACCELERATOR=cpu: ranks run on CPU)"))
            else:
                gpu_rows.append((FAIL, f"{report['host']}: torch.cuda sees no GPU (driver? CUDA_VISIBLE_DEVICES?"
                                       " set DS_ACCELERATOR=cpu for a CPU run)"))
        elif args.expect_gpus and gpu["count"] < args.expect_gpus:
            gpu_rows.append((FAIL, f"{report['host']}: {gpu['count']} GPUs, expected {args.expect_gpus}"))
        else:
            gpu_rows.append((PASS, f"{report['host']}: {gpu['count']} x {', '.join(gpu['names'])}"
                                   f" (CUDA {gpu['cuda']}, NCCL {'yes' if gpu['nccl'] else 'NO'})"))
    worst = next((s for s in (FAIL, PASS, SKIP) if any(status == s for status, _ in gpu_rows)), SKIP)
    by_text: dict[str, list[str]] = {}  # "vm1, vm2: no GPU ..." rather than one line per node
    for status, detail in gpu_rows:
        if status == worst:
            host, text = detail.split(": ", 1)
            by_text.setdefault(text, []).append(host)
    chosen = [f"{', '.join(h[:4])}{f' +{len(h) - 4} more' if len(h) > 4 else ''}: {text}" for text, h in by_text.items()]
    rows.append(Row("GPUs (torch.cuda)", worst, "; ".join(chosen)))
    have_gpus = any(report["gpu"].get("count", 0) > 0 for report in reports)

    # NCCL / gloo variables (of this shell; the launchers forward them to every rank)
    rows.append(check_comm_variables(have_gpus))

    # shared file system
    if not args.run_dir:
        rows.append(Row("shared file system", SKIP, "no --run-dir given"))
    else:
        failed = [f"{r['host']}: {r['fs'].get('detail', '?')}" for r in reports if not r.get("fs", {}).get("ok")]
        probe_dir = Path(args.run_dir) / ".preflight" / token
        seen = set(os.listdir(probe_dir)) if probe_dir.is_dir() else set()
        unseen = [r["host"] for r in reports if r.get("fs", {}).get("ok") and r["fs"]["file"] not in seen]
        if failed:
            rows.append(Row("shared file system", FAIL, "; ".join(failed)))
        elif unseen:
            rows.append(Row("shared file system", FAIL, f"{args.run_dir} is not shared: files written by"
                            f" {', '.join(unseen)} are not visible here"))
        else:
            rows.append(Row("shared file system", PASS, f"{os.path.abspath(args.run_dir)} writable"
                            + (f" and shared by all {len(reports)} nodes" if len(reports) > 1 else "")))
        shutil.rmtree(probe_dir, ignore_errors=True)
        try:
            probe_dir.parent.rmdir()  # .preflight/, when no other preflight is running
        except OSError:
            pass

    # shards
    if not args.shards:
        rows.append(Row("shards readable", SKIP, "no --shards given"))
    else:
        bad = [f"{r['host']}: {r['shards']['detail']}" for r in reports if not r["shards"]["ok"]]
        rows.append(Row("shards readable", FAIL, "; ".join(bad)) if bad else
                    Row("shards readable", PASS, reports[0]["shards"]["detail"]
                        + (f" on all {len(reports)} nodes" if len(reports) > 1 else "")))

    # the same environment everywhere
    keys = ("python", "torch", "deepspeed", "freeze_sha256")
    groups: dict[tuple, list[str]] = {}
    for report in reports:
        groups.setdefault(tuple(report["env"][k] for k in keys), []).append(report["host"])
    if len(groups) == 1:
        rows.append(Row("same environment", PASS, f"{len(reports)} node(s), packages hash {first['freeze_sha256']}"
                        f" ({first['packages']} distributions)"))
    else:
        detail = " | ".join(f"{', '.join(h)}: python {k[0]} torch {k[1]} deepspeed {k[2]} hash {k[3]}"
                            for k, h in groups.items())
        rows.append(Row("same environment", FAIL, detail))
    return rows


def check_comm_variables(have_gpus: bool) -> Row:
    variables = {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "GLOO_SOCKET", "TP_SOCKET"))}
    interfaces = set(os.listdir("/sys/class/net")) if os.path.isdir("/sys/class/net") else set()
    problems = []
    for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
        if name not in variables or not interfaces:
            continue
        value = variables[name]
        exclude, exact = value.startswith("^"), value.lstrip("^").startswith("=")
        wanted = [item for item in value.lstrip("^").lstrip("=").split(",") if item]
        if exclude:
            continue
        matches = [w for w in wanted if any(i == w if exact else i.startswith(w) for i in interfaces)]
        if not matches:
            problems.append(f"{name}={value} matches no interface here ({', '.join(sorted(interfaces))})")
    if variables.get("NCCL_DEBUG", "INFO").upper() not in ("VERSION", "WARN", "INFO", "TRACE", "ABORT"):
        problems.append(f"NCCL_DEBUG={variables['NCCL_DEBUG']} is not VERSION/WARN/INFO/TRACE")
    shown = ", ".join(f"{k}={v}" for k, v in sorted(variables.items())) or "none set (library defaults)"
    if problems:
        return Row("NCCL/gloo variables", FAIL, "; ".join(problems))
    if not have_gpus and not variables:
        return Row("NCCL/gloo variables", SKIP, "no GPU: NCCL unused; none set")
    return Row("NCCL/gloo variables", PASS, shown)


def print_table(rows: list[Row], stream=sys.stdout) -> None:
    width = max(len(row.check) for row in rows)
    print(f"{'CHECK'.ljust(width)}  STATUS  DETAIL", file=stream)
    for row in rows:
        print(f"{row.check.ljust(width)}  {row.status:<6}  {row.detail}", file=stream)
    counts = {status: sum(row.status == status for row in rows) for status in (PASS, FAIL, SKIP)}
    print(f"preflight: {counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP", file=stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", help="the run directory; must be writable and shared by every node")
    parser.add_argument("--shards", help="a shard directory, glob or tar (comma-separated for several)")
    parser.add_argument("--hosts", help="comma-separated hosts to check over pdsh/ssh")
    parser.add_argument("--expect-gpus", type=int, default=0, help="FAIL when a node has fewer GPUs")
    parser.add_argument("--timeout", type=int, default=300, help="seconds to wait for the nodes (default 300)")
    parser.add_argument("--json", action="store_true", help="also print the rows as one JSON line")
    parser.add_argument("--node-report", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.node_report:
        print(REPORT_MARKER + json.dumps(node_report(args.run_dir, args.shards, args.token or "local")), flush=True)
        return 0
    token = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
    if args.run_dir:
        try:
            probe_dir = Path(args.run_dir) / ".preflight" / token
            probe_dir.mkdir(parents=True, exist_ok=True)
            (probe_dir / "coordinator").write_text(socket.gethostname())
        except OSError:
            pass  # reported by the shared file system row
    method, hosts, reports, error = gather_reports(args, token)
    rows = evaluate(args, method, hosts, reports, error, token)
    print_table(rows)
    if args.json:
        print(json.dumps([row.__dict__ for row in rows]))
    return 1 if any(row.status == FAIL for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
