"""The engine against hostile files and careless users, piece by piece on real files and real processes: pickles
that would run code, the completion record, write-order rotation, the run folder's lock, the stop signals'
protocol, the settings a resumed run may change, and the logging window kept across a resume. (Whole runs:
tests/integration/engine/test_run_hardening.py.)"""
from __future__ import annotations

import builtins
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from managertower.config import ConfigError
from managertower.engine import checkpoint as ckpt
from managertower.engine import loop
from managertower.io import atomic_write_json


class _Payload:
    """Unpickling this runs `code`: what a hostile weights file carries."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return builtins.exec, (self.code,)


def _hostile(path, marker, wrap=lambda payload: {"state_dict": {"w": torch.zeros(2)}, "extra": payload}):
    torch.save(wrap(_Payload(f"open({str(marker)!r}, 'w').write('ran')")), path)
    return path


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text and isinstance(error.value, ConfigError), text
    return text


# --- 1. nothing is unpickled into objects ----------------------------------------------------------------------
def test_a_hostile_weights_file_is_refused_naming_it_and_nothing_runs(tmp_path):
    marker = tmp_path / "marker"
    for name, kwargs in (("zip.pt", {}), ("legacy.pt", {"_use_new_zipfile_serialization": False})):
        file = tmp_path / name
        torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(f"open({str(marker)!r}, 'w')")}, file,
                   **kwargs)
        with pytest.raises(ckpt.UnsafeCheckpoint) as error:
            ckpt.load_weights_file(file)  # --from FILE, checkpoint.init_from=FILE
        text = _one_line(error)
        assert str(file) in text and "exec" in text and "refused" in text
    assert not marker.exists()
    # a plain weights file (what `pretrain export` writes) still loads
    torch.save({"state_dict": {"w": torch.ones(2)}, "config": {"model": {"size": "tiny"}}, "step": 3},
               tmp_path / "plain.pt")
    state, config = ckpt.load_weights_file(tmp_path / "plain.pt")
    assert torch.equal(state["w"], torch.ones(2)) and config == {"model": {"size": "tiny"}}


def test_a_checkpoint_folder_with_a_hostile_deepspeed_file_is_refused_before_deepspeed_reads_it(tmp_path):
    marker = tmp_path / "marker"
    step = tmp_path / "elsewhere" / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    _hostile(step / "mp_rank_00_model_states.pt", marker, wrap=lambda p: {"module": {"w": torch.zeros(1)}, "x": p})
    (step / ckpt.META).write_text(json.dumps({"step": 2, "world_size": 1}))
    atomic_write_json(step / ckpt.COMPLETE, ckpt.completion_record(step, 2))  # intact by its record
    for load in (ckpt.load_weights_file, lambda path: ckpt.resolve_resume(str(path), tmp_path / "run")):
        with pytest.raises(ckpt.UnsafeCheckpoint) as error:
            load(tmp_path / "elsewhere")  # init_from / --from a run folder; checkpoint.resume=PATH
        assert "mp_rank_00_model_states.pt" in _one_line(error) and "builtins.exec" in str(error.value)
    # the same in a newer pickle protocol (names pushed as strings, then STACK_GLOBAL): refused all the same
    torch.save({"module": {"w": torch.zeros(1)}, "x": _Payload(f"open({str(marker)!r}, 'w')")},
               step / "mp_rank_00_model_states.pt", pickle_protocol=4)
    atomic_write_json(step / ckpt.COMPLETE, ckpt.completion_record(step, 2))
    with pytest.raises(ckpt.UnsafeCheckpoint) as error:
        ckpt.load_weights_file(tmp_path / "elsewhere")
    assert "mp_rank_00_model_states.pt" in _one_line(error)
    assert not marker.exists()


def test_rank_state_loads_with_weights_only_and_a_hostile_one_is_refused(tmp_path):
    marker = tmp_path / "marker"
    # the RNG states round-trip through a weights_only load, to the same streams
    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save({"rng": ckpt.rng_state()}, buffer)
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    buffer.seek(0)
    ckpt.set_rng_state(torch.load(buffer, weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2:] == again[2:]
    # a rank file written before (the numpy state as a tuple holding an array) still loads and restores
    old_state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    folder = tmp_path / "step-1"
    folder.mkdir()
    torch.save({"loader": {"position": 3}, "rng": old_state}, folder / "rank0.pt")
    loaded = ckpt.load_rank_state(folder)
    first = np.random.rand(2)
    ckpt.set_rng_state(loaded["rng"])
    assert loaded["loader"] == {"position": 3} and (np.random.rand(2) == first).all()
    # a rank file carrying an object
    _hostile(folder / "rank0.pt", marker, wrap=lambda p: {"loader": p, "rng": old_state})
    with pytest.raises(ckpt.UnsafeCheckpoint) as error:
        ckpt.load_rank_state(folder)
    assert "rank0.pt" in _one_line(error)
    assert not marker.exists()


def test_a_rank_state_that_would_not_load_back_is_refused_at_save_time():
    ckpt._check_plain({"loader": {"sources": [{"position": 1, "checkpoint": b"\x00"}], "mix": torch.zeros(2)},
                       "rng": ckpt.rng_state()}, "rank0")
    with pytest.raises(TypeError, match=r"rank0/loader/generator is a ndarray"):
        ckpt._check_plain({"loader": {"generator": np.zeros(2)}}, "rank0")


def test_a_cut_short_weights_file_is_one_line_not_a_traceback(tmp_path):
    file = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, file)
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(ckpt.DamagedCheckpoint) as error:
        ckpt.load_weights_file(file)
    assert str(file) in _one_line(error) and "not a readable PyTorch file" in str(error.value)


# --- 6. the completion record ----------------------------------------------------------------------------------
def _checkpoint(root, step: int, saved_at: float | None = None, big: int = 0):
    """A step-N folder as `save` leaves it: two rank files, a large DeepSpeed-like file, meta.json, the record."""
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    for rank in range(2):
        torch.save({"loader": {"position": step + rank}}, folder / f"rank{rank}.pt")
    (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(big or 64))
    (folder / ckpt.META).write_text(json.dumps({"step": step, "world_size": 2}))
    record = ckpt.completion_record(folder, step)
    if saved_at is not None:
        record["saved_at"] = saved_at
    (folder / ckpt.COMPLETE).write_text(json.dumps(record))
    return folder


def test_the_completion_record_lists_every_file_and_finds_damage(tmp_path):
    folder = _checkpoint(tmp_path, 4, big=ckpt.HASHED_BELOW + 10)
    record = json.loads((folder / ckpt.COMPLETE).read_text())
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert sorted(record["files"]) == ["meta.json", "rank0.pt", "rank1.pt", optim]
    assert record["files"]["rank1.pt"]["size"] == (folder / "rank1.pt").stat().st_size
    assert "sha256" in record["files"]["rank1.pt"] and "sha256" not in record["files"][optim]  # big: size only
    assert ckpt.damage(folder) is None
    (folder / optim).write_bytes((folder / optim).read_bytes()[:1000])
    assert ckpt.damage(folder) == f"{optim} has 1000 of its {ckpt.HASHED_BELOW + 10} bytes"
    folder = _checkpoint(tmp_path, 6)
    (folder / "rank1.pt").unlink()
    assert ckpt.damage(folder) == "rank1.pt is missing"
    folder = _checkpoint(tmp_path, 8)
    data = bytearray((folder / "meta.json").read_bytes())
    data[2] ^= 1  # same size, other bytes
    (folder / "meta.json").write_bytes(bytes(data))
    assert ckpt.damage(folder) == "meta.json does not match its recorded SHA-256"
    (folder / ckpt.COMPLETE).write_text('{"step": 8, "fil')  # the record itself cut short
    assert "record is unreadable" in ckpt.damage(folder)
    legacy = tmp_path / "step-1"
    legacy.mkdir()
    (legacy / ckpt.COMPLETE).write_text("")  # written before records existed: taken as it is
    assert ckpt.damage(legacy) is None


def test_resume_passes_over_a_damaged_checkpoint_and_a_named_one_is_refused(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    _checkpoint(checkpoints, 3, saved_at=100.0)
    newest = _checkpoint(checkpoints, 6, saved_at=200.0)
    (checkpoints / "latest").write_text("step-6")
    truncated = newest / "rank1.pt"
    truncated.write_bytes(truncated.read_bytes()[:50])
    report: list[str] = []
    assert ckpt.find_resume(checkpoints, report) == checkpoints / "step-3"
    assert len(report) == 1 and "step-6 is damaged (rank1.pt has 50 of" in report[0]
    report = []  # init_from / --from a run folder: the newest intact, the damaged one said (in the run's log)
    assert ckpt.find_checkpoint(tmp_path / "run", report) == checkpoints / "step-3" and "step-6 is damaged" in report[0]
    with pytest.raises(ckpt.DamagedCheckpoint) as error:
        ckpt.find_checkpoint(newest)  # a step-N folder named by the user: one line, no traceback
    assert "rank1.pt has 50 of" in _one_line(error)
    (checkpoints / "step-3" / "rank0.pt").unlink()
    with pytest.raises(ckpt.DamagedCheckpoint, match="holds no intact checkpoint"):
        ckpt.find_checkpoint(tmp_path / "run")


# --- 4. newest written, not highest step -----------------------------------------------------------------------
def test_checkpoints_are_ordered_by_when_they_were_written(tmp_path):
    _checkpoint(tmp_path, 9, saved_at=100.0)  # an abandoned later step
    _checkpoint(tmp_path, 6, saved_at=200.0)  # written after a resume from an older step
    _checkpoint(tmp_path, 3, saved_at=50.0)
    assert [step for step, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 9, 6]
    assert ckpt.find_resume(tmp_path) == tmp_path / "step-6"  # no `latest`: the newest written


# --- 5. the run folder's lock ----------------------------------------------------------------------------------
def test_a_second_holder_of_the_run_folder_is_refused_naming_the_first(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from managertower.engine.loop import _RunLock; "
         f"_RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(loop.RunFolderBusy) as error:
            loop._RunLock(tmp_path).acquire()
        text = _one_line(error)
        assert f"pid {holder.pid}" in text and "host " in text and "started " in text and str(tmp_path) in text
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    lock = loop._RunLock(tmp_path).acquire()  # free again; the file says who holds it now
    try:
        assert json.loads((tmp_path / loop.LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


# --- 2. the stop signals ----------------------------------------------------------------------------------------
def test_sigterm_waits_for_a_step_boundary_only_its_grace_and_a_repeat_stops_at_once():
    int_handler = signal.getsignal(signal.SIGINT)
    stop = loop._StopFlag(grace_s=0.5, hard_exit_s=None)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.interrupt == signal.SIGTERM and stop.agreed() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy, milliseconds later: not a second request
        with pytest.raises(loop.RunInterrupted) as stopped:
            time.sleep(5)  # blocked, no step boundary: the grace runs out and the main thread is interrupted
        assert stopped.value.code == 128 + signal.SIGTERM and "no step boundary within 0.5 s" in stopped.value.reason
    finally:
        stop.restore()
    stop = loop._StopFlag(grace_s=60, hard_exit_s=None)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(loop.REPEAT_S + 0.1)
        with pytest.raises(loop.RunInterrupted) as stopped:
            os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C: at once
            time.sleep(1)
        assert stopped.value.code == 130 and isinstance(stopped.value, SystemExit)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is int_handler  # given back
    stop = loop._StopFlag(grace_s=0.2, hard_exit_s=None)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # the requeue signal: no deadline, exit 0 at the boundary
        time.sleep(0.5)
        assert stop.agreed() == signal.SIGUSR1 and not stop.interrupt
    finally:
        stop.restore()


# --- 3. what a resumed run may change --------------------------------------------------------------------------
def test_resume_changes_sorts_sound_changes_from_ones_that_cannot_apply():
    saved = {"train": {"lr": 1e-4, "weight_decay": 0.01, "steps": 8, "log_every": 1, "betas": [0.9, 0.98]},
             "checkpoint": {"every": 3, "keep": 5, "resume": "auto"}, "run": {"dir": "/a", "progress": True},
             "data": {"train_shards": ["/x"]}, "model": {"size": "tiny"}}
    current = {"train": {"lr": 0.5, "weight_decay": 0.3, "steps": 10, "log_every": 2, "betas": (0.9, 0.98)},
               "checkpoint": {"every": 3, "keep": 2, "resume": "/a/checkpoints/step-3"},
               "run": {"dir": "/b", "progress": False}, "data": {"train_shards": ["/y"]}, "model": {"size": "tiny"},
               "task": {"new_key": 1}}
    applied, refused = loop.resume_changes(saved, current, exact=True)
    assert applied == ["checkpoint.keep: 5 -> 2", "run.progress: true -> false", "train.log_every: 1 -> 2",
                       "train.steps: 8 -> 10"]
    assert refused == ['data.train_shards: ["/x"] -> ["/y"]', "train.lr: 0.0001 -> 0.5",
                       "train.weight_decay: 0.01 -> 0.3"]
    # after a world-size change the optimizer, schedule and data start from the config: those changes apply
    applied, refused = loop.resume_changes(saved, current, exact=False)
    assert refused == [] and "train.lr: 0.0001 -> 0.5" in applied


# --- 7. the logging window across a resume ---------------------------------------------------------------------
def test_the_logging_window_resumes_with_its_sums():
    outs = [{"loss": torch.tensor(v), "loss_mlm": torch.tensor(v / 3), "batch_size": 8, "tokens": 40}
            for v in (0.1, 0.7, 1.3, 2.9)]
    whole = loop._LogWindow()
    for out in outs:
        whole.add(out, 8)
    first = loop._LogWindow()
    for out in outs[:2]:
        first.add(out, 8)
    buffer = io.BytesIO()
    torch.save({"log_window": first.state_dict()}, buffer)  # as it goes into the rank file
    buffer.seek(0)
    resumed = loop._LogWindow()
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["log_window"])
    for out in outs[2:]:
        resumed.add(out, 8)
    assert resumed.reduce(torch.device("cpu"))[0] == whole.reduce(torch.device("cpu"))[0]  # bitwise: the same sums in the same order
    assert (resumed.micro_steps, resumed.samples, resumed.tokens) == (4, 32, 160)
