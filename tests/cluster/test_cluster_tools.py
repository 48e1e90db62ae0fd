"""The hostfile writer, node-list expansion, the launch wrapper's command and environment file, and the
preflight check run for real on this machine (and over pdsh on the two loopback nodes when sshd is up)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tarfile
import uuid

import pytest

from cluster import hostfile, launch, preflight
from cluster_fixtures import ssh_nodes  # noqa: F401 (a pytest fixture)
from cluster_helpers import PYTHON, REPO, run_env

pytestmark = pytest.mark.cluster

NODELISTS = {
    "node[01-04,07]": ["node01", "node02", "node03", "node04", "node07"],
    "gpu1": ["gpu1"],
    "a,b,c": ["a", "b", "c"],
    "n[1-3],login[08-10]": ["n1", "n2", "n3", "login08", "login09", "login10"],
    "rack[1-2]-gpu[1-2]": ["rack1-gpu1", "rack1-gpu2", "rack2-gpu1", "rack2-gpu2"],
    "x[9-11]": ["x9", "x10", "x11"],
    "node[001-002],node[007]": ["node001", "node002", "node007"],
}


@pytest.mark.parametrize("nodelist,expected", NODELISTS.items())
def test_expand_nodelist(nodelist, expected):
    assert hostfile.expand_nodelist(nodelist) == expected


@pytest.mark.skipif(not shutil.which("scontrol"), reason="SLURM's scontrol is not installed: nothing to compare with")
def test_pure_python_expansion_agrees_with_scontrol():
    for nodelist in NODELISTS:
        assert hostfile.scontrol_hostnames(nodelist) == hostfile.expand_nodelist(nodelist), nodelist


@pytest.mark.parametrize("bad", ["node[01-", "node]1[", "n[3-1]", "n[a-b]", ""])
def test_bad_nodelist_says_what_is_wrong(bad):
    with pytest.raises(hostfile.NodelistError):
        hostfile.expand_nodelist(bad)


def test_hostfile_round_trip_and_atomic_write(tmp_path):
    path = hostfile.write_hostfile(tmp_path / "sub" / "hostfile", ["n1", "n2"], 8)
    assert path.read_text() == "n1 slots=8\nn2 slots=8\n"
    assert hostfile.parse_hostfile(path.read_text() + "# comment\n\n") == [("n1", 8), ("n2", 8)]
    assert [p.name for p in path.parent.iterdir()] == ["hostfile"]  # no temp file left behind
    with pytest.raises(ValueError):
        hostfile.format_hostfile(["n1"], 0)


def test_hostfile_cli_from_slurm_nodelist_and_hosts(tmp_path):
    out = tmp_path / "hostfile"
    env = run_env(SLURM_JOB_NODELIST="node[01-02]", SLURM_GPUS_ON_NODE="4")
    result = subprocess.run([PYTHON, "-m", "cluster.hostfile", "--out", str(out)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_text() == "node01 slots=4\nnode02 slots=4\n"
    result = subprocess.run([PYTHON, "-m", "cluster.hostfile", "--hosts", "mt-node1,mt-node2", "--slots", "1"],
                            env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout == "mt-node1 slots=1\nmt-node2 slots=1\n"
    env.pop("SLURM_JOB_NODELIST")
    env.pop("SLURM_NODELIST", None)
    result = subprocess.run([PYTHON, "-m", "cluster.hostfile"], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and "no hosts" in result.stderr  # one clear line, no traceback
    assert "Traceback" not in result.stderr


def test_default_slots_from_slurm():
    assert hostfile.default_slots({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert hostfile.default_slots({"SLURM_GPUS_PER_NODE": "a100:4"}) == 4


def test_launch_dry_run_writes_hostfile_and_environment(tmp_path):
    run_dir = tmp_path / "run"
    env = run_env(NCCL_SOCKET_IFNAME="lo", NCCL_DEBUG="WARN", MT_DATA_ROOT="/shared/data", CUDA_VISIBLE_DEVICES="0",
                  SECRET_THING="not forwarded")
    command = [PYTHON, "-m", "cluster.launch", "--hosts", "mt-node1,mt-node2", "--slots", "2", "--master-port",
               "29123", "--set", "GLOO_SOCKET_IFNAME=lo", "--dry-run", "--", "--module", "pretrain",
               "--config", "pretrain/configs/tiny.yaml", f"run.dir={run_dir}"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()
    pdsh = shlex.split(printed[0])
    assert pdsh[:6] == ["pdsh", "-S", "-f", "1024", "-w", "mt-node1,mt-node2"] and len(pdsh) == 7
    remote = shlex.split(pdsh[6])  # the one command line each node's shell runs
    assert remote[:4] == ["cd", str(REPO), "&&", "exec"]
    assert remote[remote.index("--node-env") + 1] == str(run_dir / "launch" / "deepspeed_env")
    node = remote[remote.index("--") + 1:]
    assert node[1:4] == ["-u", "-m", "deepspeed.launcher.launch"] and "--node_rank=%n" in node
    assert "--master_addr=mt-node1" in node and "--master_port=29123" in node
    assert node[-5:] == ["--module", "pretrain", "--config", "pretrain/configs/tiny.yaml", f"run.dir={run_dir}"]
    assert (run_dir / "launch" / "hostfile").read_text() == "mt-node1 slots=2\nmt-node2 slots=2\n"
    forwarded = dict(line.split("=", 1) for line in (run_dir / "launch" / "deepspeed_env").read_text().splitlines())
    assert forwarded["NCCL_SOCKET_IFNAME"] == "lo" and forwarded["NCCL_DEBUG"] == "WARN"
    assert forwarded["DS_ACCELERATOR"] == "cpu" and forwarded["OMP_NUM_THREADS"] == "1"
    assert forwarded["HF_HUB_OFFLINE"] == "1" and forwarded["MT_DATA_ROOT"] == "/shared/data"
    assert forwarded["GLOO_SOCKET_IFNAME"] == "lo"
    assert forwarded["PYTHONPATH"].split(":")[0] == str(REPO)
    assert forwarded["PATH"].split(":")[0] == str(launch.Path(PYTHON).parent)  # the venv's bin first
    assert forwarded["MT_LAUNCH_TAG"]
    assert "CUDA_VISIBLE_DEVICES" not in forwarded and "SECRET_THING" not in forwarded


def test_launch_dry_run_hides_credentials_and_keeps_them_in_an_owner_only_file(tmp_path):
    """HF_TOKEN (and any variable named like a credential) is forwarded through the 0600 environment file only:
    --dry-run shows it as <hidden>, and the command that would run does not hold it."""
    run_dir = tmp_path / "run"
    token, key = f"hf_{uuid.uuid4().hex}", f"k{uuid.uuid4().hex}"
    env = run_env(HF_TOKEN=token, MT_SERVICE_API_KEY=key, TOKENIZERS_PARALLELISM="false")
    command = [PYTHON, "-m", "cluster.launch", "--hosts", "mt-node1,mt-node2", "--slots", "1", "--dry-run",
               "--forward", "MT_SERVICE_API_KEY", "--", "--module", "pretrain", f"run.dir={run_dir}"]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for secret in (token, key):
        assert secret not in result.stdout and secret not in result.stderr  # neither the command nor the file
    shown = dict(line.split("=", 1) for line in result.stdout.splitlines()[1:])
    assert shown["HF_TOKEN"] == "<hidden>" and shown["MT_SERVICE_API_KEY"] == "<hidden>"
    assert shown["TOKENIZERS_PARALLELISM"] == "false" and shown["HF_HUB_OFFLINE"] == "1"  # not credentials
    env_file = run_dir / "launch" / "deepspeed_env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    forwarded = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert forwarded["HF_TOKEN"] == token and forwarded["MT_SERVICE_API_KEY"] == key
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.stat().st_mode & 0o044:
            assert token not in path.read_text(errors="replace"), f"{path} is readable by others and holds HF_TOKEN"


def test_launch_node_and_torchrun_modes_from_slurm_variables(tmp_path):
    env = run_env(SLURM_JOB_NODELIST="vm[1-2]", SLURM_NODEID="1", SLURM_JOB_ID="4242", SLURM_STEP_ID="0")
    base = [PYTHON, "-m", "cluster.launch", "--slots", "2", "--work-dir", str(tmp_path), "--dry-run"]
    node = subprocess.run(base + ["--", "--module", "pretrain", "a=1"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert node.returncode == 0, node.stderr
    assert "--no_ssh --node_rank=1" in node.stdout and "--master_addr=vm1" in node.stdout
    torchrun = subprocess.run(base + ["--mode", "torchrun", "--", "--module", "pretrain", "a=1"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert torchrun.returncode == 0, torchrun.stderr
    line = torchrun.stdout.splitlines()[0]
    assert "torch.distributed.run --nnodes=2 --nproc_per_node=2 --node_rank=1 --master_addr=vm1" in line
    assert line.endswith("-m pretrain a=1")
    bad = subprocess.run(base + ["--"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no program" in bad.stderr


def test_launch_refuses_only_values_the_environment_file_cannot_hold(tmp_path):
    with pytest.raises(launch.LaunchError, match="newline"):
        launch.rank_environment({"NCCL_X": "a\nb"})
    odd = {"NCCL_X": 'a"b', "MT_Y": "$HOME `x` 'q' \\ 100%", "MT_EMPTY": "", "MT_EQ": "a=b=c"}
    variables = launch.rank_environment(odd)  # no shell reads them any more: the nodes read the file
    path = tmp_path / "env"
    path.write_text(launch.format_env_file(variables))
    assert launch.read_env_file(path) == variables and {k: variables[k] for k in odd} == odd


def _shards(tmp_path, good=True):
    folder = tmp_path / "shards" / "coco"
    folder.mkdir(parents=True)
    sample = tmp_path / "0.json"
    sample.write_text("{}")
    with tarfile.open(folder / "train-000000.tar", "w") as archive:
        archive.add(sample, arcname="0.json")
    if not good:
        (folder / "train-000001.tar").write_bytes(b"this is not a tar file" * 100)
    return tmp_path / "shards"


def _preflight(*args, env=None):
    result = subprocess.run([PYTHON, "-m", "cluster.preflight", "--json", *args], env=env or run_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    rows = {row["check"]: row for row in json.loads(result.stdout.strip().splitlines()[-1])}
    return result, rows


def test_preflight_on_this_machine_passes(tmp_path):
    result, rows = _preflight("--run-dir", str(tmp_path / "run"), "--shards", str(_shards(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CHECK" in result.stdout and "STATUS" in result.stdout  # the table people read
    assert rows["nodes answer"]["status"] == "PASS"
    assert rows["python environment"]["status"] == "PASS"
    assert rows["GPUs (torch.cuda)"]["status"] in ("PASS", "SKIP")  # SKIP: no GPU here, DS_ACCELERATOR=cpu
    assert rows["shared file system"]["status"] == "PASS"
    assert rows["shards readable"]["status"] == "PASS" and "1 shards" in rows["shards readable"]["detail"]
    assert rows["same environment"]["status"] == "PASS"
    assert not (tmp_path / "run" / ".preflight").exists()  # it cleans up its probe files


def test_preflight_fails_on_bad_shards_and_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result, rows = _preflight("--run-dir", str(blocker / "run"), "--shards", str(_shards(tmp_path, good=False)))
    assert result.returncode == 1
    assert rows["shards readable"]["status"] == "FAIL" and "train-000001.tar" in rows["shards readable"]["detail"]
    assert rows["shared file system"]["status"] == "FAIL"
    assert "FAIL" in result.stdout.splitlines()[-2]  # the summary line


def test_preflight_wants_gpus_unless_the_run_is_on_cpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU verdict cannot be observed")
    result, rows = _preflight(env=run_env(DS_ACCELERATOR="cuda"))
    assert result.returncode == 1 and rows["GPUs (torch.cuda)"]["status"] == "FAIL"
    result, rows = _preflight()
    assert rows["GPUs (torch.cuda)"]["status"] == "SKIP"


def test_preflight_flags_a_missing_network_interface():
    result, rows = _preflight(env=run_env(NCCL_SOCKET_IFNAME="nosuchif0"))
    assert result.returncode == 1
    assert rows["NCCL/gloo variables"]["status"] == "FAIL" and "nosuchif0" in rows["NCCL/gloo variables"]["detail"]


def test_preflight_over_pdsh_on_two_nodes(ssh_nodes, tmp_path):
    result, rows = _preflight("--hosts", ",".join(ssh_nodes), "--run-dir", str(tmp_path / "run"),
                              "--shards", str(_shards(tmp_path)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert rows["nodes answer"]["detail"].startswith("2/2 via pdsh")
    assert "shared by all 2 nodes" in rows["shared file system"]["detail"]
    assert "on all 2 nodes" in rows["shards readable"]["detail"]
    assert rows["same environment"]["status"] == "PASS"
    result, rows = _preflight("--hosts", f"{ssh_nodes[0]},mt-no-such-node", "--timeout", "60")
    assert result.returncode == 1 and rows["nodes answer"]["status"] == "FAIL"
    assert preflight.FAIL in rows["nodes answer"]["status"]


def _process_tree(tmp_path, tag, rank_marker):
    """launcher (tagged) -> rank (tagged + marker) -> worker (inherits both): like launch.py -> rank -> loader."""
    script = tmp_path / "tree.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"env {rank_marker} bash -c 'sleep 60 & echo $! > {tmp_path}/worker; exec sleep 60' &\n"
        f"echo $! > {tmp_path}/rank\n"
        "wait\n")
    env = dict(run_env(), MT_LAUNCH_TAG=tag)
    launcher = subprocess.Popen(["bash", str(script)], env=env)
    read = lambda name: int((tmp_path / name).read_text())  # noqa: E731
    from cluster_helpers import wait_for

    wait_for(lambda: (tmp_path / "rank").exists() and (tmp_path / "worker").exists()
             and (tmp_path / "worker").read_text().strip(), 20, "the process tree")
    return launcher, read("rank"), read("worker")


@pytest.mark.parametrize("marker", ["LOCAL_RANK=0", "MT_TRAINER_PROCESS=1"])
def test_signal_ranks_picks_the_ranks_not_launchers_or_workers(tmp_path, marker):
    from cluster import signal_ranks

    tag = f"test-{tmp_path.name}"
    launcher, rank, worker = _process_tree(tmp_path, tag, marker)
    try:
        assert signal_ranks.find_ranks(tag) == [rank]
        result = subprocess.run([PYTHON, "-m", "cluster.signal_ranks", "--tag", tag, "--signal", "TERM"],
                                env=run_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and f"sent SIGTERM to rank process {rank}" in result.stdout
        assert launcher.poll() is None or launcher.returncode == 0  # the launcher itself was not signalled
        result = subprocess.run([PYTHON, "-m", "cluster.signal_ranks", "--tag", "no-such-tag"], env=run_env(),
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and "no rank process" in result.stdout
    finally:
        for pid in (worker, rank):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.kill()
        launcher.wait()
