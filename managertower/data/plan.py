"""Samples and per-rank plans: what every loader backend reads, and how ranks split a dataset.

Ranks split each dataset as DALI does: rank r of W reads samples [N r / W, N (r + 1) / W) of the concatenated
shards (N from the shards' DALI indexes), for both backends, so a finite pass over W ranks covers every sample
once. A `RawSample` is one image sample on its way through the loader: metadata, the encoded images (DALI,
until decoded) and the decoded ones; `raw_state` / `raw_from_state` are what a checkpoint keeps of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .augment import mix_seed
from .shards import index_count


@dataclass
class RawSample:
    """One image sample of one dataset: metadata, the encoded images (until decoded) and the decoded ones."""

    dataset: int
    position: int  # index in this rank's stream of the dataset (across epochs)
    key: str
    meta: dict
    seed: int
    encoded: tuple | None = None  # bytes per image extension (DALI backend, before decoding)
    decoded: tuple | None = None  # 3 x S x S float32 tensors per image extension
    size: tuple | None = None  # (width, height) per image extension


@dataclass
class BadSample:
    dataset: int
    position: int
    key: str
    error: str


def sample_seed(seed: int, rank: int, dataset: int, position: int) -> int:
    return mix_seed(seed, rank, dataset, position)


def raw_state(raw: RawSample) -> dict:
    """What a checkpoint keeps of a sample still in the loader: the encoded bytes where there are (DALI: decoded
    again, to the same pixels, on restore; a tenth of the size), else the decoded tensors (webdataset)."""
    state = {"dataset": raw.dataset, "position": raw.position, "key": raw.key, "meta": raw.meta, "seed": raw.seed}
    if raw.encoded is not None:
        state["encoded"] = [bytes(b) for b in raw.encoded]
    elif raw.decoded is not None:
        state["decoded"] = [t.detach().cpu() for t in raw.decoded]
    return state


def raw_from_state(state: dict, device: torch.device) -> RawSample:
    raw = RawSample(state["dataset"], state["position"], state["key"], state["meta"], state["seed"])
    if "decoded" in state:
        raw.decoded = tuple(t.to(device) for t in state["decoded"])
    else:
        raw.encoded = tuple(state["encoded"])
    return raw


@dataclass
class Plan:
    """This rank's part of one dataset: shard paths, per-shard counts and the [start, end) sample range."""

    paths: list[str]
    counts: list[int]
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def pieces(self) -> list[tuple[str, int, int]]:
        """(shard, first, last) local sample ranges of the shards overlapping this rank's range."""
        out, offset = [], 0
        for path, count in zip(self.paths, self.counts):
            lo, hi = max(self.start, offset), min(self.end, offset + count)
            if lo < hi:
                out.append((path, lo - offset, hi - offset))
            offset += count
        return out


def plan_rank(paths: Sequence[str], rank: int, world_size: int) -> Plan:
    counts = [index_count(p) for p in paths]
    total = sum(counts)
    # DALI's split (fn.readers.* shard_id/num_shards): contiguous, floor(N * r / W).
    return Plan(list(paths), counts, total * rank // world_size, total * (rank + 1) // world_size)
