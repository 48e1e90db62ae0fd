"""The DALI backend: a checkpointable reader per dataset and one decoder for every image of a batch.

`fn.readers.webdataset` (checkpointable) reads the raw members; a second DALI pipeline decodes them. On CUDA it
also resizes and normalises (`fn.decoders.image_slice` with `device="mixed"`, a ROI `fn.resize`,
`fn.crop_mirror_normalize`); on the CPU it decodes and the loader's worker threads resize with torch's uint8
kernel, five times faster than DALI's CPU resampler here (`DaliDecoder`). Keeping decoding apart from reading
lets a corrupt JPEG be found, counted and dropped without losing the reader's position.
"""
from __future__ import annotations

import copy
import json
from typing import Callable

import numpy as np
import torch

from ..config import ConfigError
from .augment import CLIP_MEAN, CLIP_STD, Geometry, mix_seed, normalize_into, resize_image
from .plan import Plan, RawSample, raw_from_state, sample_seed
from .shards import META, index_path_for
from .workers import ImageWorkers

_ON_FIRST_IMPORT: list[Callable[[], None]] = []


def on_first_import(callback: Callable[[], None]) -> None:
    """Run `callback` right after DALI is first imported (the loader registers its atexit clean-up there, so
    that it runs before DALI's own: atexit runs last-registered first)."""
    _ON_FIRST_IMPORT.append(callback)


# Frame headers (SOF0-SOF15) carry the size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(payload: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG's frame header; anything else is an error (the shards hold baseline JPEGs).

    Walks the marker segments up to the frame header (a few microseconds; PIL's `Image.open` took 0.2 ms per
    image, a tenth of the loader's CPU time per image). What gets past it but does not decode (a truncated scan)
    fails in DALI's decoder, which the loader catches too."""
    if payload[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    i, end = 2, len(payload)
    while i + 4 <= end:
        if payload[i] != 0xFF:
            raise ValueError(f"not a JPEG (no marker at byte {i})")
        marker = payload[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header before them
            break
        if marker in _FRAME_MARKERS:
            if i + 9 > end:
                break
            height, width = int.from_bytes(payload[i + 5:i + 7], "big"), int.from_bytes(payload[i + 7:i + 9], "big")
            if not width or not height:
                raise ValueError(f"JPEG frame header gives a size of {width}x{height}")
            return width, height
        i += 2 + int.from_bytes(payload[i + 2:i + 4], "big")
    raise ValueError("not a JPEG (no frame header)")


def _dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline
    except ImportError as error:  # pragma: no cover - DALI is a dependency; the message is for broken installs
        raise ConfigError("data.backend=dali needs NVIDIA DALI: install the build for your CUDA major version "
                          "(pip install 'managertower[cu12]' or '[cu13]', i.e. nvidia-dali-cuda120 / -cuda130); or "
                          f"set data.backend=webdataset ({error})") from None
    while _ON_FIRST_IMPORT:
        _ON_FIRST_IMPORT.pop(0)()
    return fn, types, Pipeline


class DaliReaderSource:
    """This rank's stream of raw samples of one dataset, from a checkpointable `fn.readers.webdataset`."""

    def __init__(self, dataset: int, plan: Plan, exts: tuple[str, ...], *, train: bool, seed: int, rank: int,
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
                ext=list(self.exts) + [META], missing_component_behavior="error",
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
        self.pending = [raw_from_state(r, device) if isinstance(r, dict) else r for r in state["pending"]]
        self.pipe = None

    def close(self) -> None:
        self.pipe = None


class DaliDecoder:
    """Encoded JPEGs -> the image(s) the loader keeps per sample; the corrupt ones come back as error messages.

    On the CPU, DALI decodes (libjpeg-turbo, in its `num_threads` threads) and the loader's worker threads
    (`workers.py`) resize with torch's uint8 bicubic kernel and normalise into rows of one N x 3 x S x S float32
    tensor: exactly torchvision's `Resize(S) + CenterCrop(S)` ("clip") or `Resize((S, S))` ("albef") on the
    decoded image, the released transforms. DALI's own CPU resampler (`fn.resize`, cubic, antialiased) was the
    loader's largest cost: 2.0 ms of CPU per 288 px image against torch's 0.35-0.45 ms (measured here, one
    thread each; decoding is 0.8-0.9 ms). With `whole` (fine-tuning augmentation) the whole image is kept as
    uint8, a C x H x W view of DALI's H x W x C output; every example's view is made from it in the loader.

    On CUDA everything stays in DALI (`device="mixed"`: nvJPEG, GPU resize, normalisation): only the region the
    crop needs is decoded (`fn.decoders.image_slice`, with a margin wider than the resampling filter so the pixels
    equal those of a full decode followed by the same ROI resize), and `fn.resize` takes the crop as a ROI of
    the source (fractional, `augment.sample_geometry`) in one resampling. `needs_geometry` says which.
    """

    def __init__(self, max_batch: int, image_size: int, *, transform: str, num_threads: int, device: torch.device,
                 workers: ImageWorkers):
        # The GPU is named by index, not by torch.cuda.current_device(): that is per thread, and the pipeline is
        # rebuilt in the loader's producer thread (after a corrupt image), where it would say GPU 0.
        self.max_batch, self.size, self.transform, self.num_threads = max_batch, image_size, transform, num_threads
        self.whole = transform == "albef_randaug"
        self.gpu, self.device_id = device.type == "cuda", device.index if device.type == "cuda" else None
        self.workers = workers
        self.needs_geometry = self.gpu and not self.whole
        self.pipe = self._build()

    def _build(self):
        fn, types, Pipeline = _dali()
        pipe = Pipeline(batch_size=self.max_batch, num_threads=self.num_threads, device_id=self.device_id,
                        prefetch_queue_depth=1, exec_dynamic=True, seed=0)
        if not self.needs_geometry:
            with pipe:
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                images = fn.decoders.image(encoded, device="mixed" if self.gpu else "cpu", output_type=types.RGB,
                                           adjust_orientation=False)
                pipe.set_outputs(fn.transpose(images, perm=[2, 0, 1]) if self.gpu else images)
            pipe.build()
            return pipe
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
            images = fn.crop_mirror_normalize(images, mirror=mirror, output_layout="CHW", dtype=types.FLOAT,
                                              mean=[m * 255 for m in CLIP_MEAN], std=[s * 255 for s in CLIP_STD])
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

    def _run(self, encoded: list[bytes], geometry: list[tuple[Geometry, int, int]]) -> list[torch.Tensor]:
        from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

        if self.pipe is None:
            self.pipe = self._build()
        self.pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in encoded])
        if self.needs_geometry:
            slices = [self._slice(*g) for g in geometry]
            self.pipe.feed_input("slice_start", [start for start, _, _ in slices])
            self.pipe.feed_input("slice_shape", [shape for _, shape, _ in slices])
            self.pipe.feed_input("roi_start", [np.array([g.top, g.left], np.float32) for _, _, g in slices])
            self.pipe.feed_input("roi_end", [np.array([g.bottom, g.right], np.float32) for _, _, g in slices])
            self.pipe.feed_input("mirror", [np.array(int(g.flip), np.int32) for _, _, g in slices])
        (out,) = self.pipe.run()
        if self.needs_geometry:
            # Zero-copy: with the dynamic executor every run gets fresh output buffers, owned through DLPack by
            # the torch tensor (checked: earlier outputs stay intact over later runs).
            return list(to_torch_tensor(out.as_tensor(), copy=False).unbind(0))
        if self.whole:  # images of different sizes, kept in the loader's buffer: copied out of DALI's output
            images = [to_torch_tensor(out[i], copy=True) for i in range(len(out))]
            return images if self.gpu else [image.permute(2, 0, 1) for image in images]
        decoded = [to_torch_tensor(out[i], copy=False).permute(2, 0, 1) for i in range(len(out))]
        batch = torch.empty((len(decoded), 3, self.size, self.size), dtype=torch.float32)
        self.workers.map(lambda i: normalize_into(batch[i], resize_image(decoded[i], self.size, self.transform)),
                         range(len(decoded)))
        return list(batch.unbind(0))

    def __call__(self, encoded: list[bytes], geometry: list[tuple[Geometry, int, int]] | None = None
                 ) -> list[torch.Tensor | str]:
        """One tensor per image (geometry: (crop, width, height) where `needs_geometry`, else None), or the error
        message where it failed."""
        geometry = geometry if geometry is not None else [None] * len(encoded)
        if not encoded:
            return []
        if len(encoded) > self.max_batch:  # the pipeline's batch size is its most; larger calls go in parts
            return [image for start in range(0, len(encoded), self.max_batch)
                    for image in self(encoded[start:start + self.max_batch], geometry[start:start + self.max_batch])]
        try:
            return self._run(encoded, geometry)
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

