"""The fine-tuning door: `python -m finetune` (each task's recipe defaults, one-line config errors) and the
batch runner (`python -m finetune.batch`: job expansion, finished jobs, the results table, bad jobs files)."""
from __future__ import annotations

import json
import multiprocessing

import pytest

from conftest import REPO
from managertower.config import ConfigError

TINY = {t: str(REPO / f"finetune/configs/tiny_{t}.yaml") for t in ("vqav2", "nlvr2", "snli_ve", "flickr30k", "coco")}


def test_cli_config_errors_and_defaults(tmp_path, capsys):
    from finetune.__main__ import build_config, main

    local = ["model.text_expert=null"]  # the recipes name /path/to/roberta-base: a placeholder for the user's
    cfg = build_config("vqav2", None, None, local)
    assert cfg.task.name == "vqav2" and cfg.model.image_size == 576 and cfg.train.lr == 9e-6
    assert cfg.task.head_lr_mult == 50 and cfg.train.weight_decay == 0.06 and cfg.train.global_batch == 576
    for task, (res, epochs, batch, lr, head) in {"snli_ve": (384, 4, 64, 3e-6, 10), "nlvr2": (384, 5, 256, 1.4e-5, 10),
                                                  "flickr30k": (384, 20, 512, 6e-6, 5)}.items():
        cfg = build_config(task, None, None, local)
        assert (cfg.model.image_size, cfg.task.epochs, cfg.train.global_batch, cfg.train.lr,
                cfg.task.head_lr_mult) == (res, epochs, batch, lr, head)
    assert build_config("flickr30k", None, None, local).model.max_text_len == 40
    assert build_config("coco", None, None, local).task.retrieval_topk == 256
    with pytest.raises(ConfigError, match="does not exist"):
        build_config("nlvr2", TINY["nlvr2"], str(tmp_path / "nope.pt"), [])
    with pytest.raises(ConfigError, match="task.name"):
        build_config("nlvr2", TINY["vqav2"], None, ["task.name=vqav2"])
    assert main(["--task", "nlvr2", "--config", TINY["nlvr2"], "--print-config", "--local_rank=0"]) == 0
    assert "name: nlvr2" in capsys.readouterr().out
    assert main(["--task", "nlvr2", "--config", TINY["nlvr2"], "train.lr=oops"]) == 2


def test_batch_expands_tasks_seeds_and_learning_rates(tmp_path, capsys):
    from finetune import batch

    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(f"""
vars: {{shards: /data/shards, init_from: none}}
out: {tmp_path}/out
init_from: ${{init_from}}
num_gpus: 2
seeds: [0, 1]
overrides: [run.progress=false]
jobs:
  - task: nlvr2
    config: {TINY['nlvr2']}
    lr: [1.0e-4, 2.0e-4]
    overrides: ["task.train_shards=[${{shards}}/nlvr2/train-*.tar]"]
  - task: vqav2
    config: {TINY['vqav2']}
    seeds: [3]
    num_gpus: 1
""")
    jobs, out = batch.load_jobs(str(jobs_file), variables={"init_from": "/ckpt.pt"})
    assert out == tmp_path / "out"
    assert [j.name for j in jobs] == ["nlvr2-seed0-lr0.0001", "nlvr2-seed0-lr0.0002", "nlvr2-seed1-lr0.0001",
                                      "nlvr2-seed1-lr0.0002", "vqav2-seed3"]
    first = jobs[0]
    assert first.init_from == "/ckpt.pt" and first.num_gpus == 2 and jobs[-1].num_gpus == 1
    args = first.arguments()
    assert args[:6] == ["--task", "nlvr2", "--config", TINY["nlvr2"], "--from", "/ckpt.pt"]
    assert f"run.dir={tmp_path}/out/nlvr2-seed0-lr0.0001" in args and "train.lr=0.0001" in args
    assert "task.train_shards=[/data/shards/nlvr2/train-*.tar]" in args and "run.progress=false" in args
    command = batch.job_command(first)
    assert command[1:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2"] and "--module" in command
    assert batch.job_command(jobs[-1])[1:3] == ["-m", "finetune"]
    assert batch.main([str(jobs_file), "--count"]) == 0 and capsys.readouterr().out.strip() == "5"
    assert batch.main([str(jobs_file), "--dry-run", "--array-index", "4"]) == 0
    assert "vqav2-seed3" in capsys.readouterr().out
    assert batch.main([str(jobs_file), "--array-index", "9"]) == 2
    assert batch.main([str(jobs_file), "shards"]) == 2
    # a finished job is recognised; the results table is built from the summaries
    run_dir = jobs[-1].run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"steps": 5, "total_steps": 5, "wall_s": 12.0,
                                                      "vqa_score": 0.4321, "preempted": False}))
    (run_dir / "config.yaml").write_text("task: {eval_split: val}\ntrain: {lr: 0.0002}\n")
    assert batch.is_complete(run_dir) and not batch.is_complete(jobs[0].run_dir)
    rows = batch.write_results(jobs, out)
    assert rows == [{"task": "vqav2", "split": "val", "metric": "vqa_score", "value": 0.4321, "checkpoint": "/ckpt.pt",
                     "seed": 3, "lr": 0.0002, "wall_s": 12.0, "steps": 5, "job": "vqav2-seed3", "run_dir": str(run_dir)}]
    assert json.loads((out / "results.json").read_text())[0]["metric"] == "vqa_score"
    table = (out / "results.md").read_text()
    assert "| vqav2 | val | vqa_score | 43.21 |" in table and "12 s" in table


def test_batch_reports_bad_jobs_files(tmp_path, capsys):
    from finetune import batch

    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: [{task: nlvr2, config: x.yaml, colour: red}]\n")
    assert batch.main([str(bad), "--count"]) == 2
    assert "unknown keys" in capsys.readouterr().err
    undefined = tmp_path / "undefined.yaml"
    undefined.write_text("init_from: ${nowhere}\njobs: [{task: nlvr2}]\n")
    assert batch.main([str(undefined), "--count"]) == 2
    assert "${nowhere}" in capsys.readouterr().err
    assert batch.main([str(tmp_path / "missing.yaml")]) == 2


def _finish_job(jobs, index, out, barrier):
    """One SLURM array task at the end of its job: the summary lands, then the task records its row and rebuilds
    the table, at the same moment as the others."""
    from finetune import batch

    job = jobs[index]
    job.run_dir.mkdir(parents=True, exist_ok=True)
    barrier.wait(timeout=60)
    (job.run_dir / "summary.json").write_text(json.dumps({"steps": 3, "total_steps": 3, "wall_s": 1.0 + index,
                                                          "accuracy": index / 10, "preempted": False}))
    batch.write_results(jobs, out, own=[job])


def test_array_tasks_finishing_together_each_reach_the_table(tmp_path):
    """Real processes released by one barrier each finish a job and add its row: the table holds every row,
    repetition after repetition (rebuilding it from the summaries without the lock loses some)."""
    from finetune import batch

    tasks, repetitions = 6, 25
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(f"seeds: {list(range(tasks))}\njobs: [{{task: nlvr2, config: {TINY['nlvr2']}}}]\n")
    processes = multiprocessing.get_context("fork")  # the tasks start at once, without re-importing anything
    for repetition in range(repetitions):
        out = tmp_path / f"batch{repetition}"
        jobs, _ = batch.load_jobs(str(jobs_file), out=str(out))
        barrier = processes.Barrier(tasks)
        workers = [processes.Process(target=_finish_job, args=(jobs, index, out, barrier)) for index in range(tasks)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [worker.exitcode for worker in workers] == [0] * tasks
        rows = json.loads((out / "results.json").read_text())
        assert [row["job"] for row in rows] == [job.name for job in jobs], f"repetition {repetition}: {rows}"
        assert [row["value"] for row in rows] == [index / 10 for index in range(tasks)]
        table = (out / "results.md").read_text()
        assert table.count("| nlvr2 |") == tasks
        assert sorted(path.name for path in (out / "rows").iterdir()) == sorted(f"{job.name}.json" for job in jobs)
