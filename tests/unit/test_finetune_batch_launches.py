"""How `python -m finetune.batch` launches its jobs: consecutive jobs of the same rank count share one launch
(`--in-ranks I,J,...`), whose ranks stop at the first job that fails; the batch records that job as unfinished
and launches the jobs after it again. (tests/integration/tasks/test_finetune_jobs.py runs two-rank jobs in one
launch and compares their figures with a launch of their own.)"""
from __future__ import annotations

import json

from conftest import REPO


def test_a_failing_job_ends_its_launch_and_the_jobs_after_it_run_in_the_next(tmp_path, capsys):
    from finetune import batch

    jobs = tmp_path / "jobs.yaml"
    out = tmp_path / "out"
    entries = [{"task": task, "config": str(REPO / f"finetune/configs/tiny_{task}.yaml"),
                "overrides": [f"train.stepz={steps}"]} for task, steps in (("snli_ve", 3), ("nlvr2", 4))]
    jobs.write_text(json.dumps({"out": str(out), "init_from": "none", "num_gpus": 1, "jobs": entries}))
    # --subprocess: the one-rank jobs go through the same launches as jobs of several ranks, without DeepSpeed's
    # launcher; a recipe error ends each job in its first seconds
    assert batch.main([str(jobs), "--subprocess"]) == 1
    printed = capsys.readouterr()
    launches = [line for line in printed.out.splitlines() if line.startswith("$ ")]
    assert len(launches) == 2, launches
    assert launches[0].endswith(f"-m finetune.batch {jobs} --in-ranks 0,1")
    assert launches[1].endswith(f"-m finetune.batch {jobs} --in-ranks 1")
    for line in ("[0] snli_ve-seed0: exit code 2", "[1] nlvr2-seed0: exit code 2",
                 "unfinished jobs: snli_ve-seed0, nlvr2-seed0"):
        assert line in printed.err, printed.err
    for number, name, other in ((1, "snli_ve-seed0", "nlvr2-seed0"), (2, "nlvr2-seed0", "snli_ve-seed0")):
        log = (out / name / "launch.log").read_text()  # each job's part of the launches' output
        assert f"=== [{number}/2] {name} ===" in log and "did you mean train.steps" in log
        assert other not in log
    assert json.loads((out / "results.json").read_text()) == []


def test_in_ranks_names_jobs_of_the_file(tmp_path, capsys):
    from finetune import batch

    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(json.dumps({"out": str(tmp_path / "out"), "jobs": [{"task": "snli_ve"}]}))
    assert batch.main([str(jobs), "--in-ranks", "0,3"]) == 2
    assert "--in-ranks: [3] outside 0..0 (1 jobs)" in capsys.readouterr().err
    assert batch.main([str(jobs), "--in-ranks", "first"]) == 2
    assert "give job indices separated by commas" in capsys.readouterr().err
