"""Checkpoints: complete or absent, never half-written; checked before use; loaded without running code.

Layout under RUN/checkpoints/:
    step-N/             DeepSpeed's files (module, optimizer partitions, scheduler) + rank{r}.pt (each rank's
                        data-loader position, logging window and RNG states) + meta.json (step, samples seen,
                        world size, config) + COMPLETE
    .tmp-step-N/        a save in progress; renamed to step-N only after every rank has written its part
    latest              the tag of the newest complete checkpoint, replaced atomically

A crash during a save leaves `.tmp-step-N` behind (ignored, removed by the next save) and `latest` still
naming the previous checkpoint. `resume=auto` takes `latest`, or the newest intact `step-N`.

The completion record: COMPLETE, written last by rank 0 once every rank has written its part, lists every
file of the checkpoint with its size, and the SHA-256 of the small ones (under HASHED_BELOW: meta.json, the
rank files), with the time of the save. A checkpoint whose files no longer match it (a rank file missing, a
file cut short by a full disk or an interrupted copy) is damaged: resume=auto says so and takes the newest
intact checkpoint before it; a step-N folder named by the user is refused with one line. Checkpoints written
before the record existed have an empty COMPLETE and are taken as they are.

"Newest" means most recently written (the record's `saved_at`), not the highest step: after a resume from an
older step the checkpoints it writes are the newest, rotation (checkpoint.keep) deletes the oldest written,
never the one just written, and `latest` always names a checkpoint that exists.

Loading without running code: every file this module reads with torch.load is read with weights_only=True
(tensors and plain values; a pickled object is refused with one line naming the file, before anything in it
runs). The per-rank state is plain values only (the numpy RNG state as a list; `save` checks). DeepSpeed reads
its own files itself with weights_only=False (the engine's load_checkpoint, zero_to_fp32), which is out of
our hands: a checkpoint folder the user names (checkpoint.resume=PATH, checkpoint.init_from / finetune --from)
is therefore first scanned without unpickling (`check_pickles`) and refused when its pickles name anything but
tensors, plain values and DeepSpeed's own bookkeeping classes (DEEPSPEED_GLOBALS).

Every door that takes a checkpoint from the user (checkpoint.resume=PATH, checkpoint.init_from / finetune --from,
`python -m pretrain export`) finds it with `find_checkpoint`: a step-N folder, a checkpoints/ folder or a run
folder, and one error when none of them holds a complete checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..config import ConfigError
from ..io import atomic_write, atomic_write_json

COMPLETE = "COMPLETE"
META = "meta.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
HASHED_BELOW = 4 << 20  # bytes: files this small get a SHA-256 in the completion record (DeepSpeed's big ones a size)

# The classes DeepSpeed pickles into its checkpoint files besides tensors and plain values (ZeRO stage, loss
# scaler, the bf16/ZeRO parameter-slice map). Unpickling them constructs that class and nothing else.
DEEPSPEED_GLOBALS = ("deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address")
# A rank file written before the numpy RNG state was stored as a list holds one numpy array (plain numbers).
NUMPY_ARRAY_GLOBALS = ("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                       "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType")


class CheckpointNotFound(ConfigError, FileNotFoundError):
    """A path given as a checkpoint holds none: a user error (ConfigError) that is also a FileNotFoundError."""


class DamagedCheckpoint(ConfigError):
    """A checkpoint (or weights file) whose files are missing, cut short or unreadable."""


class UnsafeCheckpoint(ConfigError):
    """A file whose unpickling would construct arbitrary Python objects (run code): refused, never loaded."""


def fault_point(where: str, step: int) -> None:
    """Fault injection for the crash and stop tests, MANAGERTOWER_FAULT=WHERE:STEP[@RANK] (every rank when no
    @RANK): `save` kills this process (SIGKILL, no clean-up) in the middle of saving step N, after DeepSpeed's
    files are written and before the checkpoint is complete; `loader` (before a step's first batch is taken) and
    `eval` (before the evaluation after step N) stall it for an hour there: a loader that never delivers, an
    evaluation that never ends."""
    target, _, only_rank = os.environ.get("MANAGERTOWER_FAULT", "").partition("@")
    if target != f"{where}:{step}" or (only_rank and int(only_rank) != dist.rank()):
        return
    if where == "save":
        os.kill(os.getpid(), signal.SIGKILL)
    os.write(2, f"MANAGERTOWER_FAULT: rank {dist.rank()} stalls in {where} at step {step}\n".encode())
    time.sleep(3600)


# --- RNG states (plain values: they load with weights_only) ----------------------------------------------------
def rng_state() -> dict:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": name, "keys": keys.tolist(), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], np.array(numpy_state["keys"], dtype=np.uint32),
                       numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple holding an array in rank files written before
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- loading without unpickling objects ------------------------------------------------------------------------
def _allowed_classes(names: tuple[str, ...]) -> list:
    """The objects of `names` that can be imported here (torch's safe_globals wants the objects themselves)."""
    import importlib
    import warnings

    found = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        try:
            with warnings.catch_warnings():  # numpy 2 warns on importing numpy.core (numpy 1's name of numpy._core)
                warnings.simplefilter("ignore")
                found.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):
            continue  # numpy 1 has no numpy._core; DeepSpeed's classes only where DeepSpeed is installed
    return found


def _named_globals(file, error: Exception) -> str:
    """The globals a refused pickle names, for the error: listed from the file without unpickling it where it is
    a zip checkpoint (module.name), else as torch's message gives them."""
    try:
        named = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError):
        found = re.findall(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>|Unsupported (operand \d+)", str(error))
        named = [name.replace("operand", "pickle operation") for group in found for name in group if name]
    return ", ".join(sorted(set(named))) or "Python objects"


def load_plain(file: str | os.PathLike, allow: tuple[str, ...] = (), mmap: bool = False) -> object:
    """torch.load(file, weights_only=True) on the CPU: tensors and plain values, plus the classes named in
    `allow`. A file holding anything else is refused (UnsafeCheckpoint) before any of it is constructed; a file
    that is not a readable PyTorch file (cut short, damaged) is a DamagedCheckpoint. Both are one line naming it.
    `mmap`: tensors are read from the file when used (a look at one key of a large optimizer file)."""
    try:
        with torch.serialization.safe_globals(_allowed_classes(allow)):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(f"{file} holds pickled Python objects ({_named_globals(file, error)}) that loading "
                               "would construct and run: refused; give a checkpoint or weights file of tensors "
                               "(`python -m pretrain export RUN` writes one from a run you trust)") from None
    except (RuntimeError, EOFError, ValueError) as error:
        detail = str(error).strip().split(". ")[0][:120] or type(error).__name__
        raise DamagedCheckpoint(f"{file} is not a readable PyTorch file (cut short or damaged: {detail})") from None


def check_pickles(folder: str | os.PathLike) -> None:
    """Refuse (UnsafeCheckpoint) a checkpoint folder one of whose .pt files names, in its pickle, anything but
    tensors, plain values and DEEPSPEED_GLOBALS; nothing is unpickled. For folders the user names, before
    DeepSpeed (which unpickles with weights_only=False) reads them."""
    allowed = set(DEEPSPEED_GLOBALS) | set(NUMPY_ARRAY_GLOBALS)
    for file in sorted(Path(folder).rglob("*.pt")):
        try:
            named = set(torch.serialization.get_unsafe_globals_in_checkpoint(file))
        except pickle.UnpicklingError as error:  # the scan knows only the operations torch.save writes
            raise UnsafeCheckpoint(f"{file} holds a pickle with operations a checkpoint of tensors does not use "
                                   f"({error}): refused; give a checkpoint of tensors (`python -m pretrain export "
                                   "RUN` writes one from a run you trust)") from None
        except (RuntimeError, ValueError, EOFError, OSError) as error:
            raise DamagedCheckpoint(f"{file} is not a readable PyTorch file ({type(error).__name__}: "
                                    f"{str(error).strip()[:120]})") from None
        unsafe = sorted(named - allowed)
        if unsafe:
            raise UnsafeCheckpoint(f"{file} holds pickled Python objects ({', '.join(unsafe)}) that loading would "
                                   "construct and run: refused; give a checkpoint of tensors (`python -m pretrain "
                                   "export RUN` writes one from a run you trust)")


# --- the completion record -------------------------------------------------------------------------------------
def _file_record(path: Path) -> dict:
    # Read through an open file, not stat(): opening revalidates a shared file system's cached attributes
    # (NFS close-to-open), so the size is what the rank that wrote the file closed.
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        record = {"size": size}
        if size < HASHED_BELOW:
            handle.seek(0)
            record["sha256"] = hashlib.sha256(handle.read()).hexdigest()
    return record


def completion_record(folder: str | os.PathLike, step: int) -> dict:
    """What COMPLETE holds: the step, when it was saved, and every file (relative path) with its size and, under
    HASHED_BELOW, its SHA-256."""
    folder = Path(folder)
    files = {path.relative_to(folder).as_posix(): _file_record(path)
             for path in sorted(folder.rglob("*")) if path.is_file() and path.name != COMPLETE}
    return {"step": step, "saved_at": time.time(), "files": files}


def _read_record(folder: Path) -> dict | None:
    """The completion record; None for a checkpoint written before records existed (an empty COMPLETE)."""
    text = (folder / COMPLETE).read_text()
    return json.loads(text) if text.strip() else None


def damage(folder: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint marked complete, in a few words; None when its files match its record."""
    folder = Path(folder)
    try:
        record = _read_record(folder)
    except (OSError, ValueError) as error:
        return f"its {COMPLETE} record is unreadable ({type(error).__name__})"
    if record is None:
        return None
    try:
        files = dict(record["files"])
    except (KeyError, TypeError, ValueError):
        return f"its {COMPLETE} record lists no files"
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            actual = _file_record(path) if "sha256" in expected else {"size": path.stat().st_size}
        except OSError as error:
            return f"{name} cannot be read ({error.strerror})"
        if actual["size"] != expected.get("size"):
            return f"{name} has {actual['size']} of its {expected.get('size')} bytes"
        if "sha256" in expected and actual["sha256"] != expected["sha256"]:
            return f"{name} does not match its recorded SHA-256"
    return None


def _written_at(folder: Path) -> float:
    """When a checkpoint was saved: its record's time; for older ones meta.json's, else COMPLETE's mtime."""
    for read in (lambda: _read_record(folder)["saved_at"], lambda: read_meta(folder)["saved_at"]):
        try:
            return float(read())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    try:
        return (folder / COMPLETE).stat().st_mtime
    except OSError:
        return 0.0


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint marked complete, in the order they were written (oldest first; the same
    time: lower step first). Marked, not checked: `damage` tells whether the files still match."""
    found = []
    for path in Path(ckpt_dir).glob("step-*"):
        match = STEP_DIR.match(path.name)
        if match and (path / COMPLETE).exists():
            found.append((_written_at(path), int(match.group(1)), path))
    return [(step, path) for _, step, path in sorted(found)]


def find_resume(ckpt_dir: str | os.PathLike, report: list[str] | None = None) -> Path | None:
    """The checkpoint `resume=auto` continues from: `latest` if it is complete and intact, else the newest intact
    one. Each damaged checkpoint passed over is described in `report` (when given)."""
    ckpt_dir = Path(ckpt_dir)
    candidates = [path for _, path in reversed(complete_checkpoints(ckpt_dir))]
    latest = ckpt_dir / "latest"
    if latest.exists():
        tagged = ckpt_dir / latest.read_text().strip()
        if tagged in candidates:
            candidates.remove(tagged)
            candidates.insert(0, tagged)
    for path in candidates:
        problem = damage(path)
        if problem is None:
            return path
        if report is not None:
            report.append(f"checkpoint {path} is damaged ({problem}): passed over")
    return None


def find_checkpoint(path: str | os.PathLike, report: list[str] | None = None) -> Path:
    """The complete checkpoint a user-given `path` names: `path` itself if it is a step-N folder with COMPLETE
    (refused, DamagedCheckpoint, if its files no longer match its record); for a checkpoints/ folder, or a run
    folder holding one, its `latest` or newest intact step-N (damaged ones passed over are described in
    `report`). Raises CheckpointNotFound (one line naming the path and what to give instead) otherwise."""
    path = Path(path)
    if (path / COMPLETE).exists():
        problem = damage(path)
        if problem:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged ({problem}): give another step-N folder, or the "
                                    "run folder to take its newest intact checkpoint")
        return path
    passed_over: list[str] = []
    found = find_resume(path, passed_over) or find_resume(path / "checkpoints", passed_over)
    if report is not None:
        report.extend(passed_over)
    if found is not None:
        return found
    if passed_over:
        raise DamagedCheckpoint(f"{path} holds no intact checkpoint: " + "; ".join(passed_over))
    what = "does not exist" if not path.exists() else \
        f"is not a complete checkpoint (no {COMPLETE} file) nor a folder holding one"
    raise CheckpointNotFound(f"{path} {what}: give a step-N folder with {COMPLETE}, a checkpoints/ folder or a "
                             "run folder")


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike, report: list[str] | None = None) -> Path | None:
    """The checkpoint `checkpoint.resume` continues from: none, the newest intact one in this run's `ckpt_dir`
    (auto; None before the first save), or the one a path names (`find_checkpoint`, its pickles checked)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume(ckpt_dir, report)
    found = find_checkpoint(resume, report)
    check_pickles(found)  # a folder from elsewhere: DeepSpeed will unpickle its files
    return found


def read_meta(path: str | os.PathLike) -> dict:
    with open(Path(path) / META) as handle:
        return json.load(handle)


# --- saving ----------------------------------------------------------------------------------------------------
PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.Tensor)


def _check_plain(value, where: str) -> None:
    """Refuse, at save time, a rank state that would not load back with weights_only (rather than at resume)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"rank state {where}: key {key!r} is a {type(key).__name__}, not a str or int")
            _check_plain(item, f"{where}/{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"rank state {where} is a {type(value).__name__}: checkpoints hold tensors and plain "
                        "values only (they load with weights_only)")


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder, its COMPLETE first: a deletion cut short never leaves a folder that claims to
    be complete."""
    (folder / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def save(engine, ckpt_dir: str | os.PathLike, step: int, meta: dict, rank_state: dict, keep: int) -> Path:
    """Every rank calls this at an optimizer-step boundary. Returns the final checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step}"
    tmp_tag = f".tmp-{tag}"
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    rank_state = {**rank_state, "rng": rng_state()}
    _check_plain(rank_state, f"rank{dist.rank()}")
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save(rank_state, tmp_dir / f"rank{dist.rank()}.pt")
    fault_point("save", step)
    dist.barrier()
    if dist.is_main():
        missing = [r for r in range(dist.world_size()) if not (tmp_dir / f"rank{r}.pt").exists()]
        if missing:
            raise RuntimeError(f"rank files {missing} are not in {tmp_dir} after every rank wrote its own: "
                               "run.dir must be on a file system every rank shares")
        meta = {**meta, "step": step, "world_size": dist.world_size(), "saved_at": time.time()}
        atomic_write_json(tmp_dir / META, meta)
        atomic_write_json(tmp_dir / COMPLETE, completion_record(tmp_dir, step))
        if final_dir.exists():  # the same step saved again after a resume
            _remove(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write(ckpt_dir / "latest", tag)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            if old != final_dir:  # the newest written, whatever the clocks of earlier saves said
                _remove(old)
    dist.barrier()
    return final_dir


def load_rank_state(path: str | os.PathLike) -> dict | None:
    file = Path(path) / f"rank{dist.rank()}.pt"
    return load_plain(file, allow=NUMPY_ARRAY_GLOBALS) if file.exists() else None


# --- weights ---------------------------------------------------------------------------------------------------
def optimizer_files(path: Path) -> list[Path]:
    """The optimizer partition files of a DeepSpeed checkpoint folder, with the fp32 master weights, in rank order
    (rank 10 after rank 9): `zero_pp_rank_*_optim_states.pt`, or `bf16_zero_pp_rank_*` as bf16 runs name them
    (ZeRO-1/2). None in an fp32 stage-0 checkpoint, whose module file is all there is. Path.glob: a folder name
    with [ or ] is not a pattern."""
    rank = re.compile(r"zero_pp_rank_(\d+)_")
    return sorted(path.glob("*zero_pp_rank_*optim_states.pt"), key=lambda file: int(rank.search(file.name).group(1)))


def _bf16_optimizer_state_dict(path: Path, files: list[Path]) -> dict | None:
    """The fp32 weights of a checkpoint written by DeepSpeed's BF16_Optimizer, or None when it is not one.

    DeepSpeed runs bf16 with ZeRO stage 1 and fp32 gradient accumulation (train.precision=bf16
    train.zero_stage=1, on GPUs or a CPU with bf16) through BF16_Optimizer, not its ZeRO optimizer. Each rank's
    file holds its slice of every parameter group's flat fp32 master vector, as ZeRO-2's do, but without the
    `zero_stage` key zero_to_fp32 goes by: it refuses them ("not a zero checkpoint"). Concatenated in rank order,
    the slices are the group's parameters back to back (in the order of the module file's `param_shapes`) plus
    padding at the end; read here with weights_only. The rest of the module (buffers, frozen parameters) comes
    from the module file, in fp32."""
    first = load_plain(files[0], allow=DEEPSPEED_GLOBALS, mmap=True)["optimizer_state_dict"]
    if "zero_stage" in first or "single_partition_of_fp32_groups" not in first:
        return None
    slices = [first["single_partition_of_fp32_groups"]] + [
        load_plain(file, allow=DEEPSPEED_GLOBALS, mmap=True)["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        for file in files[1:]]
    model = load_plain(path / "mp_rank_00_model_states.pt", allow=DEEPSPEED_GLOBALS)
    state = {k: v.float() if v.is_floating_point() else v for k, v in model["module"].items()}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = torch.cat([rank_slices[group] for rank_slices in slices])
        offset = 0
        for name, shape in shapes.items():
            numel = math.prod(shape)
            if offset + numel > flat.numel():
                raise DamagedCheckpoint(f"{path}: the fp32 master weights of parameter group {group} end before "
                                        f"{name} (their {len(files)} optimizer files do not match the module file)")
            state[name] = flat[offset:offset + numel].view(shape).clone()
            offset += numel
    for name, source in (model.get("shared_params") or {}).items():
        state[name] = state[source]
    return state


def fp32_state_dict(path: str | os.PathLike) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint folder (step-N), for any ZeRO stage and precision. The fp32
    master weights of bf16 ZeRO-1 (BF16_Optimizer) are merged here; ZeRO partitions are gathered by DeepSpeed's
    zero_to_fp32 (which unpickles with weights_only=False: `check_pickles` first on a folder from elsewhere); the
    whole-model file of fp32 stage 0 is read here with weights_only."""
    path = Path(path)
    files = optimizer_files(path)
    if files:
        state = _bf16_optimizer_state_dict(path, files)
        if state is not None:
            return state
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
    states = load_plain(path / "mp_rank_00_model_states.pt", allow=DEEPSPEED_GLOBALS)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def export_fp32(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """One fp32 file for fine-tuning, as zero_to_fp32 would write it, plus the run's config and step."""
    path = Path(path)
    meta = read_meta(path) if (path / META).exists() else {}
    buffer = io.BytesIO()
    torch.save({"state_dict": fp32_state_dict(path), "config": meta.get("config"), "step": meta.get("step")}, buffer)
    return atomic_write(out_file, buffer.getvalue())


def load_weights_file(source: str | os.PathLike, report: list[str] | None = None) -> tuple[dict, dict | None]:
    """(state_dict, config) from an exported .pt file, a weights folder (config.json + model.safetensors, or that
    file: docs/weights.md; its config is {"model": ...}) or any folder holding a DeepSpeed checkpoint; each is read
    without constructing pickled objects (UnsafeCheckpoint otherwise). Damaged checkpoints passed over in a
    run or checkpoints/ folder are described in `report` (when given)."""
    from ..hf_export import is_weights_folder, read_folder

    source = Path(source)
    if is_weights_folder(source):  # safetensors and JSON: nothing to unpickle
        state, config = read_folder(source)
        return state, {"model": config["model"]}
    if source.is_file():
        blob = load_plain(source)
        if not isinstance(blob, dict):
            raise DamagedCheckpoint(f"{source} holds a {type(blob).__name__}, not a state dict")
        if "state_dict" in blob:
            return blob["state_dict"], blob.get("config")
        return blob, None
    folder = find_checkpoint(source, report)
    check_pickles(folder)
    meta = read_meta(folder)
    return fp32_state_dict(folder), meta.get("config")
