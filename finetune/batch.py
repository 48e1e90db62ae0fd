"""Run a batch of fine-tuning jobs (tasks x seeds x learning rates) and tabulate the results like Table 3.

    python -m finetune.batch finetune/jobs/demo.yaml                       # every job in turn, here
    python -m finetune.batch finetune/jobs/paper.yaml --dry-run            # the expanded jobs and commands
    python -m finetune.batch JOBS.yaml --count                             # how many jobs (for --array)
    python -m finetune.batch JOBS.yaml --array-index 3                     # job 3 only (a SLURM array task)
    python -m finetune.batch JOBS.yaml --submit                            # sbatch --array=0-(n-1) ...
    python -m finetune.batch JOBS.yaml --submit --max-parallel 8 --sbatch-args "--gpus-per-node=1 --time=8:00:00"
    python -m finetune.batch JOBS.yaml --out runs/x init_from=ckpt.pt shards=/data/shards   # set ${vars}

A jobs file (see finetune/jobs/*.yaml):

    vars: {shards: runs/demo/shards, init_from: runs/demo/pretrain/export/model_fp32.pt}   # ${name} anywhere
    out: runs/demo/finetune          # the batch folder: one run folder per job, results.json, results.md
    init_from: ${init_from}          # --from of every job ("none": no pre-trained checkpoint)
    num_gpus: 2                      # ranks per job: 1 runs in this process, N > 1 via `deepspeed --num_gpus N`
    seeds: [0]                       # every job x every seed ...
    overrides: [train.log_every=10]  # ... with these overrides (a job's own come after)
    jobs:
      - {task: vqav2, config: finetune/configs/tiny_vqav2.yaml, lr: [1e-4, 2e-4], overrides: [...]}

Each job's run folder is OUT/TASK-seedS[-lrLR]; a job whose summary.json says it finished (steps == total) is
skipped, and a job that was killed resumes from its newest checkpoint (checkpoint.resume=auto). Consecutive
jobs to run with the same number of ranks (N > 1) share one launch: `deepspeed --num_gpus N --module
finetune.batch JOBS --in-ranks I,J,...` starts the ranks once and each rank runs the jobs in turn (each from its
own seed, as a launch of its own would: the same figures), so a batch pays the launcher's and the ranks' start-up
once instead of once per job. The ranks stop at the first job that fails or is stopped; the batch then launches
the jobs after it again (a failed job does not stop the others). Each job's output also goes to its
RUN/launch.log. After every job (run or skipped) the batch writes that job's rows, from its summary, to
OUT/rows/NAME.json, then rebuilds
OUT/results.json (task, split, metric, value, checkpoint, seed, lr, wall_s, ...) and OUT/results.md
(task | split | metric | value | checkpoint | wall time) from every job's row file, holding an exclusive lock
on OUT/results.lock (fcntl.flock): SLURM array tasks that finish at the same moment each add their own row,
and whichever rebuilds last sees them all.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from managertower.console import silence_known_warnings
from managertower.io import atomic_write
from managertower.launch import launcher_command, local_master_port, rank_env

REPO = Path(__file__).resolve().parent.parent
SBATCH_SCRIPT = "cluster/slurm/finetune_array.sbatch"
# The numbers each task reports in the results table (Table 3's columns), in order.
HEADLINE = {
    "vqav2": ("vqa_score",),
    "nlvr2": ("accuracy",),
    "snli_ve": ("accuracy",),
    "flickr30k": ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10"),
    "coco": ("ir_r1", "ir_r5", "ir_r10", "tr_r1", "tr_r5", "tr_r10"),
}


class JobsError(ValueError):
    """A jobs file or argument the user can fix; the message says how."""


@dataclass
class Job:
    index: int
    name: str
    task: str
    config: str
    seed: int
    lr: float | None
    init_from: str | None
    overrides: list[str]
    run_dir: Path
    num_gpus: int = 1
    extra: dict = field(default_factory=dict)

    def arguments(self) -> list[str]:
        """The `python -m finetune` arguments of this job."""
        args = ["--task", self.task, "--config", self.config]
        if self.init_from:
            args += ["--from", self.init_from]
        args += [f"run.dir={self.run_dir}", f"train.seed={self.seed}"]
        if self.lr is not None:
            args.append(f"train.lr={self.lr}")
        return args + list(self.overrides)


# ------------------------------------------------------------------------------------------- jobs file


def _substitute(value, variables: dict):
    if isinstance(value, str):
        def replace(match):
            name = match.group(1)
            if name not in variables:
                raise JobsError(f"${{{name}}} is not defined: add it under vars: in the jobs file or pass {name}=VALUE")
            return str(variables[name])

        return re.sub(r"\$\{(\w+)\}", replace, value)
    if isinstance(value, list):
        return [_substitute(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables) for k, v in value.items()}
    return value


def _as_list(value, what: str) -> list:
    if value is None:
        return [None]
    if isinstance(value, (list, tuple)):
        if not value:
            raise JobsError(f"{what} is an empty list")
        return list(value)
    return [value]


def load_jobs(path: str, out: str | None = None, variables: dict | None = None,
              num_gpus: int | None = None) -> tuple[list[Job], Path]:
    """Expand a jobs file into its jobs (in order: entries x seeds x learning rates) and the batch folder."""
    if not os.path.exists(path):
        raise JobsError(f"jobs file {path!r} does not exist (see finetune/jobs/)")
    with open(path) as handle:
        try:
            spec = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise JobsError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("jobs"), list) or not spec["jobs"]:
        raise JobsError(f"{path} needs a non-empty `jobs:` list (see finetune/jobs/demo.yaml)")
    known = {"vars", "out", "init_from", "num_gpus", "seeds", "lr", "overrides", "jobs"}
    unknown = set(spec) - known
    if unknown:
        raise JobsError(f"{path}: unknown keys {sorted(unknown)}; the keys are {sorted(known)}")
    merged_vars = {k: str(v) for k, v in (spec.get("vars") or {}).items()}
    merged_vars.update(variables or {})
    spec = _substitute({k: v for k, v in spec.items() if k != "vars"}, merged_vars)
    out_dir = Path(out or spec.get("out") or "runs/finetune-batch")
    default_ranks = int(num_gpus or spec.get("num_gpus") or 1)
    jobs: list[Job] = []
    names: set[str] = set()
    for number, entry in enumerate(spec["jobs"]):
        if not isinstance(entry, dict) or "task" not in entry:
            raise JobsError(f"{path}: jobs[{number}] needs at least `task:` (and usually `config:`)")
        unknown = set(entry) - {"task", "config", "seeds", "lr", "init_from", "overrides", "num_gpus", "name"}
        if unknown:
            raise JobsError(f"{path}: jobs[{number}] has unknown keys {sorted(unknown)}")
        task = str(entry["task"])
        config = str(entry.get("config") or f"finetune/configs/{task}.yaml")
        if not os.path.isabs(config) and not os.path.exists(config) and (REPO / config).exists():
            config = str(REPO / config)
        init_from = entry.get("init_from", spec.get("init_from"))
        init_from = None if init_from in (None, "", "none", "None") else str(init_from)
        seeds = _as_list(entry.get("seeds", spec.get("seeds", [0])), f"jobs[{number}].seeds")
        lrs = _as_list(entry.get("lr", spec.get("lr")), f"jobs[{number}].lr")
        overrides = [str(o) for o in (spec.get("overrides") or []) + (entry.get("overrides") or [])]
        for seed, lr in itertools.product(seeds, lrs):
            seed = 0 if seed is None else int(seed)
            lr = None if lr is None else float(lr)
            name = str(entry.get("name") or task) + f"-seed{seed}" + ("" if lr is None else f"-lr{lr:g}")
            if name in names:
                raise JobsError(f"{path}: two jobs are both named {name}; give one a `name:`")
            names.add(name)
            jobs.append(Job(len(jobs), name, task, config, seed, lr, init_from, overrides, out_dir / name,
                            int(entry.get("num_gpus", default_ranks))))
    return jobs, out_dir


# -------------------------------------------------------------------------------------------- running


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def is_complete(run_dir: Path) -> bool:
    summary = read_summary(run_dir)
    return bool(summary) and not summary.get("preempted") and summary.get("steps") == summary.get("total_steps")


def job_command(job: Job, port: int | None = None) -> list[str]:
    """The command that runs this job alone (what --dry-run lists): `python -m finetune ARGS`, or the DeepSpeed
    launcher's command for a job of several ranks. The batch itself runs consecutive jobs of several ranks in
    shared launches (`launch_command`)."""
    return launcher_command("finetune", job.arguments(), job.num_gpus,
                            master_port=port if port is not None else local_master_port(salt=job.index))


def banner(job: Job, total: int) -> str:
    """The line that opens a job's output; a shared launch's output is split into the jobs' launch.log files at
    these lines."""
    return f"=== [{job.index + 1}/{total}] {job.name} ==="


def run_in_process(job: Job) -> int:
    """Run (or resume) a one-rank job in this process; returns its exit code."""
    from finetune.__main__ import main as finetune_main

    job.run_dir.mkdir(parents=True, exist_ok=True)
    print(f"$ python -m finetune {' '.join(job.arguments())}", flush=True)
    return finetune_main(job.arguments())


def run_in_ranks(jobs: list[Job], total: int) -> int:
    """A rank of a shared launch (`--in-ranks`): run `jobs` in turn, each as `python -m finetune` would, and stop
    at the first that fails or stops before its last step (a rank cannot tell whether its peers could go on).
    Returns that job's exit code, 0 when all finished."""
    from finetune.__main__ import main as finetune_main
    from managertower import dist

    dist.discover_env()
    for job in jobs:
        if dist.is_main():
            job.run_dir.mkdir(parents=True, exist_ok=True)
            print("\n" + banner(job, total), flush=True)
        code = finetune_main(job.arguments())
        if code != 0 or not is_complete(job.run_dir):
            return code
    return 0


def launch_command(jobs_file: str, group: list[Job], rank_args: list[str]) -> list[str]:
    """The DeepSpeed launcher's command that runs `group` (jobs of the same rank count) in one launch:
    `--module finetune.batch JOBS RANK_ARGS --in-ranks I,J,...`."""
    indices = ",".join(str(job.index) for job in group)
    return launcher_command("finetune.batch", [jobs_file, *rank_args, "--in-ranks", indices], group[0].num_gpus,
                            master_port=local_master_port(salt=group[0].index))


def run_launch(command: list[str], group: list[Job], total: int, out_dir: Path,
               all_jobs: list[Job]) -> tuple[int, dict[str, float]]:
    """Run one launch of `group`, echoing its output and keeping each job's part in its RUN/launch.log (line by
    line: readable while it runs); a job's rows are recorded as soon as the next one starts. Returns the exit
    code and, for each job that started, when (time.time())."""
    print("$ " + " ".join(command), flush=True)
    banners = {banner(job, total): job for job in group}
    started: dict[str, float] = {}
    current, log = group[0], None
    process = subprocess.Popen(command, env=rank_env(group[0].num_gpus), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            job = banners.get(line.strip())
            if job is not None:
                if current.name in started:
                    write_results(all_jobs, out_dir, own=[current])
                started[job.name] = time.time()
                current = job
                if log is not None:
                    log.close()
                    log = None
            if log is None:
                current.run_dir.mkdir(parents=True, exist_ok=True)
                log = open(current.run_dir / "launch.log", "a", buffering=1)
            sys.stdout.write(line)
            log.write(line)
        return process.wait(), started
    finally:
        if log is not None:
            log.close()


# -------------------------------------------------------------------------------------------- results


def job_rows(job: Job) -> list[dict]:
    summary = read_summary(job.run_dir)
    if not summary:
        return []
    config_file = job.run_dir / "config.yaml"
    split, lr = "", job.lr
    if config_file.exists():
        cfg = yaml.safe_load(config_file.read_text()) or {}
        split = (cfg.get("task") or {}).get("eval_split", "")
        lr = lr if lr is not None else (cfg.get("train") or {}).get("lr")
    rows = []
    for metric in HEADLINE.get(job.task, ()):
        if metric in summary:
            rows.append({"task": job.task, "split": split, "metric": metric, "value": float(summary[metric]),
                         "checkpoint": job.init_from or "none", "seed": job.seed, "lr": lr,
                         "wall_s": summary.get("wall_s"), "steps": summary.get("steps"), "job": job.name,
                         "run_dir": str(job.run_dir)})
    if not rows:  # e.g. VQAv2 test-dev: predictions for the server, no score here
        rows.append({"task": job.task, "split": split, "metric": "predictions", "value": None,
                     "checkpoint": job.init_from or "none", "seed": job.seed, "lr": lr,
                     "wall_s": summary.get("wall_s"), "steps": summary.get("steps"), "job": job.name,
                     "run_dir": str(job.run_dir)})
    return rows


def results_table(rows: list[dict]) -> str:
    """Markdown, shaped like the paper's Table 3: task | split | metric | value | checkpoint | wall time."""
    lines = ["| task | split | metric | value | checkpoint | seed | lr | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        value = "-" if row["value"] is None else f"{100 * row['value']:.2f}"
        wall = "-" if row.get("wall_s") is None else f"{float(row['wall_s']):.0f} s"
        lr = "-" if row.get("lr") is None else f"{float(row['lr']):g}"
        lines.append(f"| {row['task']} | {row['split']} | {row['metric']} | {value} | {row['checkpoint']} | "
                     f"{row['seed']} | {lr} | {wall} |")
    return "\n".join(lines)


def rows_file(job: Job, out_dir: Path) -> Path:
    """Where a job's rows wait for the table: OUT/rows/NAME.json, written only by the process that ran the job."""
    return Path(out_dir) / "rows" / f"{job.name}.json"


def write_job_rows(job: Job, out_dir: Path) -> list[dict]:
    """Record one job's rows (from its summary) in its own file, whole (atomic_write); nothing before it has a
    summary."""
    rows = job_rows(job)
    if rows:
        atomic_write(rows_file(job, out_dir), json.dumps(rows, indent=1))
    return rows


@contextlib.contextmanager
def results_lock(out_dir: Path):
    """An exclusive fcntl.flock on OUT/results.lock, held while the table is rebuilt: array tasks on any node
    (flock works across the nodes of NFS; Lustre needs its `flock` mount option) rebuild one after another."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def merge_results(jobs: list[Job], out_dir: Path) -> list[dict]:
    """Rebuild OUT/results.json and OUT/results.md from the row files of `jobs` (in job order), under the lock:
    each rebuild reads the row files after the previous one wrote its table, so the last holds every row
    recorded before it."""
    out_dir = Path(out_dir)
    with results_lock(out_dir):
        rows = []
        for job in jobs:
            path = rows_file(job, out_dir)
            if path.exists():
                rows.extend(json.loads(path.read_text()))
        atomic_write(out_dir / "results.json", json.dumps(rows, indent=1))
        atomic_write(out_dir / "results.md", "Values are percentages (VQA score, accuracy, recall@K).\n\n"
                     + results_table(rows) + "\n")
    return rows


def write_results(jobs: list[Job], out_dir: Path, own: list[Job] | None = None) -> list[dict]:
    """Record the rows of the jobs this process ran (`own`; default every job of `jobs`), then rebuild the table
    from every job's row file. A SLURM array task owns one job: it never writes another job's rows, which that
    job's own task may be rewriting."""
    for job in jobs if own is None else own:
        write_job_rows(job, out_dir)
    return merge_results(jobs, out_dir)


# ------------------------------------------------------------------------------------------------ main


def _indices(text: str, count: int) -> list[int]:
    """`--in-ranks I,J,...`: job indices within 0..count-1."""
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise JobsError(f"--in-ranks {text!r}: give job indices separated by commas (e.g. 0,1,2)") from None
    outside = [index for index in indices if not 0 <= index < count]
    if outside:
        raise JobsError(f"--in-ranks: {outside} outside 0..{count - 1} ({count} jobs)")
    return indices


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.batch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jobs_file")
    parser.add_argument("--out", help="the batch folder (default: the jobs file's out:)")
    parser.add_argument("--array-index", type=int, default=None, help="run only job I (a SLURM array task)")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and the command that runs each alone")
    parser.add_argument("--count", action="store_true", help="print the number of jobs")
    parser.add_argument("--submit", action="store_true", help=f"sbatch --array=0-(n-1) {SBATCH_SCRIPT} JOBS")
    parser.add_argument("--sbatch-args", default="", help="with --submit: more sbatch options, one string "
                        "(e.g. \"--partition=gpu --gpus-per-node=8 --time=12:00:00\")")
    parser.add_argument("--max-parallel", type=int, default=None,
                        help="with --submit: at most N array tasks at once (--array=0-(n-1)%%N)")
    parser.add_argument("--num-gpus", type=int, default=None, help="ranks per job (overrides num_gpus:)")
    parser.add_argument("--subprocess", action="store_true", help="launch one-rank jobs as subprocesses too")
    parser.add_argument("--in-ranks", metavar="I,J,...", default=None,
                        help="run jobs I, J, ... in turn on the ranks of this launch (what the batch's own launches "
                        "pass; see above)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("variables", nargs="*", help="NAME=VALUE: set a ${NAME} of the jobs file")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    silence_known_warnings()
    try:
        variables = {}
        for item in args.variables:
            if "=" not in item:
                raise JobsError(f"{item!r}: variables are NAME=VALUE (e.g. init_from=runs/pretrain)")
            key, _, value = item.partition("=")
            variables[key.strip()] = value
        jobs, out_dir = load_jobs(args.jobs_file, args.out, variables, args.num_gpus)
        if args.array_index is not None and not 0 <= args.array_index < len(jobs):
            raise JobsError(f"--array-index {args.array_index} is outside 0..{len(jobs) - 1} ({len(jobs)} jobs)")
        in_ranks = _indices(args.in_ranks, len(jobs)) if args.in_ranks is not None else []
    except JobsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.count:
        print(len(jobs))
        return 0
    if args.submit:
        return submit(args, jobs, out_dir)
    chosen = jobs if args.array_index is None else [jobs[args.array_index]]
    if args.dry_run:
        print(f"{len(jobs)} jobs -> {out_dir}")
        for job in chosen:
            state = "done" if is_complete(job.run_dir) else "to run"
            print(f"[{job.index}] {job.name} ({state}, {job.num_gpus} rank{'s' if job.num_gpus > 1 else ''})\n    "
                  + " ".join(job_command(job)))
        return 0
    if args.in_ranks is not None:
        return run_in_ranks([jobs[index] for index in in_ranks], len(jobs))
    failed: list[str] = []
    pending = []
    for job in chosen:
        if is_complete(job.run_dir):
            print(f"[{job.index}] {job.name}: complete, skipped ({job.run_dir / 'summary.json'})", flush=True)
            write_results(jobs, out_dir, own=[job])
        else:
            pending.append(job)
    rank_args = ([] if args.out is None else ["--out", args.out]) \
        + ([] if args.num_gpus is None else ["--num-gpus", str(args.num_gpus)]) + list(args.variables)

    def unfinished(job: Job, code: int, since: float) -> None:
        failed.append(job.name)
        print(f"[{job.index}] {job.name}: exit code {code} after {time.time() - since:.0f} s"
              + ("" if code else " (stopped before its last step: run the batch again to resume)"),
              file=sys.stderr, flush=True)

    while pending:
        started_at = time.time()
        first = pending[0]
        if first.num_gpus <= 1 and not args.subprocess:
            pending.pop(0)
            print("\n" + banner(first, len(jobs)), flush=True)
            code = run_in_process(first)
            if code != 0 or not is_complete(first.run_dir):
                unfinished(first, code, started_at)
            write_results(jobs, out_dir, own=[first])
            continue
        group = list(itertools.takewhile(lambda job: job.num_gpus == first.num_gpus, pending))
        code, started = run_launch(launch_command(args.jobs_file, group, rank_args), group, len(jobs), out_dir, jobs)
        retry = []
        for job in group:
            if not is_complete(job.run_dir):
                if job.name in started or job is first:  # the launch ends with at least `first` settled
                    unfinished(job, code, started.get(job.name, started_at))
                else:
                    retry.append(job)
            write_results(jobs, out_dir, own=[job])
        pending = retry + pending[len(group):]
    rows = merge_results(jobs, out_dir)
    print("\n" + results_table(rows))
    print(f"\nresults: {out_dir / 'results.json'}, {out_dir / 'results.md'}")
    if failed:
        print(f"unfinished jobs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def submit(args, jobs: list[Job], out_dir: Path) -> int:
    """sbatch one array over the jobs: task I runs `--array-index I` (cluster/slurm/finetune_array.sbatch) in the
    submit directory; every task records its job's rows and rebuilds OUT/results.{json,md} under the batch's
    lock when its job ends, so the table is whole once the last one finishes. Prints the job id."""
    if shutil.which("sbatch") is None:
        print("error: sbatch is not on PATH: --submit needs SLURM (or run the jobs here without --submit)",
              file=sys.stderr)
        return 2
    try:
        sbatch_args = shlex.split(args.sbatch_args)
    except ValueError as error:
        print(f"error: --sbatch-args {args.sbatch_args!r}: {error}", file=sys.stderr)
        return 2
    if args.max_parallel is not None and args.max_parallel < 1:
        print(f"error: --max-parallel {args.max_parallel}: give a number >= 1", file=sys.stderr)
        return 2
    array = f"--array=0-{len(jobs) - 1}" + ("" if args.max_parallel is None else f"%{args.max_parallel}")
    extra = [] if args.out is None else ["--out", os.path.abspath(args.out)]
    if args.num_gpus is not None:
        extra += ["--num-gpus", str(args.num_gpus)]
    extra += list(args.variables)
    command = ["sbatch", "--parsable", array, *sbatch_args, str(REPO / SBATCH_SCRIPT),
               os.path.abspath(args.jobs_file), *extra]
    print("$ " + " ".join(shlex.quote(part) for part in command), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, MT_REPO=str(REPO))  # the array tasks find cluster/slurm/common.sh from anywhere
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"error: sbatch failed ({result.returncode}): {result.stderr.strip()}", file=sys.stderr)
        return result.returncode
    job_id = result.stdout.strip().split(";")[0]
    print(f"submitted array job {job_id}: {len(jobs)} tasks; results in {out_dir / 'results.md'}"
          f" as they finish (squeue -j {job_id})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
