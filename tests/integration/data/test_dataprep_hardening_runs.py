"""dataprep with real folders and real processes: nothing deleted without --overwrite, parts of different
plans never merged as complete, folder names that look like glob patterns, and workers that end with a
driver killed by SIGKILL."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from dataprep.__main__ import main
from managertower.data.formats import READERS
from managertower.data.prep import (OutputConflictError, PlanMismatchError, plan_shards, prepare, stats,
                                    verify)
from managertower.data.shards import iter_shard, sha256_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


# -- tiny raw datasets in their real layouts ------------------------------------------------------------

def write_karpathy(root, source: str, count: int, split: str = "train") -> str:
    """A Karpathy split file and `count` 24x16 images: COCO (train2014/) or Flickr30K (flickr30k-images/)."""
    folder = "train2014" if source == "coco" else "flickr30k-images"
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    images = []
    for index in range(count):
        filename = f"COCO_train2014_{index:012d}.jpg" if source == "coco" else f"{1000 + index}.jpg"
        Image.new("RGB", (24, 16), COLOURS[index % len(COLOURS)]).save(os.path.join(root, folder, filename))
        record = {"filename": filename, "split": split, "sentences": [{"raw": f"picture number {index}"}]}
        if source == "coco":
            record.update(filepath=folder, cocoid=index)
        images.append(record)
    with open(os.path.join(root, f"dataset_{'coco' if source == 'coco' else 'flickr30k'}.json"), "w") as handle:
        json.dump({"images": images}, handle)
    return str(root)


def write_cc3m(root, count: int) -> str:
    """A CC3M TSV and `count` 32x32 PNGs named by row (PNGs so every image is decoded and re-encoded)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    with open(os.path.join(root, "Train_GCC-training.tsv"), "w") as handle:
        for row in range(count):
            handle.write(f"caption {row}\thttp://example.com/{row}.jpg\n")
            Image.new("RGB", (32, 32), COLOURS[row % len(COLOURS)]).save(os.path.join(root, "images", f"{row}.jpg"),
                                                                          "PNG")
    return str(root)


def folder_state(out) -> dict[str, str]:
    """sha256 of every file under OUT, hidden state included."""
    state = {}
    for directory, _, files in os.walk(out):
        for name in files:
            path = os.path.join(directory, name)
            state[os.path.relpath(path, out)] = sha256_file(path)
    return state


def keys_in(out, split="train") -> list[str]:
    return [sample["__key__"] for path in sorted(glob.glob(os.path.join(glob.escape(str(out)), f"{split}-*.tar")))
            for sample in iter_shard(path)]


def run_door(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def quiet(source, root, out, **kwargs) -> dict:
    kwargs.setdefault("samples_per_shard", 2)
    return prepare(source, root, out, progress=False, summary=False, **kwargs)


# -- 1. nothing is deleted without --overwrite ----------------------------------------------------------

def test_another_sources_shards_are_refused_then_replaced_only_with_overwrite(tmp_path, capsys):
    coco = write_karpathy(tmp_path / "coco", "coco", 8)
    flickr = write_karpathy(tmp_path / "flickr", "flickr30k", 5)
    out = tmp_path / "out"
    quiet("coco", coco, out)
    before = folder_state(out)
    assert len(glob.glob(str(out / "train-*.tar"))) == 4

    # The old driver deleted coco's 4th shard, overwrote three and replaced the manifest.
    code, err = run_door(capsys, "flickr30k", "--root", flickr, "--out", out, "--samples-per-shard", "2", "--quiet")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "coco shards" in err and "--overwrite" in err
    assert folder_state(out) == before  # not one byte touched
    flickr_val = write_karpathy(tmp_path / "flickr_val", "flickr30k", 3, split="val")
    with pytest.raises(OutputConflictError):
        quiet("flickr30k", flickr_val, out, split="val")  # another split of another source: still refused
    assert folder_state(out) == before

    assert main(["flickr30k", "--root", flickr, "--out", str(out), "--samples-per-shard", "2", "--quiet",
                 "--overwrite"]) == 0
    assert "--overwrite: deleted coco shards" in capsys.readouterr().out
    manifest = json.loads((out / ".dataprep" / "runs" / "train.part-0000-of-0001.json").read_text())
    assert manifest["source"] == "flickr30k" and "coco" in manifest["overwritten"][0]
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["source"] == "flickr30k" and merged["complete"] and merged["samples"] == 5
    assert sorted(keys_in(out)) == sorted(f"flickr30k_{1000 + i}" for i in range(5))
    assert not glob.glob(str(out / ".dataprep" / "shards" / "train-000003.json"))  # coco's records went too
    report = verify(out)
    assert report.ok, report.problems


def test_another_plan_is_refused_and_resume_only_continues_the_same_plan(tmp_path):
    coco = write_karpathy(tmp_path / "coco", "coco", 9)
    out = tmp_path / "out"
    quiet("coco", coco, out, seed=0)
    before = folder_state(out)
    with pytest.raises(OutputConflictError, match=r"another plan .*--seed 0 there, 7 here"):
        quiet("coco", coco, out, seed=7)
    with pytest.raises(OutputConflictError, match="--resume only continues the same plan"):
        quiet("coco", coco, out, seed=7, resume=True)
    with pytest.raises(OutputConflictError, match="--samples-per-shard 2 there, 3 here"):
        quiet("coco", coco, out, samples_per_shard=3)
    assert folder_state(out) == before

    # The same plan: resumed (every shard kept) or redone (the same bytes); another split shares the folder.
    assert quiet("coco", coco, out, seed=0, resume=True)["kept_from_previous_run"] == [0, 1, 2, 3, 4]
    quiet("coco", coco, out, seed=0)
    assert {name: digest for name, digest in folder_state(out).items() if name.endswith(".tar")} == \
        {name: digest for name, digest in before.items() if name.endswith(".tar")}
    write_karpathy(tmp_path / "coco", "coco", 9, split="test")
    quiet("coco", coco, out, split="test")
    assert verify(out).ok


def test_unknown_shards_and_an_unfinished_run_of_another_plan_are_refused(tmp_path):
    coco = write_karpathy(tmp_path / "coco", "coco", 6)
    elsewhere = tmp_path / "elsewhere"
    quiet("coco", coco, elsewhere, seed=3)

    out = tmp_path / "out"  # a shard this run would overwrite, written by something else
    out.mkdir()
    shutil.copy(elsewhere / "train-000000.tar", out / "train-000000.tar")
    with pytest.raises(OutputConflictError, match="no dataprep record knows"):
        quiet("coco", coco, out)
    assert sorted(os.listdir(out)) == ["train-000000.tar"]

    foreign = tmp_path / "foreign"  # another tool's manifest.json and sizes.json
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"made by": "another tool"}')
    (foreign / "sizes.json").write_text("{}")
    with pytest.raises(OutputConflictError, match="manifest.json and sizes.json that no dataprep run manifest"):
        quiet("coco", coco, foreign)
    assert (foreign / "manifest.json").read_text() == '{"made by": "another tool"}'

    # A run of another plan killed before its manifest: only its shards and completion records remain.
    killed = tmp_path / "killed"
    shutil.copytree(elsewhere, killed)
    shutil.rmtree(killed / ".dataprep" / "runs")
    os.remove(killed / "manifest.json")
    with pytest.raises(OutputConflictError, match="never finished"):
        quiet("coco", coco, killed, seed=0, resume=True)
    quiet("coco", coco, killed, seed=0, overwrite=True)
    assert verify(killed).ok


# -- 2. parts cut to different plans never merge as complete -------------------------------------------

def test_a_part_of_another_plan_is_refused(tmp_path):
    coco = write_karpathy(tmp_path / "coco", "coco", 10)
    out = tmp_path / "out"
    quiet("coco", coco, out, part="0/2", seed=0)
    with pytest.raises(OutputConflictError, match="part 0/2.*--seed 0 there, 7 here"):
        quiet("coco", coco, out, part="1/2", seed=7)
    assert not stats(out)["complete"]


def test_parts_of_different_plans_that_meet_in_one_folder_fail_the_merge_naming_the_parts(tmp_path, capsys):
    """Two machines started together on an empty folder (or wrote locally and were gathered by rsync): part
    1/2 (seed 7) is held mid-run on a FIFO image while part 0/2 (seed 0) lands in its folder."""
    coco = write_karpathy(tmp_path / "coco", "coco", 10)
    part0 = tmp_path / "part0"
    quiet("coco", coco, part0, part="0/2", seed=0)

    reader = READERS["coco"](coco, "train")
    plan = plan_shards(reader.scan().items, 2, 7)
    held = plan[1][0].image.path  # the first image of shard 1, which part 1/2 writes
    shutil.move(held, held + ".real")
    os.mkfifo(held)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dataprep", "coco", "--root", coco, "--out", str(out), "--part", "1/2",
               "--seed", "7", "--samples-per-shard", "2", "--quiet"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        writer = open_fifo_writer(held, run)
        for name in os.listdir(part0):  # part 0/2's shards, records and run manifest arrive meanwhile
            source, target = part0 / name, out / name
            if name == ".dataprep":
                for sub in ("runs", "shards"):
                    os.makedirs(target / sub, exist_ok=True)
                    for entry in os.listdir(source / sub):
                        shutil.copy(source / sub / entry, target / sub / entry)
            elif name.startswith("train-"):
                shutil.copy(source, target)
        with os.fdopen(writer, "wb") as handle:
            handle.write(open(held + ".real", "rb").read())
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 2 and "Traceback" not in err, err
    assert "different plans" in err and "part 0/2" in err and "part 1/2" in err and "--seed 0 there, 7 here" in err
    merged = json.loads((out / "manifest.json").read_text())
    assert not merged["complete"] and merged["plan_conflicts"]

    report = verify(out)
    assert not report.ok and any("part 0/2" in p and "part 1/2" in p for p in report.problems)
    with pytest.raises(PlanMismatchError, match="part 0/2"):
        stats(out)
    capsys.readouterr()
    assert main(["verify", str(out), "--quick"]) == 1
    assert main(["stats", str(out)]) == 2 and "different plans" in capsys.readouterr().err


def open_fifo_writer(path: str, run: subprocess.Popen, timeout: float = 60) -> int:
    """The FIFO's write end, once the driver's worker has opened it for reading (it then waits for bytes)."""
    deadline = time.time() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert run.poll() is None, run.communicate()[1]
            assert time.time() < deadline, "the driver never opened the held image"
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        return fd


def test_verify_flags_a_shard_cut_to_another_plan(tmp_path):
    coco = write_karpathy(tmp_path / "coco", "coco", 6)
    out, other = tmp_path / "out", tmp_path / "other"
    quiet("coco", coco, out, seed=0)
    quiet("coco", coco, other, seed=5)
    record = out / ".dataprep" / "shards" / "train-000001.json"
    shutil.copy(other / ".dataprep" / "shards" / "train-000001.json", record)
    assert any("train-000001.tar: cut to plan" in problem for problem in verify(out, decode=False).problems)


# -- 3. a folder name is not a glob pattern -------------------------------------------------------------

def test_a_folder_named_like_a_glob_pattern(tmp_path, capsys):
    coco = write_karpathy(tmp_path / "coco", "coco", 7)
    out = tmp_path / "out[1]"
    manifest = quiet("coco", coco, out, part="0/2")
    quiet("coco", coco, out, part="1/2")
    merged = json.loads((out / "manifest.json").read_text())
    # The old driver globbed `out[1]/.dataprep/runs/*.json` as a pattern (matching `out1/...`): it found no
    # run and wrote an empty manifest marked complete.
    assert merged["complete"] and merged["samples"] == 7 and len(merged["shards"]) == 4
    assert json.loads((out / "sizes.json").read_text()) == {r["name"]: r["samples"] for r in merged["shards"]}
    assert sorted(keys_in(out)) == sorted(f"coco_{i}" for i in range(7))
    report = verify(out)
    assert report.ok and report.shards == 4 and report.samples == 7, report.problems
    assert quiet("coco", coco, out, part="0/2", resume=True)["kept_from_previous_run"] == [0, 2]
    assert manifest["planned_items"] == 4
    assert main(["stats", str(out)]) == 0 and "7" in capsys.readouterr().out


def test_a_raw_folder_named_like_a_glob_pattern(tmp_path):
    root = tmp_path / "cc3m[1]"  # img2dataset's tars are found under it, not under `cc3m1`
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key in ("000000000", "000000001"):
            image = io.BytesIO()
            Image.new("RGB", (20, 20), COLOURS[0]).save(image, "JPEG")
            for ext, payload in (("jpg", image.getvalue()), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    manifest = quiet("img2dataset", root, tmp_path / "out[2]", source_name="cc3m")
    assert manifest["samples"] == 2 and verify(tmp_path / "out[2]").ok


# -- 5. workers end with their driver -------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as handle:
                children = [int(child) for child in handle.read().split()]
        except OSError:
            continue
        found += children
        todo += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init, which may never reap it in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_workers_end_when_the_driver_is_killed_with_sigkill(tmp_path):
    raw = write_cc3m(tmp_path / "cc3m", 300)
    held = os.path.join(raw, "images", "150.jpg")  # one worker blocks here forever, as on a hung NFS read
    os.remove(held)
    os.mkfifo(held)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dataprep", "cc3m", "--root", raw, "--out", str(out), "--workers", "2",
               "--samples-per-shard", "10", "--quiet"]
    driver = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    workers: list[int] = []
    try:
        deadline = time.time() + 60
        while not (glob.glob(str(out / ".dataprep" / "shards" / "*.json")) and len(workers) >= 2):
            assert driver.poll() is None, driver.communicate()[1]
            assert time.time() < deadline, "the driver never got going"
            workers = [pid for pid in descendants(driver.pid) if running(pid)]
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.time() + 5
        while any(running(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.05)
        survivors = [pid for pid in workers if running(pid)]
    finally:
        for pid in workers:  # the old driver's orphans: blocked on the FIFO or on a queue nobody reads
            if running(pid):
                os.kill(pid, signal.SIGKILL)
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert not survivors, f"worker(s) {survivors} outlived the killed driver"
    assert not os.path.exists(out / "manifest.json")
