"""Checkpoints: complete or absent, never half-written.

Layout under RUN/checkpoints/:
    step-N/             DeepSpeed's files (module, optimizer partitions, scheduler) + rank{r}.pt (each rank's
                        data-loader position and RNG states) + meta.json (step, samples seen, world size,
                        config) + COMPLETE
    .tmp-step-N/        a save in progress; renamed to step-N only after every rank has written its part
    latest              the tag of the newest complete checkpoint, replaced atomically

A crash during a save leaves `.tmp-step-N` behind (ignored, removed by the next save) and `latest` still
naming the previous checkpoint. `resume=auto` takes `latest`, or the newest `step-N` with COMPLETE.

Every door that takes a checkpoint from the user (checkpoint.resume=PATH, checkpoint.init_from / finetune --from,
`python -m pretrain export`) finds it with `find_checkpoint`: a step-N folder, a checkpoints/ folder or a run
folder, and one error when none of them holds a complete checkpoint.
"""
from __future__ import annotations

import glob
import io
import json
import os
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


class CheckpointNotFound(ConfigError, FileNotFoundError):
    """A path given as a checkpoint holds none: a user error (ConfigError) that is also a FileNotFoundError."""


def _fault_point(where: str, step: int) -> None:
    """Fault injection for the crash tests: MANAGERTOWER_FAULT=save:N kills this process (SIGKILL, no clean-up)
    in the middle of saving step N, after DeepSpeed's files are written and before the checkpoint is complete."""
    if os.environ.get("MANAGERTOWER_FAULT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    for path in Path(ckpt_dir).glob("step-*"):
        match = STEP_DIR.match(path.name)
        if match and (path / COMPLETE).exists():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_resume(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `resume=auto` continues from: `latest` if complete, else the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.exists():
        tagged = ckpt_dir / latest.read_text().strip()
        if (tagged / COMPLETE).exists():
            return tagged
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The complete checkpoint a user-given `path` names: `path` itself if it is a step-N folder with COMPLETE;
    for a checkpoints/ folder, or a run folder holding one, its `latest` or newest complete step-N. Raises
    CheckpointNotFound (one line naming the path and what to give instead) otherwise."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    found = find_resume(path) or find_resume(path / "checkpoints")
    if found is not None:
        return found
    what = "does not exist" if not path.exists() else \
        f"is not a complete checkpoint (no {COMPLETE} file) nor a folder holding one"
    raise CheckpointNotFound(f"{path} {what}: give a step-N folder with {COMPLETE}, a checkpoints/ folder or a "
                             "run folder")


def resolve_resume(resume: str, ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `checkpoint.resume` continues from: none, the newest in this run's `ckpt_dir` (auto; None
    before the first save), or the one a path names (`find_checkpoint`)."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume(ckpt_dir)
    return find_checkpoint(resume)


def read_meta(path: str | os.PathLike) -> dict:
    with open(Path(path) / META) as handle:
        return json.load(handle)


def save(engine, ckpt_dir: str | os.PathLike, step: int, meta: dict, rank_state: dict, keep: int) -> Path:
    """Every rank calls this at an optimizer-step boundary. Returns the final checkpoint folder."""
    ckpt_dir = Path(ckpt_dir)
    tag = f"step-{step}"
    tmp_tag = f".tmp-{tag}"
    tmp_dir, final_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if dist.is_main():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in glob.glob(str(ckpt_dir / ".tmp-step-*")):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"step": step}, save_latest=False)
    torch.save({**rank_state, "rng": rng_state()}, tmp_dir / f"rank{dist.rank()}.pt")
    _fault_point("save", step)
    dist.barrier()
    if dist.is_main():
        meta = {**meta, "step": step, "world_size": dist.world_size(), "saved_at": time.time()}
        atomic_write_json(tmp_dir / META, meta)
        atomic_write(tmp_dir / COMPLETE, "")
        if final_dir.exists():  # the same step saved again after a resume
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write(ckpt_dir / "latest", tag)
        for _, old in complete_checkpoints(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final_dir


def load_rank_state(path: str | os.PathLike) -> dict | None:
    file = Path(path) / f"rank{dist.rank()}.pt"
    return torch.load(file, weights_only=False) if file.exists() else None


def fp32_state_dict(path: str | os.PathLike) -> dict:
    """Full fp32 weights of a DeepSpeed checkpoint folder (step-N), for any ZeRO stage."""
    path = Path(path)
    if glob.glob(str(path / "*optim_states.pt")) and glob.glob(str(path / "zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name))
    states = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def export_fp32(path: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """One fp32 file for fine-tuning, as zero_to_fp32 would write it, plus the run's config and step."""
    path = Path(path)
    meta = read_meta(path) if (path / META).exists() else {}
    buffer = io.BytesIO()
    torch.save({"state_dict": fp32_state_dict(path), "config": meta.get("config"), "step": meta.get("step")}, buffer)
    return atomic_write(out_file, buffer.getvalue())


def load_weights_file(source: str | os.PathLike) -> tuple[dict, dict | None]:
    """(state_dict, config) from an exported .pt file or any folder holding a DeepSpeed checkpoint."""
    source = Path(source)
    if source.is_file():
        blob = torch.load(source, map_location="cpu", weights_only=False)
        if "state_dict" in blob:
            return blob["state_dict"], blob.get("config")
        return blob, None
    folder = find_checkpoint(source)
    meta = read_meta(folder)
    return fp32_state_dict(folder), meta.get("config")
