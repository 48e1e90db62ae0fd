"""The webdataset backend: `webdataset.WebDataset` tar reading, PIL decoding and torchvision transforms in torch
DataLoader workers. Every worker walks the same (seeded) stream and decodes every W-th sample; the DataLoader's
round-robin puts them back in stream order, so the output does not depend on the worker count.
"""
from __future__ import annotations

import io
import json
import random
from typing import Iterator

import numpy as np
import torch

from .augment import mix_seed, normalize
from .plan import BadSample, Plan, RawSample, sample_seed
from .shards import META


def pil_transform(payload: bytes, size: int, transform: str) -> np.ndarray:
    """JPEG bytes -> uint8 3 x size x size ("clip": shorter side + centre crop; "albef": the whole image to
    (size, size)), or the whole decoded image for "albef_randaug" (each example is augmented from it in the
    loader). Normalised later, in the loader: uint8 is a quarter of the bytes to send from a worker, and plain
    arrays travel through the pipe rather than torch's fd-sharing."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    with Image.open(io.BytesIO(payload)) as opened:
        if opened.format != "JPEG":
            raise ValueError(f"not a JPEG ({opened.format})")
        image = opened.convert("RGB")
    if transform == "clip":
        image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
        image = TF.center_crop(image, [size, size])
    elif transform == "albef":
        image = TF.resize(image, [size, size], interpolation=InterpolationMode.BICUBIC)
    return np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))


def _identity(item):
    return item


_WORKER_PRELOAD = ["managertower.data.wds", "PIL.Image", "torchvision.transforms", "webdataset"]


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

    def __init__(self, dataset: int, plan: Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
                 shuffle_buffer: int, image_size: int, transform: str, start: int):
        super().__init__()
        self.dataset, self.plan, self.exts, self.train, self.seed, self.rank = dataset, plan, exts, train, seed, rank
        self.shuffle_buffer, self.image_size, self.transform, self.start = (
            shuffle_buffer, image_size, transform, start)

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

    def _decode(self, position: int, sample: dict) -> RawSample | BadSample:
        key = sample.get("__key__", "")
        seed = sample_seed(self.seed, self.rank, self.dataset, position)
        missing = [ext for ext in self.exts + (META,) if ext not in sample]
        if missing:
            raise ValueError(f"sample {key} in {sample.get('__url__')} lacks .{', .'.join(missing)} "
                             "(missing_component_behavior=error): re-run dataprep for this shard")
        try:
            meta = json.loads(sample[META])
            images = []
            for k, ext in enumerate(self.exts):
                images.append(pil_transform(sample[ext], self.image_size, self.transform))
        except Exception as error:  # a corrupt member: counted and skipped by the loader
            return BadSample(self.dataset, position, key, f"{type(error).__name__}: {error}")
        return RawSample(self.dataset, position, str(meta.get("key", key)), meta, seed, decoded=tuple(images))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for position, sample in self._positions():
            if (position - self.start) % workers == worker:
                yield self._decode(position, sample)


class WdsSource:
    def __init__(self, dataset: int, plan: Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
                 shuffle_buffer: int, image_size: int, transform: str, num_workers: int):
        self.kwargs = dict(train=train, seed=seed, rank=rank, shuffle_buffer=shuffle_buffer, image_size=image_size,
                           transform=transform)
        self.transform = transform
        self.dataset, self.plan, self.exts, self.train, self.num_workers = dataset, plan, exts, train, num_workers
        self.position = 0
        self.iterator = None
        import webdataset  # noqa: F401  (fail here, not in a worker, if it is missing)

    @property
    def epoch(self) -> int:
        return self.position // max(1, self.plan.size)

    def next(self) -> RawSample | BadSample | None:
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
            images = (torch.from_numpy(image) for image in item.decoded)
            # whole images stay uint8 until each example's augmented view is made (loader)
            item.decoded = tuple(images if self.transform == "albef_randaug" else
                                 (normalize(image[None])[0] for image in images))
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

