"""The DeepSpeed launcher across two "nodes" (mt-node1 = 127.0.0.2, mt-node2 = 127.0.0.3, reached over sshd
with key authentication and pdsh): one rank on each trains and checkpoints; a rank killed with SIGKILL ends
the whole job within 60 seconds, and launching again resumes from the checkpoint; a launch from a folder with
a space gets its arguments and values intact, and an HF_TOKEN reaches the ranks without being shown anywhere."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest

from cluster import signal_ranks
from cluster_fixtures import deepspeed_cpu_ops, shard_root, ssh_nodes  # noqa: F401 (pytest fixtures)
from cluster_helpers import (PYTHON, REPO, assert_finished, latest_step, metrics, pretrain_args, resumed_steps,
                             kill_tagged, run_env, wait_for)

pytestmark = pytest.mark.cluster
RUN_TIMEOUT = 300


def _launch(nodes, run_dir, shard_root, steps, every, tag, log):
    command = [PYTHON, "-m", "cluster.launch", "--hosts", ",".join(nodes), "--slots", "1",
               "--master-addr", nodes[0], "--", "--module", "pretrain",
               *pretrain_args(run_dir, shard_root, steps, every)]
    handle = open(log, "ab")
    return subprocess.Popen(command, cwd=REPO, env=run_env(MT_LAUNCH_TAG=tag), stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _finish(process, timeout, log, tag):
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        kill_tagged(tag)
        process.wait()
        pytest.fail(f"the launch did not end within {timeout}s\n{log.read_text()[-5000:]}")


def _no_ranks_left(tag):
    return not signal_ranks.find_ranks(tag)


def test_deepspeed_hostfile_one_rank_per_node(ssh_nodes, shard_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    steps, tag = 6, uuid.uuid4().hex[:12]
    returncode = _finish(_launch(ssh_nodes, run_dir, shard_root, steps, 3, tag, log), RUN_TIMEOUT, log, tag)
    text = log.read_text()
    assert returncode == 0, text[-5000:]
    # pdsh prefixes each node's lines with its name: one launcher per node, one rank each.
    for rank, node in enumerate(ssh_nodes):
        assert f"{node}: " in text and f"node_rank={rank}" in text, text[-5000:]
    assert "nnodes=2, num_local_procs=1" in text
    assert (run_dir / "launch" / "hostfile").read_text() == "".join(f"{n} slots=1\n" for n in ssh_nodes)
    assert "world size 2" in text
    assert_finished(run_dir, steps, text)
    wait_for(lambda: _no_ranks_left(tag), 30, "the ranks to exit")


def test_killed_rank_ends_the_job_and_relaunch_resumes(ssh_nodes, shard_root, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "launch.log"
    steps, every, tag = 60, 10, uuid.uuid4().hex[:12]  # ~0.3 s a step: long enough to be killed mid-run
    process = _launch(ssh_nodes, run_dir, shard_root, steps, every, tag, log)
    try:
        wait_for(lambda: latest_step(run_dir) is not None or process.poll() is not None, RUN_TIMEOUT,
                 "the first checkpoint", on_timeout=lambda: "\n" + log.read_text()[-4000:])
        assert process.poll() is None, f"the run ended before it could be interrupted\n{log.read_text()[-4000:]}"
        ranks = signal_ranks.find_ranks(tag)
        assert len(ranks) == 2, f"expected two rank processes tagged {tag}, found {ranks}"
        victim = next(pid for pid in ranks if signal_ranks._environ(pid).get("RANK") == "1")
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        returncode = _finish(process, 90, log, tag)
        took = time.monotonic() - killed_at
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            kill_tagged(tag)
    text = log.read_text()
    assert returncode != 0, f"the job exited 0 after losing a rank\n{text[-4000:]}"
    assert took < 60, f"the job took {took:.0f}s to end after a rank died (a hang)"
    wait_for(lambda: _no_ranks_left(tag), 30, "the surviving rank to exit")
    saved = latest_step(run_dir)
    assert saved is not None and saved >= every and saved < steps
    assert metrics(run_dir)[-1]["step"] < steps

    relaunch_log = tmp_path / "relaunch.log"
    returncode = _finish(_launch(ssh_nodes, run_dir, shard_root, steps, every, tag, relaunch_log), RUN_TIMEOUT,
                         relaunch_log, tag)
    text = relaunch_log.read_text()
    assert returncode == 0, text[-5000:]
    assert resumed_steps(text) == [saved], f"expected to resume from step {saved}\n{text[-5000:]}"
    assert_finished(run_dir, steps, text)


# Run as each rank: what arrived (arguments, folder, values; HF_TOKEN as a hash), and the processes of this machine
# whose command line holds the token: on the loopback nodes that is pdsh, ssh and every launcher of this launch.
PROBE = """\
import hashlib, json, os, sys
token = os.environ.get("HF_TOKEN")
shown_by_ps = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if token and token.encode() in handle.read():
                shown_by_ps.append(int(pid))
    except OSError:
        pass
print("PROBE " + json.dumps({"rank": os.environ.get("RANK"), "argv": sys.argv[1:], "cwd": os.getcwd(),
                             "token_sha256": token and hashlib.sha256(token.encode()).hexdigest(),
                             "shown_by_ps": shown_by_ps, "odd_value": os.environ.get("MT_ODD_VALUE")}), flush=True)
"""


def test_pdsh_launch_quotes_everything_and_keeps_the_token_off_command_lines(ssh_nodes, tmp_path):
    folder = tmp_path / "launch dir with space"
    folder.mkdir()
    (folder / "probe.py").write_text(PROBE)
    token, tag = f"hf_{uuid.uuid4().hex}", uuid.uuid4().hex[:12]
    arguments = ["it's $HOME and $(echo cmd) `echo tick`", 'a "double" quote', "100%n %h %%", "semi;colon|pipe&", ""]
    odd_value = 'a"b $HOME \'c\' `x` 100%n'
    command = [PYTHON, "-m", "cluster.launch", "--hosts", ",".join(ssh_nodes), "--slots", "1",
               "--master-addr", ssh_nodes[0], "--work-dir", str(folder / "launch"), "--set", f"MT_ODD_VALUE={odd_value}",
               "--", "probe.py", *arguments]
    try:
        result = subprocess.run(command, cwd=folder, env=run_env(HF_TOKEN=token, MT_LAUNCH_TAG=tag),
                                capture_output=True, text=True, timeout=RUN_TIMEOUT)
    finally:
        kill_tagged(tag)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    probes = [json.loads(line.split("PROBE ", 1)[1]) for line in output.splitlines() if "PROBE " in line]
    assert sorted(probe["rank"] for probe in probes) == ["0", "1"], output[-5000:]
    for probe in probes:
        assert probe["argv"][0].startswith("--local_rank=")  # DeepSpeed's launcher adds it
        assert probe["argv"][1:] == arguments, f"the arguments changed on the way: {probe['argv']}"
        assert probe["cwd"] == str(folder)
        assert probe["odd_value"] == odd_value
        assert probe["token_sha256"] == hashlib.sha256(token.encode()).hexdigest(), "HF_TOKEN did not reach the rank"
        assert probe["shown_by_ps"] == [], "HF_TOKEN is on a command line while the ranks run"
    assert token not in output
    env_file = folder / "launch" / "deepspeed_env"
    assert env_file.stat().st_mode & 0o777 == 0o600 and token in env_file.read_text()  # the one carrier
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o044:
            assert token not in path.read_text(errors="replace"), f"{path} is readable by others and holds HF_TOKEN"
