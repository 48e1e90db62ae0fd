"""The data loader: one validated `LoaderSpec` in, an iterable of batch dicts with exact resume out.

    spec = LoaderSpec(shards=[paths], expand=task_expand, collate=collator, batch_size=8, image_size=288,
                      backend="dali", train=True, rank=0, world_size=1, seed=0, device="cuda")
    loader = build_loader(spec)
    for batch in loader:          # {"pixel_values": B x 3 x S x S float32 (CLIP mean/std), ...the collator's keys}
        ...
    state = loader.state_dict()   # exact data position; a new loader + load_state_dict() continues bit for bit

Tasks do not call `build_loader` themselves: `Task.build_loader(split)` (tasks/base.py) makes the spec from the
config and the task's declared data (shards, expand, collator, images, augmentation) and is its only caller.

How a batch is made
-------------------
Each dataset is one *source*: a stream of image samples (this rank's part of the dataset's shards, see
`plan.py`; shuffled per epoch in training), read by the DALI (`dali.py`) or webdataset (`wds.py`) backend. Per
image sample the loader draws the dataset with a seeded weighted choice (weights 3:1 -> ~75% of the image
samples from the first), calls `expand(meta, rng=...)` to get its examples (one per caption, per question, ...;
`rng` is a `random.Random` seeded by the sample's position), and appends them to a buffer (each image is decoded
once for all its examples). In training with `example_pool` P > 1, the buffer is kept at the examples of at
least P images and a batch is `batch_size` examples drawn from it at random (seeded), so one image's captions or
hypotheses do not fill a batch together; otherwise (P = 1, and always in evaluation) a batch is the first
`batch_size` examples, in order. The collator makes the batch dict; the loader adds `pixel_values` (and
`pixel_values_2` for a second image, NLVR2).

Pixels on the CPU: the per-image work (the resize of a decoded image, every fine-tuning example's own
augmented view, the normalisation into its row of the batch) runs in `num_threads` worker threads
(`workers.py`), a pure function of the image and its seed, so the batches do not depend on the thread count.

Exact resume: the state holds the DALI reader checkpoints (or the webdataset stream positions), the samples read
but not yet used, the example buffer (with its images' encoded bytes, decoded again on restore, or the decoded
images on the webdataset backend), the mixing and pool generators, the collator's state and the counters.
Augmentation choices are a function of each sample's position (see `augment.py`).
"""
from __future__ import annotations

import atexit
import logging
import queue
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import ConfigError
from . import dali
from .augment import TRANSFORMS, Geometry, augment_example, mix_seed, normalize, normalize_into, sample_geometry
from .plan import BadSample, RawSample, plan_rank, raw_from_state, raw_state
from .shards import META, PRIMARY_IMAGE
from .workers import ImageWorkers

log = logging.getLogger(__name__)

BACKENDS = ("dali", "webdataset")
STATE_VERSION = 1


class TooManyBadSamples(RuntimeError):
    """More corrupt samples than `max_bad_fraction` allows."""


class NoExamples(RuntimeError):
    """A dataset's samples expand into no example of this task (the wrong shards for it)."""


class LoaderStopped(Exception):
    """The loader was closed while its producer was reading (a stop signal): the producer thread ends."""


# A dataset that gave no example in this many of its samples (or in all of them, when it has fewer) is the
# wrong dataset for the task: a clear error instead of reading forever (endless training passes).
BARREN_LIMIT = 10_000


# ------------------------------------------------------------------------------------------------ collators


class Collator:
    """examples (+ the batch's stacked images, one tensor per image member) -> the batch dict.

    A collator with random choices (MLM masking, ITM pairs) keeps a counter in `state_dict()`, which the loader
    saves with its position, so a resumed run draws exactly as an uninterrupted one; a stateless one keeps {}.
    """

    def __call__(self, examples: list[dict], images: tuple[torch.Tensor, ...]) -> dict:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FunctionCollator(Collator):
    """A plain function as a (stateless) collator."""

    def __init__(self, function: Callable[[list[dict], tuple], dict]):
        self.function = function

    def __call__(self, examples: list[dict], images: tuple[torch.Tensor, ...]) -> dict:
        return self.function(examples, images)


class ExamplesCollator(Collator):
    """The examples as they are, under "examples" (inspection, benchmarks)."""

    def __call__(self, examples: list[dict], images: tuple[torch.Tensor, ...]) -> dict:
        return {"examples": examples}


# Examples of one image sample: expand(meta, rng=random.Random) -> [example dict, ...] (none: the sample is
# skipped). `rng` is seeded by the sample's position, so a random choice (one caption of five) is reproducible.
Expand = Callable[..., list]


# ----------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class LoaderSpec:
    """What one loader reads and makes. Settings that come from the recipe were checked when the config was
    built; the spec checks what only it knows (the shard lists, weights, rank, image members)."""

    shards: Sequence[Sequence[str]]  # one list of .tar paths per dataset (shards.resolve_shards makes one)
    expand: Expand
    collate: Collator | Callable
    batch_size: int
    image_size: int
    weights: Sequence[float] | None = None  # mixing weights per dataset (None: equal)
    backend: str = "dali"
    images: tuple[str, ...] = (PRIMARY_IMAGE,)  # image members per sample (NLVR2: jpg + img1.jpg)
    train: bool = True  # shuffled and endless (epochs), else one ordered pass with the last partial batch kept
    # "clip" (shorter side + centre crop: pre-training), "albef" (the whole image to size x size: fine-tuning
    # evaluation) or "albef_randaug" (each example its own RandomResizedCrop, flip, RandomAugment; augment.py)
    transform: str = "clip"
    hflip: bool = True  # horizontal flips in "albef_randaug"
    colour_ops: bool = True  # RandomAugment's colour ops in "albef_randaug" (not for VQA)
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_threads: int = 2  # DALI decoding threads, or webdataset worker processes; and the image worker threads
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    bad_fraction_floor: int = 1000
    example_pool: int = 1  # training: batches drawn from the examples of this many images (1: in order)
    prefetch: int = 2  # batches made ahead in a background thread (0: in the caller's thread)
    device: str | torch.device = "auto"  # where batches go ("auto": cuda when available; DALI decodes there)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"transform={self.transform!r} is not one of {', '.join(TRANSFORMS)}")
        for name in ("batch_size", "image_size", "world_size", "example_pool"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} is outside 0..{self.world_size - 1} (world_size={self.world_size})")
        if not self.images or len(set(self.images)) != len(self.images) or META in self.images:
            raise ConfigError(f"images={self.images!r} must name distinct image members such as ('jpg',) or "
                              "('jpg', 'img1.jpg')")
        shards = self.shards
        if isinstance(shards, str) or not shards or any(isinstance(s, str) or not s for s in shards):
            raise ConfigError("shards must be a non-empty list with one non-empty list of .tar paths per dataset "
                              "(shards.resolve_shards makes one from folders, globs or brace ranges)")
        weights = self.weights
        if weights is not None and (len(weights) != len(shards) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ConfigError(f"weights={list(weights)} must hold one non-negative weight per dataset "
                              f"({len(shards)}), not all zero")
        if not isinstance(self.collate, Collator):
            if not callable(self.collate):
                raise ConfigError(f"collate={self.collate!r} is neither a Collator nor a function")
            object.__setattr__(self, "collate", FunctionCollator(self.collate))


# ---------------------------------------------------------------------------------------------------- loader


_END = object()
_LIVE_LOADERS: "weakref.WeakSet[Loader]" = weakref.WeakSet()


def _close_live_loaders() -> None:
    # A producer thread still inside DALI when the interpreter tears down aborts the process
    # ("terminate called without an active exception"): stop them all first.
    for loader in list(_LIVE_LOADERS):
        try:
            loader.close()
        except Exception:
            pass


class Loader:
    """Iterable over batch dicts; `state_dict()` / `load_state_dict()` give the exact data position.

    Counters: `samples_seen` (examples emitted in batches), `images_seen` (image samples decoded), `bad_samples`
    (image samples skipped as corrupt), `batches`, `epoch` (of the first dataset; `epochs` lists them all).
    Batches are made one or two ahead in a background thread (`prefetch`); the state always describes the
    batches handed out so far.
    """

    def __init__(self, spec: LoaderSpec, sources: list, decoder: "dali.DaliDecoder | None", device: torch.device,
                 workers: ImageWorkers):
        self.spec, self.sources, self.decoder, self.device, self.workers = spec, sources, decoder, device, workers
        weights = spec.weights if spec.weights is not None else [1.0] * len(sources)
        self.weights = torch.tensor(list(map(float, weights)), dtype=torch.double)
        self.backend, self.batch_size, self.image_size, self.exts = (
            spec.backend, spec.batch_size, spec.image_size, tuple(spec.images))
        self.expand, self.collate, self.train, self.transform, self.hflip = (
            spec.expand, spec.collate, spec.train, spec.transform, spec.hflip)
        # fine-tuning augmentation: decode each image whole, once, and give each of its examples its own view
        self.per_example = spec.transform == "albef_randaug"
        self.max_bad_fraction, self.bad_fraction_floor = spec.max_bad_fraction, spec.bad_fraction_floor
        self.seed, self.rank, self.prefetch = spec.seed, spec.rank, spec.prefetch
        self.example_pool = spec.example_pool if spec.train else 1  # evaluation keeps the order
        self._initial_collate = self.collate.state_dict()
        self._reset_working_state()
        self._committed = self._snapshot()
        self._yield = [[0, 0] for _ in sources]  # per dataset: samples read, examples made (this process)
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._exhausted = False
        _LIVE_LOADERS.add(self)

    # -- counters (of the batches handed out) --
    @property
    def samples_seen(self) -> int:
        return self._committed["samples_seen"]

    @property
    def images_seen(self) -> int:
        return self._committed["images_seen"]

    @property
    def bad_samples(self) -> int:
        return self._committed["bad_samples"]

    @property
    def batches(self) -> int:
        return self._committed["batches"]

    @property
    def epochs(self) -> list[int]:
        return [s["position"] // max(1, src.plan.size) for s, src in zip(self._committed["sources"], self.sources)]

    @property
    def epoch(self) -> int:
        return self.epochs[0]

    # -- working state (the producer's, possibly ahead of the committed one) --
    def _reset_working_state(self) -> None:
        self._mix = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, "mix"))
        self._pick = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, "pool"))
        # (example, its image sample, the example's index among that image's examples)
        self._buffer: list[tuple[dict, RawSample, int]] = []
        self._counts = {"samples_seen": 0, "images_seen": 0, "bad_samples": 0, "batches": 0}
        self._active = [True] * len(self.sources)

    def _snapshot(self) -> dict:
        return {"sources": [s.snapshot() for s in self.sources], "buffer": list(self._buffer),
                "mix": self._mix.get_state().clone(), "pick": self._pick.get_state().clone(),
                "active": list(self._active),
                "collate": self.collate.state_dict(),
                **self._counts}

    def _next_raw(self) -> RawSample | BadSample | None:
        while any(self._active):
            if len(self.sources) == 1:
                choice = 0
            else:
                weights = self.weights * torch.tensor(self._active, dtype=torch.double)
                if float(weights.sum()) <= 0:
                    return None
                choice = int(torch.multinomial(weights, 1, generator=self._mix))
            raw = self.sources[choice].next()
            if raw is not None:
                return raw
            self._active[choice] = False
        return None

    def _expand(self, raw: RawSample) -> list[dict]:
        return self.expand(raw.meta, rng=random.Random(mix_seed(raw.seed, "expand")))

    def _decode(self, raws: list[RawSample]) -> list[RawSample]:
        """Decode the DALI samples (in one pipeline run per image extension); returns the corrupt ones."""
        bad: list[RawSample] = []
        errors: dict[int, str] = {}
        todo = [r for r in raws if r.decoded is None]
        if not todo:
            return bad
        geometries: dict[int, list[tuple[Geometry, int, int]]] = {}
        ok = []
        for raw in todo:
            try:
                if raw.meta.get("__bad_json__"):
                    raise ValueError("metadata is not valid JSON")
                sizes = [dali.jpeg_size(payload) for payload in raw.encoded]  # a header that does not parse: bad
                if self.decoder.needs_geometry:  # DALI crops on the GPU; else the worker threads place it
                    geometries[id(raw)] = [
                        (sample_geometry(width, height, self.image_size, self.transform, mix_seed(raw.seed, k),
                                         self.hflip), width, height) for k, (width, height) in enumerate(sizes)]
                ok.append(raw)
            except Exception as error:  # the header does not parse: corrupt before DALI sees it
                errors[id(raw)] = f"{type(error).__name__}: {error}"
        per_ext = []
        for k in range(len(self.exts)):
            images = self.decoder([r.encoded[k] for r in ok],
                                  [geometries[id(r)][k] for r in ok] if self.decoder.needs_geometry else None)
            per_ext.append(images)
            for raw, image in zip(ok, images):
                if isinstance(image, str):
                    errors.setdefault(id(raw), image)
        for i, raw in enumerate(ok):
            if id(raw) in errors:
                continue
            raw.decoded = tuple(per_ext[k][i] for k in range(len(self.exts)))
        for raw in todo:
            if id(raw) in errors:
                bad.append(raw)
                self._warn_bad(raw.key, raw.dataset, errors[id(raw)])
        return bad

    def _warn_bad(self, key: str, dataset: int, error: str) -> None:
        log.warning("skipping corrupt sample %r of dataset %d: %s", key, dataset, error)
        self._counts["bad_samples"] += 1
        total = self._counts["images_seen"] + self._counts["bad_samples"]
        if self._counts["bad_samples"] > self.max_bad_fraction * max(total, self.bad_fraction_floor):
            raise TooManyBadSamples(
                f"{self._counts['bad_samples']} corrupt samples out of {total} read on rank {self.rank} exceeds "
                f"max_bad_fraction={self.max_bad_fraction} (counted over at least {self.bad_fraction_floor} "
                f"samples); last: {key!r} of dataset {dataset} ({error}). Run `python -m dataprep verify` on the "
                "shards, or raise data.max_bad_fraction")

    def _fill(self, examples: int, images: int) -> None:
        """Read, expand and decode image samples into the buffer until it holds `examples` examples from at least
        `images` images, or the sources end (a finite pass)."""
        have = len({id(raw) for _, raw, _ in self._buffer})
        while len(self._buffer) < examples or have < images:
            new: list[tuple[RawSample, list[dict]]] = []
            count = len(self._buffer)
            while count < examples or have + len(new) < images:
                raw = self._next_raw()
                if raw is None:
                    break
                if isinstance(raw, BadSample):
                    self._warn_bad(raw.key, raw.dataset, raw.error)
                    continue
                if raw.meta.get("__bad_json__"):
                    self._warn_bad(raw.key, raw.dataset, "metadata is not valid JSON")
                    continue
                expanded = self._expand(raw)
                self._check_barren(raw.dataset, len(expanded))
                if expanded:
                    new.append((raw, expanded))
                    count += len(expanded)
                if self._stop.is_set() and threading.current_thread() is self._thread:
                    raise LoaderStopped
            if not new:
                break
            bad = {id(r) for r in self._decode([r for r, _ in new])} if self.decoder is not None else set()
            for raw, expanded in new:
                if id(raw) not in bad:
                    self._counts["images_seen"] += 1
                    self._buffer.extend((example, raw, j) for j, example in enumerate(expanded))
                    have += 1

    def _check_barren(self, dataset: int, examples: int) -> None:
        read, produced = self._yield[dataset]
        self._yield[dataset] = [read + 1, produced + examples]
        plan = self.sources[dataset].plan
        if produced + examples == 0 and read + 1 >= min(plan.size, BARREN_LIMIT):
            shards = plan.paths
            raise NoExamples(
                f"dataset {dataset} ({shards[0]}{f' and {len(shards) - 1} more shards' if len(shards) > 1 else ''}) "
                f"gave no example in its first {read + 1} samples: these shards hold nothing this task reads "
                "(e.g. VQAv2 shards given as pre-training data, or captions missing); point the task's shard keys "
                "(data.train_shards / task.train_shards / task.eval_shards) at the right dataset")

    def _make_batch(self) -> dict | None:
        if self.example_pool > 1:
            # Examples of one image (5 captions, ~18 SNLI-VE hypotheses) would otherwise fill a batch together:
            # draw the batch at random from the examples of `example_pool` images.
            self._fill(self.batch_size, self.example_pool)
            if not self._buffer:
                return None
            picks = set(torch.randperm(len(self._buffer), generator=self._pick)[:self.batch_size].tolist())
            chosen = [item for i, item in enumerate(self._buffer) if i in picks]
            self._buffer = [item for i, item in enumerate(self._buffer) if i not in picks]
        else:
            self._fill(self.batch_size, 0)
            if not self._buffer:
                return None
            chosen, self._buffer = self._buffer[: self.batch_size], self._buffer[self.batch_size:]
        examples = [e for e, _, _ in chosen]
        images = tuple(self._example_images(chosen, k) for k in range(len(self.exts)))
        batch = self.collate(examples, images)
        batch.setdefault("pixel_values", images[0])
        if len(images) > 1:
            batch.setdefault("pixel_values_2", images[1])
        batch = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in batch.items()}
        self._counts["samples_seen"] += len(examples)
        self._counts["batches"] += 1
        return batch

    def _example_images(self, chosen: list[tuple[dict, RawSample, int]], k: int) -> torch.Tensor:
        """The batch's images of member k: each example's own augmented view of its decoded image (fine-tuning
        training), else the image as decoded, shared by the image's examples."""
        if not self.per_example:
            return self._batch_images([raw.decoded[k] for _, raw, _ in chosen])

        def view(item: tuple[dict, RawSample, int]) -> torch.Tensor:
            _, raw, j = item
            return augment_example(raw.decoded[k], self.image_size, mix_seed(raw.seed, k, j), self.hflip,
                                   self.spec.colour_ops)

        if chosen[0][1].decoded[k].device.type != "cpu":
            return normalize(_stack([view(item) for item in chosen]))
        # on the CPU every example is made in the worker threads, straight into its row of the batch
        batch = torch.empty((len(chosen), 3, self.image_size, self.image_size), dtype=torch.float32)
        self.workers.map(lambda i: normalize_into(batch[i], view(chosen[i])), range(len(chosen)))
        return batch

    def _batch_images(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Stack the images; when they are exactly the rows of one decoder output, in order, and no example
        left in the buffer shares it, hand that tensor out as it is (no copy)."""
        base = tensors[0]._base
        if (base is not None and base.dim() == 4 and base.shape[0] == len(tensors)
                and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(tensors))
                and not any(d._base is base for _, raw, _ in self._buffer for d in raw.decoded)):
            return base
        return _stack(tensors)

    # -- iteration --
    def __iter__(self) -> "Loader":
        if self._exhausted:  # a finite loader: a new pass from the start
            self._restart()
        return self

    def _restart(self) -> None:
        self._stop_producer()
        for source in self.sources:
            source.restore({"position": 0, "checkpoint": None, "pending": []}, self.device)
        self._reset_working_state()
        self.collate.load_state_dict(self._initial_collate)
        self._committed = self._snapshot()
        self._exhausted = False

    def __next__(self) -> dict:
        if self._exhausted:
            raise StopIteration
        if self.prefetch <= 0:
            batch = self._make_batch()
            if batch is None:
                self._exhausted = True
                raise StopIteration
            self._committed = self._snapshot()
            return batch
        if self._thread is None:
            self._start_producer()
        item = self._queue.get()
        if item is _END:
            self._exhausted = True
            self._thread = None
            raise StopIteration
        if isinstance(item, BaseException):
            self._thread = None
            self.close()
            raise item
        batch, self._committed = item
        return batch

    def _start_producer(self) -> None:
        self._stop.clear()
        self._queue = queue.Queue(maxsize=self.prefetch)
        work_queue, stop = self._queue, self._stop

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    work_queue.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                while not stop.is_set():
                    batch = self._make_batch()
                    if batch is None:
                        put(_END)
                        return
                    if not put((batch, self._snapshot())):
                        return
            except BaseException as error:  # handed to the consumer, raised there
                put(error)

        self._thread = threading.Thread(target=produce, name="managertower-loader", daemon=True)
        self._thread.start()

    def _stop_producer(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._queue = None

    def close(self) -> None:
        """Stop the producer thread and release the pipelines and workers (a later iteration reopens them)."""
        self._stop_producer()
        for source in self.sources:
            source.close()
        if self.decoder is not None:
            self.decoder.close()
        self.workers.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- state --
    def state_dict(self) -> dict:
        committed = self._committed
        raws: dict[int, dict] = {}
        buffer = []
        for example, raw, index in committed["buffer"]:
            raws.setdefault(id(raw), raw_state(raw))
            buffer.append({"example": example, "raw": list(raws).index(id(raw)), "index": index})
        sources = []
        for snap in committed["sources"]:
            snap = dict(snap)
            if "pending" in snap:
                snap["pending"] = [raw_state(r) for r in snap["pending"]]
            sources.append(snap)
        return {"version": STATE_VERSION, "backend": self.backend, "batch_size": self.batch_size,
                "rank": self.rank, "seed": self.seed, "num_datasets": len(self.sources),
                "example_pool": self.example_pool,
                "sources": sources, "raws": list(raws.values()), "buffer": buffer, "mix": committed["mix"].clone(),
                "pick": committed["pick"].clone(),
                "active": list(committed["active"]), "collate": committed["collate"],
                **{k: committed[k] for k in ("samples_seen", "images_seen", "bad_samples", "batches")}}

    def load_state_dict(self, state: dict) -> None:
        mismatched = [f"{k}: saved {state.get(k)!r}, this loader {v!r}" for k, v in (
            ("version", STATE_VERSION), ("backend", self.backend), ("batch_size", self.batch_size),
            ("rank", self.rank), ("seed", self.seed), ("num_datasets", len(self.sources)),
            ("example_pool", self.example_pool)) if state.get(k, 1 if k == "example_pool" else None) != v]
        if mismatched:
            raise ValueError("the data-loader state does not fit this loader (" + "; ".join(mismatched) + "); resume "
                             "with the same data settings, batch size and world size, or start the data afresh")
        self._stop_producer()
        for source, snap in zip(self.sources, state["sources"]):
            source.restore(snap, self.device)
        raws = [raw_from_state(r, self.device) for r in state["raws"]]
        self._mix = torch.Generator()
        self._mix.set_state(state["mix"].clone())
        self._pick = torch.Generator()
        if "pick" in state:
            self._pick.set_state(state["pick"].clone())
        else:
            self._pick.manual_seed(mix_seed(self.seed, self.rank, "pool"))
        self._active = list(state["active"])
        if state.get("collate") is not None:
            self.collate.load_state_dict(state["collate"])
        self._counts = {k: int(state[k]) for k in ("samples_seen", "images_seen", "bad_samples", "batches")}
        # The buffer's images were saved as their encoded bytes (DALI): decode them again, to the same pixels.
        undecoded = [raw for raw in raws if raw.decoded is None]
        bad = {id(r) for r in self._decode(undecoded)} if undecoded else set()
        self._buffer = [(item["example"], raws[item["raw"]], item.get("index", 0)) for item in state["buffer"]
                        if id(raws[item["raw"]]) not in bad]
        self._committed = self._snapshot()
        self._exhausted = False


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].device.type != "cpu":
        return torch.stack(tensors)
    # numpy for CPU tensors: torch's multi-threaded copy into fresh memory runs ~20x slower than one numpy
    # pass on small machines (measured: 256 ms vs 2 ms for 32 x 3 x 288 x 288 on 2 cores)
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


atexit.register(_close_live_loaders)
# and once more after DALI's own handler is registered (atexit runs last-registered first): ours must stop the
# loader threads before DALI tears the pipelines down under them
dali.on_first_import(lambda: atexit.register(_close_live_loaders))


def resolve_device(device: str | torch.device) -> torch.device:
    """An indexed device ("auto": the current CUDA device, read here in the caller's thread, else the CPU)."""
    if str(device) == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device} is not supported by the loader: use cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device: use device=cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def build_loader(spec: LoaderSpec) -> Loader:
    """A rank-aware loader over dataprep shards (module docstring); a dataset too small for the ranks, or a
    missing shard or index, fails here with the fix."""
    device = resolve_device(spec.device)
    plans = [plan_rank([str(p) for p in paths], spec.rank, spec.world_size) for paths in spec.shards]
    for d, plan in enumerate(plans):
        if plan.size == 0 and spec.train:
            raise ConfigError(f"dataset {d} has {sum(plan.counts)} samples, too few for rank {spec.rank} of "
                              f"{spec.world_size}: every rank needs at least one")
    exts = tuple(spec.images)
    decoder = None
    workers = ImageWorkers(spec.num_threads)  # resizing (DALI on the CPU) and per-example augmentation
    if spec.backend == "dali":
        sources = [dali.DaliReaderSource(d, plan, exts, train=spec.train, seed=spec.seed, rank=spec.rank,
                                         world_size=spec.world_size, shuffle_buffer=spec.shuffle_buffer,
                                         read_batch=max(spec.batch_size, 16))
                   for d, plan in enumerate(plans)]
        # decode where the batches go: device="mixed" on CUDA
        decoder = dali.DaliDecoder(spec.batch_size, spec.image_size, transform=spec.transform,
                                   num_threads=spec.num_threads, device=device, workers=workers)
    else:
        from .wds import WdsSource

        sources = [WdsSource(d, plan, exts, train=spec.train, seed=spec.seed, rank=spec.rank,
                             shuffle_buffer=spec.shuffle_buffer, image_size=spec.image_size,
                             transform=spec.transform, num_workers=spec.num_threads)
                   for d, plan in enumerate(plans)]
    return Loader(spec, sources, decoder, device, workers)
