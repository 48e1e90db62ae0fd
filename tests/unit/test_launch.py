"""The one rank environment and the one launcher command every door uses (managertower.launch), and the
layering they keep: the library builds commands and parses no arguments, the doors parse and run."""
from __future__ import annotations

import base64
import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from managertower import launch
from managertower.launch import (PDSH_NODE_RANK, REPO, launcher_command, local_master_port, node_launcher_command,
                                 pdsh_command, rank_env, world_info)


def test_rank_env_shares_the_cores_and_puts_the_repository_first():
    env = rank_env(2, {"PYTHONPATH": f"/elsewhere{os.pathsep}{REPO}", "DS_ACCELERATOR": "cpu"}, cpu_count=8)
    assert env["OMP_NUM_THREADS"] == "4"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]  # no second copy of the repository
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["HF_HUB_OFFLINE"] == "1"
    assert rank_env(16, {"DS_ACCELERATOR": "cpu"}, cpu_count=2)["OMP_NUM_THREADS"] == "1"  # at least one thread


def test_rank_env_keeps_what_the_user_set():
    given = {"DS_ACCELERATOR": "cuda", "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "0", "OTHER": "x"}
    env = rank_env(1, given, cpu_count=2)
    assert {key: env[key] for key in given} == given
    assert given == {"DS_ACCELERATOR": "cuda", "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "0",
                     "OTHER": "x"}  # the caller's mapping is left as it was


def test_rank_env_chooses_the_cpu_only_without_cuda(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: False)
    assert rank_env(2, {})["DS_ACCELERATOR"] == "cpu"
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    assert "DS_ACCELERATOR" not in rank_env(2, {})  # DeepSpeed picks the GPU itself


def test_rank_env_matches_this_machine():
    import torch

    env = rank_env(2, {})
    assert ("DS_ACCELERATOR" in env) == (not torch.cuda.is_available())


def test_one_rank_is_plain_python():
    assert launcher_command("pretrain", ["--config", "c.yaml"], 1) == [sys.executable, "-m", "pretrain",
                                                                      "--config", "c.yaml"]


def test_local_ranks_run_the_deepspeed_launcher():
    command = launcher_command("finetune", ["--task", "nlvr2", "a=1"], 2, master_port=29123)
    assert command == [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port=29123",
                       "--module", "finetune", "--task", "nlvr2", "a=1"]
    default_port = int(launcher_command("pretrain", [], 2)[5].split("=")[1])
    assert default_port == local_master_port() and 29500 <= default_port < 31500
    assert local_master_port(salt=1) != local_master_port(salt=0)


def test_hostfile_launch_with_launcher_arguments_and_a_script():
    command = launcher_command("pretrain", ["a=1"], hostfile=Path("/run/hostfile"), master_addr="node1",
                               master_port=15000, launcher_args=["--no_ssh", "--node_rank=1"], unbuffered=True,
                               python="/venv/bin/python")
    assert command == ["/venv/bin/python", "-u", "-m", "deepspeed.launcher.runner", "--hostfile=/run/hostfile",
                       "--master_addr=node1", "--master_port=15000", "--no_ssh", "--node_rank=1", "--module",
                       "pretrain", "a=1"]
    script = launcher_command(None, ["train.py", "x"], hostfile="h", master_port=1, python="py")
    assert script == ["py", "-m", "deepspeed.launcher.runner", "--hostfile=h", "--master_port=1", "train.py", "x"]


def test_pdsh_command_quotes_every_part():
    """The remote command pdsh hands each node's shell: the folder and every argument one shell word each, and
    every '%' doubled (pdsh expands %h, %u, %n and %% itself) except the node rank pdsh is to fill in."""
    odd = ["it's $HOME", 'a "quoted" `word`', "100%n %h", "", "x;y|z&"]
    node = node_launcher_command(None, ["probe.py", *odd], [("n1", 2), ("n2", 2)], master_addr="n1",
                                 master_port=29000, node_rank=PDSH_NODE_RANK, python="/venv bin/python")
    assert node[:4] == ["/venv bin/python", "-u", "-m", "deepspeed.launcher.launch"]
    assert node[-6:] == ["probe.py", *odd]
    assert json.loads(base64.urlsafe_b64decode(world_info([("n1", 2), ("n2", 2)]))) == {"n1": [0, 1], "n2": [0, 1]}
    pdsh = pdsh_command(["n1", "n2"], node, workdir="/runs/a b's")
    assert pdsh[:6] == ["pdsh", "-S", "-f", "1024", "-w", "n1,n2"] and len(pdsh) == 7
    words = shlex.split(pdsh[6])
    assert words[:4] == ["cd", "/runs/a b's", "&&", "exec"]
    assert words[4:] == [part if part == "--node_rank=%n" else part.replace("%", "%%") for part in node]
    assert pdsh_command(["n1"], ["pkill", "-f", "[d]x"]) == ["pdsh", "-S", "-f", "1024", "-w", "n1", "pkill -f '[d]x'"]


LIBRARY = Path(__file__).resolve().parents[2] / "managertower"


@pytest.mark.parametrize("pattern", [r"^\s*(import|from)\s+argparse\b", r"^\s*(import|from)\s+subprocess\b"])
def test_the_library_parses_no_arguments_and_starts_no_process(pattern):
    offenders = [str(path.relative_to(LIBRARY)) for path in LIBRARY.rglob("*.py")
                 if re.search(pattern, path.read_text(), re.MULTILINE)]
    assert offenders == [], f"{pattern} in {offenders}: parsing and running belong to the doors"
