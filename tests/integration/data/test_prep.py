"""The driver end to end: a killed run resumed, --part, verify, and real DALI pipelines over the shards."""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from dataprep.__main__ import main
from managertower.data.prep import prepare, stats, verify
from managertower.data.shards import expand_shards, index_path_for, iter_shard, sha256_file
from managertower.data.synthetic import shard_world, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataprep_world")
    write_world(root / "raw", seed=0, size=60)
    shard_world(root / "raw", root / "shards", workers=2, samples_per_shard=16, summary=False)
    return root


def samples_of(out, split="train") -> dict[str, dict[str, bytes]]:
    found = {}
    for path in sorted(glob.glob(os.path.join(str(out), f"{split}-*.tar"))):
        for sample in iter_shard(path):
            assert sample["__key__"] not in found, f"{sample['__key__']} appears twice"
            found[sample["__key__"]] = sample
    return found


def shard_hashes(out, split="train") -> dict[str, str]:
    return {os.path.basename(p): sha256_file(p) for p in glob.glob(os.path.join(str(out), f"{split}-*.tar"))}


def worker_pids(parent: int) -> list[int]:
    with open(f"/proc/{parent}/task/{parent}/children") as handle:
        return [int(pid) for pid in handle.read().split()]


def test_a_killed_run_resumed_equals_an_uninterrupted_run(world, tmp_path):
    raw = tmp_path / "coco"
    shutil.copytree(world / "raw" / "coco", raw)
    reference = tmp_path / "reference"
    prepare("coco", raw, reference, workers=1, samples_per_shard=4, progress=False, summary=False)

    # One image becomes a FIFO: the worker that opens it blocks there, mid-shard, until we kill it.
    image = sorted(glob.glob(str(raw / "train2014" / "*.jpg")))[7]
    shutil.move(image, image + ".real")
    os.mkfifo(image)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "dataprep", "coco", "--root", str(raw), "--out", str(out), "--workers", "2",
               "--samples-per-shard", "4", "--quiet"]
    run = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        planned = len(shard_hashes(reference))
        deadline = time.time() + 60
        # Completion records are written after each tar is renamed: wait for all shards but the blocked one.
        while len(glob.glob(str(out / ".dataprep" / "shards" / "train-*.json"))) < planned - 1:
            assert run.poll() is None and time.time() < deadline, "the run ended or never reached the FIFO"
            time.sleep(0.05)
        workers = worker_pids(run.pid)
        blocked = [pid for pid in workers if open(f"/proc/{pid}/wchan").read() == "wait_for_partner"] or workers
        os.kill(blocked[0], signal.SIGKILL)
        _, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 2 and "--resume" in err and "Traceback" not in err
    assert not os.path.exists(out / "manifest.json")  # the killed run never claimed to be complete
    unfinished = [name for name in shard_hashes(reference) if not os.path.exists(out / name)]
    assert len(unfinished) == 1

    os.remove(image)
    shutil.move(image + ".real", image)
    assert main(command[3:-1] + ["--resume", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    run_manifest = json.loads(open(glob.glob(str(out / ".dataprep" / "runs" / "*.json"))[0]).read())
    assert len(run_manifest["kept_from_previous_run"]) == planned - 1
    assert shard_hashes(out) == shard_hashes(reference)  # byte for byte the uninterrupted run
    assert manifest["samples"] == len(samples_of(reference)) == 60
    assert not glob.glob(str(out / "*.tmp")) and verify(out).ok


def test_parts_together_hold_every_sample_exactly_once(world, tmp_path):
    raw = world / "raw" / "coco"
    whole = tmp_path / "whole"
    prepare("coco", raw, whole, samples_per_shard=7, progress=False, summary=False)
    parted = tmp_path / "parted"
    for index in range(3):
        prepare("coco", raw, parted, samples_per_shard=7, part=f"{index}/3", progress=False, summary=False)
        merged = stats(parted)
        assert merged["complete"] == (index == 2)
        if index < 2:
            assert not verify(parted).ok  # unfinished parts are reported
    assert sorted(samples_of(parted)) == sorted(samples_of(whole))
    assert shard_hashes(parted) == shard_hashes(whole)  # same plan: same shard contents and names
    manifest = json.loads((parted / "manifest.json").read_text())
    assert manifest["samples"] == 60 and manifest["splits"]["train"]["parts_done"] == [0, 1, 2]
    sizes = json.loads((parted / "sizes.json").read_text())
    assert sum(sizes.values()) == 60 and set(sizes) == set(shard_hashes(whole))
    assert verify(parted).ok


def test_samples_are_shuffled_across_shards_by_the_seed(world, tmp_path):
    raw = world / "raw" / "coco"
    first = samples_of(prepare_to(raw, tmp_path / "a", seed=1))
    again = samples_of(prepare_to(raw, tmp_path / "b", seed=1))
    other = samples_of(prepare_to(raw, tmp_path / "c", seed=2))
    assert list(first) == list(again) and list(first) != list(other) and sorted(first) == sorted(other)
    assert list(first) != sorted(first)


def prepare_to(raw, out, seed):
    prepare("coco", raw, out, samples_per_shard=10, seed=seed, progress=False, summary=False)
    return out


def test_verify_passes_on_every_output_and_fails_on_a_corrupted_shard(world, tmp_path, capsys):
    for source in ("coco", "vqav2", "nlvr2", "snli_ve", "flickr30k"):
        report = verify(world / "shards" / source)
        assert report.ok and report.samples > 0, report.problems
    out = tmp_path / "coco"
    shutil.copytree(world / "shards" / "coco", out)
    tar = sorted(glob.glob(str(out / "train-*.tar")))[0]
    data = bytearray(open(tar, "rb").read())
    first_image = next(iter_shard(tar))["jpg"]
    start = bytes(data).index(first_image)
    data[start + len(first_image) // 2: start + len(first_image) // 2 + 64] = b"\x00" * 64
    open(tar, "wb").write(bytes(data))
    assert main(["verify", str(out), "--quick"]) == 1
    assert "sha256" in capsys.readouterr().out
    # Even with the manifest made to agree, the broken image or index is found by decoding.
    with open(tar, "wb") as handle:
        handle.write(bytes(data[: len(data) // 2]))
    problems = verify(out).problems
    assert any(os.path.basename(tar) in problem for problem in problems)
    os.remove(index_path_for(tar))
    assert any("index" in problem for problem in verify(out).problems)


def test_stats_prints_merged_counts(world, capsys):
    assert main(["stats", str(world / "shards" / "nlvr2")]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "dev" in text and "test1" in text


@pytest.mark.parametrize("source, extra", [("coco", []), ("nlvr2", ["img1.jpg"]), ("vqav2", []), ("snli_ve", [])])
def test_dali_decodes_every_shard(world, source, extra):
    from nvidia.dali import fn, pipeline_def

    out = world / "shards" / source
    tars = expand_shards(str(out))
    expected = sum(json.loads((out / "sizes.json").read_text()).values())
    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipeline():
        members = fn.readers.webdataset(paths=tars, index_paths=[index_path_for(t) for t in tars],
                                        ext=["jpg", "json", *extra], missing_component_behavior="error",
                                        name="reader", pad_last_batch=True)
        decoded = [fn.decoders.image(members[0], device="cpu", output_type=types_rgb())]
        decoded += [fn.decoders.image(m, device="cpu", output_type=types_rgb()) for m in members[2:]]
        return (*decoded, members[1])

    pipe = pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == expected
    seen = 0
    for _ in range((expected + batch - 1) // batch):
        outputs = pipe.run()
        metas, images = outputs[-1], outputs[:-1]
        for i in range(min(batch, expected - seen)):
            meta = json.loads(np.asarray(metas.at(i)).tobytes())
            for decoded in images:
                array = np.asarray(decoded.at(i))
                assert array.ndim == 3 and array.shape[2] == 3 and array.std() > 0
            assert np.asarray(images[0].at(i)).shape[:2] == (meta["height"], meta["width"])
        seen += min(batch, expected - seen)
    assert seen == expected


def types_rgb():
    from nvidia.dali import types

    return types.RGB
