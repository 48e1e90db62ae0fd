"""Rank-aware image-text loaders over dataprep shards: DALI (default) or webdataset + PIL.

    loader = build_loader([expand_shards("data/coco")], None, backend="dali", batch_size=8, image_size=288,
                          rank=0, world_size=1, seed=0, expand=partial(expand_pretrain, per_caption=True),
                          collate=PretrainCollator(tokenizer, 50), device="cuda")
    for batch in loader:          # {"pixel_values": B x 3 x 288 x 288 float32 (CLIP mean/std), ...collate's keys}
        ...
    state = loader.state_dict()   # exact data position; a new loader + load_state_dict() continues bit for bit

How a batch is made
-------------------
Each dataset is one *source*: a stream of image samples (this rank's part of the dataset's shards, shuffled per
epoch in training). Per image sample the loader draws the dataset with a seeded weighted choice (weights 3:1 ->
~75% of the image samples from the first), calls `expand(meta)` to get its examples (one per caption, per
question, ...), and appends them to a buffer (each image is decoded once for all its examples). In training
with `example_pool` P > 1, the buffer is kept at the examples of at least P images and a batch is `batch_size`
examples drawn from it at random (seeded), so one image's captions or hypotheses do not fill a batch together;
otherwise (P = 1, and always in evaluation) a batch is the first `batch_size` examples, in order.
`collate(examples, images)` makes the batch dict; the loader adds `pixel_values` (and `pixel_values_2` for a
second image, NLVR2).

Ranks split each dataset as DALI does: rank r of W reads samples [N r / W, N (r + 1) / W) of the concatenated
shards (N from the `.idx` files), for both backends, so a finite pass over W ranks covers every sample once.

Backends
--------
dali:       `fn.readers.webdataset` (checkpointable) reads the raw members; a second DALI pipeline decodes
            (`fn.decoders.image`, `device="mixed"` on CUDA, else CPU), resizes a ROI bicubically
            (`fn.resize`, the shorter-side resize + centre crop in one resampling) and normalises
            (`fn.crop_mirror_normalize`). Keeping decoding apart from reading lets a corrupt JPEG be found,
            counted and dropped without losing the reader's position.
webdataset: `webdataset.WebDataset` tar reading, PIL decoding and torchvision transforms in torch DataLoader
            workers. Every worker walks the same (seeded) stream and decodes every W-th sample; the DataLoader's
            round-robin puts them back in stream order, so the output does not depend on the worker count.

Exact resume: the state holds the DALI reader checkpoints (or the webdataset stream positions), the samples read
but not yet used, the example buffer (with its images' encoded bytes, decoded again on restore, or the decoded
images on the webdataset backend), the mixing and pool generators, the collator's state and the counters.
Augmentation choices are a function of each sample's position (see `augment.py`).
"""
from __future__ import annotations

import atexit
import copy
import io
import json
import logging
import os
import queue
import random
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..config import ConfigError
from .augment import AUGMENTS, CLIP_MEAN, CLIP_STD, Geometry, mix_seed, normalize, rand_augment, sample_geometry
from .shards import INDEX_VERSION, index_path_for

log = logging.getLogger(__name__)

BACKENDS = ("dali", "webdataset")
STATE_VERSION = 1


class ShardIndexError(FileNotFoundError):
    """A shard or its DALI index is missing or unreadable; the message says how to make it."""


class TooManyBadSamples(RuntimeError):
    """More corrupt samples than `max_bad_fraction` allows."""


# --------------------------------------------------------------------------------------------------- samples


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
class _BadSample:
    dataset: int
    position: int
    key: str
    error: str


def sample_seed(seed: int, rank: int, dataset: int, position: int) -> int:
    return mix_seed(seed, rank, dataset, position)


def _raw_state(raw: RawSample) -> dict:
    """What a checkpoint keeps of a sample still in the loader: the encoded bytes where there are (DALI: decoded
    again, to the same pixels, on restore; a tenth of the size), else the decoded tensors (webdataset)."""
    state = {"dataset": raw.dataset, "position": raw.position, "key": raw.key, "meta": raw.meta, "seed": raw.seed}
    if raw.encoded is not None:
        state["encoded"] = [bytes(b) for b in raw.encoded]
    elif raw.decoded is not None:
        state["decoded"] = [t.detach().cpu() for t in raw.decoded]
    return state


def _raw_from_state(state: dict, device: torch.device) -> RawSample:
    raw = RawSample(state["dataset"], state["position"], state["key"], state["meta"], state["seed"])
    if "decoded" in state:
        raw.decoded = tuple(t.to(device) for t in state["decoded"])
    else:
        raw.encoded = tuple(state["encoded"])
    return raw


# ----------------------------------------------------------------------------------------------- shard plans


def _index_count(tar_path: str) -> int:
    idx = index_path_for(tar_path)
    if not os.path.exists(tar_path):
        raise ShardIndexError(f"shard {tar_path} does not exist: run `python -m dataprep ...` to write it, or fix "
                              "the shard path")
    if not os.path.exists(idx):
        raise ShardIndexError(f"DALI index {idx} is missing for shard {tar_path}: dataprep writes it beside every "
                              f"shard; for a shard made elsewhere run `wds2idx {tar_path} {idx}` (it ships with DALI)")
    with open(idx) as handle:
        header = handle.readline().split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardIndexError(f"{idx} is not a DALI {INDEX_VERSION} index (header {header}); rewrite it with "
                              f"`wds2idx {tar_path} {idx}` or rerun dataprep")
    return int(header[1])


@dataclass
class _Plan:
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


def _plan(paths: Sequence[str], rank: int, world_size: int) -> _Plan:
    counts = [_index_count(p) for p in paths]
    total = sum(counts)
    # DALI's split (fn.readers.* shard_id/num_shards): contiguous, floor(N * r / W).
    return _Plan(list(paths), counts, total * rank // world_size, total * (rank + 1) // world_size)


def _image_size(payload: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        if image.format != "JPEG":
            raise ValueError(f"not a JPEG ({image.format})")
        return image.size


# ------------------------------------------------------------------------------------------------ DALI parts


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as error:  # pragma: no cover - DALI is a dependency; the message is for broken installs
        raise ConfigError("data.loader=dali needs NVIDIA DALI (pip install nvidia-dali-cuda120); "
                          f"or set data.loader=webdataset ({error})") from None
    global _CLOSE_REGISTERED_AFTER_DALI
    if not _CLOSE_REGISTERED_AFTER_DALI:
        # atexit runs last-registered first: ours must stop the loader threads before DALI's own handler
        # tears the pipelines down under them.
        atexit.register(_close_live_loaders)
        _CLOSE_REGISTERED_AFTER_DALI = True
    return fn, types, Pipeline


_CLOSE_REGISTERED_AFTER_DALI = False


class _DaliReaderSource:
    """This rank's stream of raw samples of one dataset, from a checkpointable `fn.readers.webdataset`."""

    def __init__(self, dataset: int, plan: _Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
                 world_size: int, shuffle_buffer: int, read_batch: int):
        self.dataset, self.plan, self.exts, self.train = dataset, plan, exts, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.read_batch = shuffle_buffer, read_batch
        self.position = 0
        self.pending: list[RawSample] = []
        self.checkpoint: bytes | None = None
        self.pipe = None

    @property
    def epoch(self) -> int:
        return self.position // max(1, self.plan.size)

    def _build(self, checkpoint: bytes | None):
        fn, types, Pipeline = _dali()
        pipe = Pipeline(batch_size=self.read_batch, num_threads=1, device_id=None, prefetch_queue_depth=2,
                        seed=mix_seed(self.seed, self.rank, self.dataset, "reader") % (2**31),
                        enable_checkpointing=True, checkpoint=checkpoint)
        with pipe:
            outputs = fn.readers.webdataset(
                paths=self.plan.paths, index_paths=[index_path_for(p) for p in self.plan.paths],
                ext=list(self.exts) + ["json"], missing_component_behavior="error",
                shard_id=self.rank, num_shards=self.world_size, stick_to_shard=True,
                random_shuffle=self.train, initial_fill=max(1, self.shuffle_buffer),
                seed=mix_seed(self.seed, self.rank, self.dataset, "shuffle") % (2**31), name="Reader")
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def next(self) -> RawSample | None:
        if not self.train and self.position >= self.plan.size:
            return None
        if not self.pending:
            self._read()
        raw = self.pending.pop(0)
        self.position += 1
        return raw

    def _read(self) -> None:
        if self.pipe is None:
            self.pipe = self._build(self.checkpoint)
        outputs = self.pipe.run()
        self.checkpoint = self.pipe.checkpoint()
        metas = outputs[-1]
        position = self.position + len(self.pending)
        for i in range(len(metas)):
            encoded = tuple(np.array(outputs[k][i]).tobytes() for k in range(len(self.exts)))
            try:
                meta = json.loads(np.array(metas[i]).tobytes())
                key = str(meta.get("key", ""))
            except (ValueError, UnicodeDecodeError):
                meta, key = {"__bad_json__": True}, ""
            self.pending.append(RawSample(self.dataset, position, key, meta,
                                          sample_seed(self.seed, self.rank, self.dataset, position), encoded=encoded))
            position += 1

    def snapshot(self) -> dict:
        # copies: the producer decodes these objects in place once it reaches them
        return {"position": self.position, "checkpoint": self.checkpoint,
                "pending": [copy.copy(r) for r in self.pending]}

    def restore(self, state: dict, device: torch.device) -> None:
        self.position = int(state["position"])
        self.checkpoint = state["checkpoint"]
        self.pending = [_raw_from_state(r, device) if isinstance(r, dict) else r for r in state["pending"]]
        self.pipe = None

    def close(self) -> None:
        self.pipe = None


class _DaliDecoder:
    """Encoded JPEGs + per-image geometry -> N x 3 x S x S tensors (float32 CLIP-normalised, or uint8).

    Only the region the crop needs is decoded (`fn.decoders.image_slice`: libjpeg-turbo / nvJPEG skip the
    rest; ~1.3x faster for 4:3 pictures), with a margin wider than the resampling filter so the pixels equal
    those of a full decode followed by the same ROI resize.
    """

    def __init__(self, max_batch: int, image_size: int, *, normalise: bool, num_threads: int, gpu: bool):
        self.max_batch, self.size, self.normalise, self.num_threads, self.gpu = (
            max_batch, image_size, normalise, num_threads, gpu)
        self.pipe = self._build()

    def _build(self):
        fn, types, Pipeline = _dali()
        device_id = torch.cuda.current_device() if self.gpu else None
        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=device_id,
                        prefetch_queue_depth=1, exec_dynamic=True, seed=0)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            slice_start = fn.external_source(name="slice_start", dtype=types.INT32, ndim=1)
            slice_shape = fn.external_source(name="slice_shape", dtype=types.INT32, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            images = fn.decoders.image_slice(encoded, slice_start, slice_shape, axes=[0, 1], normalized_anchor=False,
                                             normalized_shape=False, device="mixed" if self.gpu else "cpu",
                                             output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, size=[self.size, self.size], roi_start=roi_start, roi_end=roi_end,
                               roi_relative=False, interp_type=types.INTERP_CUBIC, antialias=True)
            if self.normalise:
                images = fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.FLOAT,
                                                  mean=[m * 255 for m in CLIP_MEAN], std=[s * 255 for s in CLIP_STD])
            else:
                images = fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.UINT8)
            pipe.set_outputs(images)
        pipe.build()
        return pipe

    def _slice(self, geom: Geometry, width: int, height: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """The region to decode (start, shape; [y, x]) and the crop relative to it."""
        scale = max((geom.bottom - geom.top) / self.size, (geom.right - geom.left) / self.size, 1.0)
        margin = int(np.ceil(2 * scale)) + 3  # cubic support: 2 output pixels, stretched by the downscale
        y0, x0 = max(0, int(np.floor(geom.top)) - margin), max(0, int(np.floor(geom.left)) - margin)
        y1, x1 = min(height, int(np.ceil(geom.bottom)) + margin), min(width, int(np.ceil(geom.right)) + margin)
        relative = Geometry(geom.top - y0, geom.left - x0, geom.bottom - y0, geom.right - x0, geom.flip)
        return np.array([y0, x0], np.int32), np.array([y1 - y0, x1 - x0], np.int32), relative

    def close(self) -> None:
        self.pipe = None

    def _run(self, encoded: list[bytes], geometry: list[tuple[Geometry, int, int]]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        if self.pipe is None:
            self.pipe = self._build()
        slices = [self._slice(*g) for g in geometry]
        self.pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in encoded])
        self.pipe.feed_input("slice_start", [start for start, _, _ in slices])
        self.pipe.feed_input("slice_shape", [shape for _, shape, _ in slices])
        self.pipe.feed_input("roi_start", [np.array([g.top, g.left], np.float32) for _, _, g in slices])
        self.pipe.feed_input("roi_end", [np.array([g.bottom, g.right], np.float32) for _, _, g in slices])
        self.pipe.feed_input("mirror", [np.array(int(g.flip), np.int32) for _, _, g in slices])
        (out,) = self.pipe.run()
        # Zero-copy: with the dynamic executor every run gets fresh output buffers, owned through DLPack by
        # the torch tensor (checked: earlier outputs stay intact over later runs).
        return to_torch_tensor(out.as_tensor(), copy=False)

    def __call__(self, encoded: list[bytes], geometry: list[tuple[Geometry, int, int]]) -> list[torch.Tensor | str]:
        """One tensor per image (geometry: (crop, width, height)), or the error message where it failed."""
        if not encoded:
            return []
        if len(encoded) > self.max_batch:  # the pipeline's batch size is its most; larger calls go in parts
            return [image for start in range(0, len(encoded), self.max_batch)
                    for image in self(encoded[start:start + self.max_batch], geometry[start:start + self.max_batch])]
        try:
            return list(self._run(encoded, geometry).unbind(0))
        except RuntimeError:
            # A corrupt image fails the whole batch and DALI calls the pipeline object invalid afterwards:
            # rebuild it and decode one by one to find the culprit(s).
            self.pipe = self._build()
        images: list[torch.Tensor | str] = []
        for payload, geom in zip(encoded, geometry):
            try:
                images.append(self._run([payload], [geom])[0])
            except RuntimeError as error:
                self.pipe = self._build()
                lines = [line for line in str(error).splitlines() if "Failed to decode" in line or "rror" in line]
                images.append("DALI fn.decoders.image failed: " + (lines[-1].strip()[:200] if lines else "unknown"))
        return images


# ------------------------------------------------------------------------------------------ webdataset parts


def _pil_transform(payload: bytes, size: int, geometry_fn: Callable[[int, int], Geometry], finetune: bool,
                   seed: int) -> np.ndarray:
    """JPEG bytes -> uint8 3 x size x size (normalised later, in the loader: uint8 is a quarter of the bytes to
    send from a worker, and plain arrays travel through the pipe rather than torch's fd-sharing)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with Image.open(io.BytesIO(payload)) as opened:
        if opened.format != "JPEG":
            raise ValueError(f"not a JPEG ({opened.format})")
        image = opened.convert("RGB")
    if not finetune:
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [size, size])
        return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))
    geom = geometry_fn(*image.size)
    image = TF.resized_crop(image, int(geom.top), int(geom.left), int(geom.bottom - geom.top),
                            int(geom.right - geom.left), [size, size], interpolation=InterpolationMode.BICUBIC)
    if geom.flip:
        image = TF.hflip(image)
    return rand_augment(TF.pil_to_tensor(image), seed).numpy()


def _identity(item):
    return item


_WORKER_PRELOAD = ["managertower.data.pipelines", "PIL.Image", "torchvision.transforms", "webdataset"]


def _worker_context():
    """Workers come from a forkserver: forking the training process itself (threads running: DALI, the loader
    thread, queue feeders) can leave a worker deadlocked on a lock some other thread held at the fork.
    The server imports torch & co. once, so each worker still starts in milliseconds."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_WORKER_PRELOAD)
    return context


class _WdsStream(torch.utils.data.IterableDataset):
    """The canonical stream of one dataset on one rank from `start` on, decoded by DataLoader workers."""

    def __init__(self, dataset: int, plan: _Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
                 shuffle_buffer: int, image_size: int, augment: str, hflip: bool, start: int):
        super().__init__()
        self.dataset, self.plan, self.exts, self.train, self.seed, self.rank = dataset, plan, exts, train, seed, rank
        self.shuffle_buffer, self.image_size, self.augment, self.hflip, self.start = (
            shuffle_buffer, image_size, augment, hflip, start)

    def _epoch(self, epoch: int) -> Iterator[dict]:
        import webdataset

        pieces = self.plan.pieces()
        rng = random.Random(mix_seed(self.seed, self.rank, self.dataset, epoch, "wds"))
        if self.train:
            rng.shuffle(pieces)
        ranges = {path: (lo, hi) for path, lo, hi in pieces}
        reader = webdataset.WebDataset([p for p, _, _ in pieces], shardshuffle=False, nodesplitter=None,
                                       workersplitter=None, empty_check=False)

        def selected():
            local: dict[str, int] = {}
            for sample in reader:
                url = sample["__url__"]
                index = local.get(url, 0)
                local[url] = index + 1
                lo, hi = ranges[url]
                if lo <= index < hi:
                    yield sample

        if not self.train:
            yield from selected()
            return
        buffer: list[dict] = []
        for sample in selected():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = rng.randrange(len(buffer))
            buffer[j], sample = sample, buffer[j]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _positions(self) -> Iterator[tuple[int, dict]]:
        size = self.plan.size
        epoch, offset = divmod(self.start, size)
        while self.train or epoch == 0:
            for i, sample in enumerate(self._epoch(epoch)):
                if i >= offset:
                    yield epoch * size + i, sample
            offset = 0
            epoch += 1

    def _decode(self, position: int, sample: dict) -> RawSample | _BadSample:
        key = sample.get("__key__", "")
        seed = sample_seed(self.seed, self.rank, self.dataset, position)
        missing = [ext for ext in self.exts + ("json",) if ext not in sample]
        if missing:
            raise ValueError(f"sample {key} in {sample.get('__url__')} lacks .{', .'.join(missing)} "
                             "(missing_component_behavior=error): re-run dataprep for this shard")
        try:
            meta = json.loads(sample["json"])
            images = []
            for k, ext in enumerate(self.exts):
                image_seed = mix_seed(seed, k)
                images.append(_pil_transform(
                    sample[ext], self.image_size,
                    lambda w, h, s=image_seed: sample_geometry(w, h, self.image_size, self.augment, s, self.hflip),
                    self.augment != "none", image_seed))
        except Exception as error:  # a corrupt member: counted and skipped by the loader
            return _BadSample(self.dataset, position, key, f"{type(error).__name__}: {error}")
        return RawSample(self.dataset, position, str(meta.get("key", key)), meta, seed, decoded=tuple(images))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, sample in self._positions():
            if (position - self.start) % workers == worker:
                yield self._decode(position, sample)


class _WdsSource:
    def __init__(self, dataset: int, plan: _Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
                 shuffle_buffer: int, image_size: int, augment: str, hflip: bool, num_workers: int):
        self.kwargs = dict(train=train, seed=seed, rank=rank, shuffle_buffer=shuffle_buffer, image_size=image_size,
                           augment=augment, hflip=hflip)
        self.dataset, self.plan, self.exts, self.train, self.num_workers = dataset, plan, exts, train, num_workers
        self.position = 0
        self.iterator = None
        import webdataset  # noqa: F401  (fail here, not in a worker, if it is missing)

    @property
    def epoch(self) -> int:
        return self.position // max(1, self.plan.size)

    def next(self) -> RawSample | _BadSample | None:
        if not self.train and self.position >= self.plan.size:
            return None
        if self.iterator is None:
            stream = _WdsStream(self.dataset, self.plan, self.exts, start=self.position, **self.kwargs)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, collate_fn=_identity,
                                                 num_workers=self.num_workers,
                                                 prefetch_factor=4 if self.num_workers else None,
                                                 multiprocessing_context=_worker_context() if self.num_workers else None,
                                                 persistent_workers=False)
            self.iterator = iter(loader)
        try:
            item = next(self.iterator)
        except StopIteration:
            return None
        if item.position != self.position:  # the worker round-robin is what keeps the order: check it
            raise RuntimeError(f"webdataset stream out of order: expected sample {self.position}, got {item.position}")
        self.position += 1
        if isinstance(item, RawSample):
            item.decoded = tuple(normalize(torch.from_numpy(image)[None])[0] for image in item.decoded)
        return item

    def snapshot(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict, device: torch.device) -> None:
        self.close()
        self.position = int(state["position"])

    def close(self) -> None:
        iterator, self.iterator = self.iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:  # at once: left to the garbage collector it can take seconds per worker
            shutdown()


# ----------------------------------------------------------------------------------------------------- loader


def default_collate(examples: list[dict], images: tuple) -> dict:
    return {"examples": examples}


_END = object()
_LIVE_LOADERS: "weakref.WeakSet[Loader]" = weakref.WeakSet()


@atexit.register
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

    def __init__(self, sources: list, weights: list[float], *, backend: str, batch_size: int, image_size: int,
                 exts: tuple[str, ...], expand: Callable, collate: Callable, train: bool, augment: str, hflip: bool,
                 device: torch.device, decoder: _DaliDecoder | None, max_bad_fraction: float,
                 bad_fraction_floor: int, seed: int, rank: int, prefetch: int, example_pool: int = 1):
        self.sources, self.weights = sources, torch.tensor(weights, dtype=torch.double)
        self.backend, self.batch_size, self.image_size, self.exts = backend, batch_size, image_size, exts
        self.expand, self.collate, self.train, self.augment, self.hflip = expand, collate, train, augment, hflip
        self.device, self.decoder = device, decoder
        self.max_bad_fraction, self.bad_fraction_floor = max_bad_fraction, bad_fraction_floor
        self.seed, self.rank, self.prefetch = seed, rank, prefetch
        self.example_pool = example_pool if train else 1  # evaluation keeps the order
        self._expand_takes_rng = _takes_rng(expand)
        self._initial_collate = collate.state_dict() if hasattr(collate, "state_dict") else None
        self._reset_working_state()
        self._committed = self._snapshot()
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
        self._buffer: list[tuple[dict, RawSample]] = []
        self._counts = {"samples_seen": 0, "images_seen": 0, "bad_samples": 0, "batches": 0}
        self._active = [True] * len(self.sources)

    def _snapshot(self) -> dict:
        return {"sources": [s.snapshot() for s in self.sources], "buffer": list(self._buffer),
                "mix": self._mix.get_state().clone(), "pick": self._pick.get_state().clone(),
                "active": list(self._active),
                "collate": self.collate.state_dict() if hasattr(self.collate, "state_dict") else None,
                **self._counts}

    def _next_raw(self) -> RawSample | _BadSample | None:
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
        if self._expand_takes_rng:
            return self.expand(raw.meta, rng=random.Random(mix_seed(raw.seed, "expand")))
        return self.expand(raw.meta)

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
                geoms = []
                for k, payload in enumerate(raw.encoded):
                    width, height = _image_size(payload)
                    geoms.append((sample_geometry(width, height, self.image_size, self.augment,
                                                  mix_seed(raw.seed, k), self.hflip), width, height))
                geometries[id(raw)] = geoms
                ok.append(raw)
            except Exception as error:  # the header does not parse: corrupt before DALI sees it
                errors[id(raw)] = f"{type(error).__name__}: {error}"
        per_ext = []
        for k in range(len(self.exts)):
            images = self.decoder([r.encoded[k] for r in ok], [geometries[id(r)][k] for r in ok])
            per_ext.append(images)
            for raw, image in zip(ok, images):
                if isinstance(image, str):
                    errors.setdefault(id(raw), image)
        for i, raw in enumerate(ok):
            if id(raw) in errors:
                continue
            images = [per_ext[k][i] for k in range(len(self.exts))]
            if self.augment != "none":  # DALI gave uint8 crops: RandAugment then normalise
                images = [normalize(rand_augment(img, mix_seed(raw.seed, k))[None])[0] for k, img in enumerate(images)]
            raw.decoded = tuple(images)
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
        have = len({id(raw) for _, raw in self._buffer})
        while len(self._buffer) < examples or have < images:
            new: list[tuple[RawSample, list[dict]]] = []
            count = len(self._buffer)
            while count < examples or have + len(new) < images:
                raw = self._next_raw()
                if raw is None:
                    break
                if isinstance(raw, _BadSample):
                    self._warn_bad(raw.key, raw.dataset, raw.error)
                    continue
                if raw.meta.get("__bad_json__"):
                    self._warn_bad(raw.key, raw.dataset, "metadata is not valid JSON")
                    continue
                expanded = self._expand(raw)
                if expanded:
                    new.append((raw, expanded))
                    count += len(expanded)
            if not new:
                break
            bad = {id(r) for r in self._decode([r for r, _ in new])} if self.decoder is not None else set()
            for raw, expanded in new:
                if id(raw) not in bad:
                    self._counts["images_seen"] += 1
                    self._buffer.extend((example, raw) for example in expanded)
                    have += 1

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
        examples = [e for e, _ in chosen]
        images = tuple(self._batch_images([raw.decoded[k] for _, raw in chosen]) for k in range(len(self.exts)))
        batch = self.collate(examples, images)
        batch.setdefault("pixel_values", images[0])
        if len(images) > 1:
            batch.setdefault("pixel_values_2", images[1])
        batch = {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                 for k, v in batch.items()}
        self._counts["samples_seen"] += len(examples)
        self._counts["batches"] += 1
        return batch

    def _batch_images(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Stack the images; when they are exactly the rows of one decoder output, in order, and no example
        left in the buffer shares it, hand that tensor out as it is (no copy)."""
        base = tensors[0]._base
        if (base is not None and base.dim() == 4 and base.shape[0] == len(tensors)
                and all(t._base is base and t.data_ptr() == base[i].data_ptr() for i, t in enumerate(tensors))
                and not any(d._base is base for _, raw in self._buffer for d in raw.decoded)):
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
        if self._initial_collate is not None:
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
        for example, raw in committed["buffer"]:
            raws.setdefault(id(raw), _raw_state(raw))
            buffer.append({"example": example, "raw": list(raws).index(id(raw))})
        sources = []
        for snap in committed["sources"]:
            snap = dict(snap)
            if "pending" in snap:
                snap["pending"] = [_raw_state(r) for r in snap["pending"]]
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
        raws = [_raw_from_state(r, self.device) for r in state["raws"]]
        self._mix = torch.Generator()
        self._mix.set_state(state["mix"].clone())
        self._pick = torch.Generator()
        if "pick" in state:
            self._pick.set_state(state["pick"].clone())
        else:
            self._pick.manual_seed(mix_seed(self.seed, self.rank, "pool"))
        self._active = list(state["active"])
        if state.get("collate") is not None and hasattr(self.collate, "load_state_dict"):
            self.collate.load_state_dict(state["collate"])
        self._counts = {k: int(state[k]) for k in ("samples_seen", "images_seen", "bad_samples", "batches")}
        # The buffer's images were saved as their encoded bytes (DALI): decode them again, to the same pixels.
        undecoded = [raw for raw in raws if raw.decoded is None]
        bad = {id(r) for r in self._decode(undecoded)} if undecoded else set()
        self._buffer = [(item["example"], raws[item["raw"]]) for item in state["buffer"]
                        if id(raws[item["raw"]]) not in bad]
        self._committed = self._snapshot()
        self._exhausted = False


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    if tensors[0].device.type != "cpu":
        return torch.stack(tensors)
    # numpy for CPU tensors: torch's multi-threaded copy into fresh memory runs ~20x slower than one numpy
    # pass on small machines (measured: 256 ms vs 2 ms for 32 x 3 x 288 x 288 on 2 cores)
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def _takes_rng(function: Callable) -> bool:
    """expand(meta) or expand(meta, rng=...): the second form gets a per-sample seeded random.Random."""
    import inspect

    try:
        return "rng" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------- build_loader


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={device} is not supported by the loader: use cpu, cuda or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device: use device=cpu (or auto)")
    return device


def build_loader(shards: list[list[str]], weights: list[float] | None = None, *, backend: str = "dali",
                 batch_size: int, image_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 expand: Callable, collate: Callable | None = None, images: tuple[str, ...] = ("jpg",),
                 train: bool = True, augment: str = "none", hflip: bool = True, num_threads: int = 2,
                 shuffle_buffer: int = 1000, max_bad_fraction: float = 0.01, bad_fraction_floor: int = 1000,
                 device: str | torch.device = "auto", prefetch: int = 2, example_pool: int = 1) -> Loader:
    """A rank-aware loader over dataprep shards (module docstring). Fails fast, with the fix, on bad settings.

    shards: one list of .tar paths per dataset (`expand_shards` turns folders, globs and brace ranges into one);
    weights: mixing weights per dataset (None: equal); expand(meta[, rng]) -> examples (a second parameter gets
    a `random.Random` seeded by the sample's position); collate(examples, images) -> dict; images: the image
    members per sample ("jpg", plus "img1.jpg" for NLVR2); train: shuffled, endless (epochs) | one ordered pass
    over this rank's part with the last partial batch kept; augment: "none" (resize + centre crop) or
    "finetune" (RandomResizedCrop 0.5-1, flip unless hflip=False, RandAugment(2, 7)); num_threads: DALI
    decoding threads or webdataset worker processes; device: where batches go ("auto": cuda when available;
    DALI then decodes with device="mixed"); example_pool: when training, each batch is drawn at random from the
    examples of this many decoded images (1: an image's examples stay together, in order).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend={backend!r} is not one of {', '.join(BACKENDS)}")
    if augment not in AUGMENTS:
        raise ConfigError(f"augment={augment!r} is not one of {', '.join(AUGMENTS)}")
    for name, value in (("batch_size", batch_size), ("image_size", image_size), ("world_size", world_size)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is outside 0..{world_size - 1} (world_size={world_size})")
    if backend == "dali" and num_threads < 1 or num_threads < 0:
        raise ConfigError(f"num_threads must be >= 1 (DALI) or >= 0 (webdataset workers), got {num_threads}")
    if train and shuffle_buffer < 1:
        raise ConfigError(f"shuffle_buffer must be >= 1 when training, got {shuffle_buffer}")
    if not 0 <= max_bad_fraction <= 1:
        raise ConfigError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if not isinstance(example_pool, int) or example_pool < 1:
        raise ConfigError(f"example_pool must be an integer >= 1 (1: no mixing), got {example_pool!r}")
    if not images or len(set(images)) != len(images) or "json" in images:
        raise ConfigError(f"images={images!r} must name distinct image members such as ('jpg',) or "
                          "('jpg', 'img1.jpg')")
    if isinstance(shards, str) or not shards or any(isinstance(s, str) or not s for s in shards):
        raise ConfigError("shards must be a non-empty list with one non-empty list of .tar paths per dataset "
                          "(expand_shards(spec) makes one from a folder, glob or brace range)")
    if weights is None:
        weights = [1.0] * len(shards)
    if len(weights) != len(shards) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"weights={weights} must hold one non-negative weight per dataset ({len(shards)}), "
                          "not all zero")
    device = resolve_device(device)
    plans = [_plan([str(p) for p in paths], rank, world_size) for paths in shards]
    for d, plan in enumerate(plans):
        if plan.size == 0 and train:
            raise ConfigError(f"dataset {d} has {sum(plan.counts)} samples, too few for rank {rank} of "
                              f"{world_size}: every rank needs at least one")
    exts = tuple(images)
    decoder = None
    if backend == "dali":
        gpu = device.type == "cuda"  # decode where the batches go: device="mixed" on CUDA
        read_batch = max(batch_size, 16)
        sources = [_DaliReaderSource(d, plan, exts, train=train, seed=seed, rank=rank, world_size=world_size,
                                     shuffle_buffer=shuffle_buffer, read_batch=read_batch)
                   for d, plan in enumerate(plans)]
        decoder = _DaliDecoder(batch_size, image_size, normalise=augment == "none", num_threads=num_threads, gpu=gpu)
    else:
        sources = [_WdsSource(d, plan, exts, train=train, seed=seed, rank=rank, shuffle_buffer=shuffle_buffer,
                              image_size=image_size, augment=augment, hflip=hflip, num_workers=num_threads)
                   for d, plan in enumerate(plans)]
    return Loader(sources, list(map(float, weights)), backend=backend, batch_size=batch_size, image_size=image_size,
                  exts=exts, expand=expand, collate=collate or default_collate, train=train, augment=augment,
                  hflip=hflip, device=device, decoder=decoder, max_bad_fraction=max_bad_fraction,
                  bad_fraction_floor=bad_fraction_floor, seed=seed, rank=rank, prefetch=prefetch,
                  example_pool=example_pool)


def build_pretrain_loader(data_cfg, model_cfg, tokenizer, *, micro_batch: int, rank: int = 0, world_size: int = 1,
                          seed: int = 0, device: str | torch.device = "auto", split: str = "train",
                          prefetch: int = 2) -> Loader:
    """The pre-training loader (SPEC §2): data_cfg.train_shards mixed by data_cfg.weights, MLM + ITM batches.

    split="val" reads data_cfg.val_shards once, in order (evaluation). Batch keys: pixel_values, input_ids,
    attention_mask, mlm_input_ids, mlm_labels, itm_image_index, itm_labels.
    """
    from functools import partial

    from .collate import PretrainCollator, expand_pretrain
    from .shards import expand_shards

    if split not in ("train", "val"):
        raise ConfigError(f"split={split!r} is not train or val")
    specs = data_cfg.train_shards if split == "train" else data_cfg.val_shards
    if not specs:
        raise ConfigError(f"data.{split}_shards is empty: point it at the folders `python -m dataprep` wrote")
    try:
        shards = [expand_shards(spec) for spec in specs]
    except FileNotFoundError as error:
        raise ShardIndexError(str(error)) from None
    weights = (data_cfg.weights or None) if split == "train" else None
    collator = PretrainCollator(tokenizer, model_cfg.max_text_len, data_cfg.mlm_probability,
                                data_cfg.itm_negative_fraction, seed=seed, rank=rank)
    return build_loader(shards, weights, backend=data_cfg.loader, batch_size=micro_batch,
                        image_size=model_cfg.image_size, rank=rank, world_size=world_size, seed=seed,
                        expand=partial(expand_pretrain, per_caption=data_cfg.per_caption), collate=collator,
                        train=split == "train", augment="none", num_threads=data_cfg.num_threads,
                        shuffle_buffer=data_cfg.shuffle_buffer, max_bad_fraction=data_cfg.max_bad_fraction,
                        device=device, prefetch=prefetch, example_pool=data_cfg.example_pool)
