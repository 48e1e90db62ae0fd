"""Image loading throughput: this project's DALI loader against the pipelines of open_clip and the released code.

    python bench/loader.py                      # pre-training: 400 photo-like 512x384 JPEGs, 288 px, 2 threads/workers
    python bench/loader.py --mode finetune      # fine-tuning: 384 px, every example its own crop, flip, RandAugment
    python bench/loader.py --images 2000 --threads 8 --batch 64 --rounds 5
    python bench/loader.py --device cuda --images 512 --threads 8     # + DALI's GPU ("mixed") decoding

--mode pretrain: both sides read the same JPEG bytes from local tar shards and make float32 B x 3 x 288 x 288
batches, CLIP-normalised, on the CPU (with --device cuda: on the GPU, every side's batches moved there as
training would; ours decodes there):
  ours (dali):        build_loader(LoaderSpec(backend="dali")): fn.readers.webdataset -> fn.decoders.image (DALI's
                      threads) -> torch's uint8 bicubic Resize + CenterCrop and normalisation in the loader's worker
                      threads, shards as dataprep writes them (KEY.jpg + KEY.json, .idx).
  peer (open_clip):   open_clip's training pipeline (open_clip/training/data.py get_wds_dataset, replicated here
                      since open_clip.training is not installed): SimpleShardList -> split_by_worker ->
                      tarfile_to_samples -> shuffle -> decode("pilrgb") -> open_clip.image_transform (Resize +
                      CenterCrop bicubic, ToTensor, Normalize) -> batched, through a WebLoader with N workers, over
                      img2dataset-style shards (KEY.jpg + KEY.txt + KEY.json).
  ours (webdataset):  build_loader(LoaderSpec(backend="webdataset")), for reference.
  ours (dali, cuda):  --device cuda only: the same loader with device="mixed" decoding (nvJPEG), ROI resize and
                      normalisation in DALI on the GPU; its first batch of an ordered pass is compared with the CPU
                      path's (max and mean |difference| in 0-255 pixel levels: the decoders and resamplers differ).
--mode finetune (CPU): `--captions` examples per image (a retrieval caption each), float32 B x 3 x 384 x 384 with
every example's own RandomResizedCrop(scale 0.5-1, bicubic), horizontal flip and ALBEF RandomAugment(2, 7) with
the colour ops (the released `albef_transform_randaug_wc`):
  ours (dali):        build_loader(transform="albef_randaug", example_pool=256 as the fine-tuning recipes): each
                      image decoded once by DALI, every example augmented in the loader's worker threads
                      (managertower/data/augment.py).
  peer (released):    the released per-pair pipeline: a torch Dataset of (image file, caption) pairs that opens
                      its image with PIL for every pair, torchvision RandomResizedCrop + RandomHorizontalFlip, the
                      same RandomAugment ops applied by torchvision to the PIL image, ToTensor, Normalize, through a
                      DataLoader with N workers (shuffled), over the same JPEGs as files.
Text is passed through untokenised on every side: this measures image loading. Each pipeline gets one warm-up
batch, then `--rounds` alternating rounds of `--epochs` passes each (CUDA synchronised before the clock is read);
printed: a table of the median images (examples) per second, the CPU milliseconds each took in the whole process
tree (load-independent), the seconds to the first batch, and the median of the rounds' ratios (ours / peer),
with the goal (pretrain >= 2, finetune >= 1.5).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GOALS = {"pretrain": 2.0, "finetune": 1.5}


def photo_like_jpeg(seed: int, width: int = 512, height: int = 384, quality: int = 90) -> bytes:
    """Smooth gradients, a few soft shapes and sensor-like noise: compresses like a photo (~40-80 KB)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * (x / width) + rng.uniform(-60, 60) * (y / height)
                     for _ in range(3)], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [int(x0), int(y0), int(x0 + rng.integers(20, 200)), int(y0 + rng.integers(20, 160))]
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=2))
    array = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(root: str, count: int, per_shard: int, captions: int) -> tuple[list[str], list[str], list, int]:
    """Our dataprep shards, img2dataset-style shards for open_clip and, for the released per-pair pipeline, the
    JPEGs as files with (path, caption) pairs: the same bytes everywhere."""
    import webdataset

    from managertower.data.shards import ShardWriter

    ours_dir, peer_dir, files_dir = (os.path.join(root, name) for name in ("dataprep", "img2dataset", "files"))
    os.makedirs(peer_dir, exist_ok=True)
    os.makedirs(files_dir, exist_ok=True)
    total_bytes = 0
    peer_paths, pairs = [], []
    with ShardWriter(ours_dir, "train", samples_per_shard=per_shard) as writer:
        peer = None
        for i in range(count):
            if i % per_shard == 0:
                if peer is not None:
                    peer.close()
                peer_paths.append(os.path.join(peer_dir, f"{i // per_shard:05d}.tar"))
                peer = webdataset.TarWriter(peer_paths[-1])
            key = f"{i:09d}"
            payload = photo_like_jpeg(i)  # 512 x 384: already at dataprep's max side of 512
            total_bytes += len(payload)
            texts = [f"a photo number {i}, caption {c}" for c in range(captions)]
            writer.write(key, payload, {"key": key, "source": "bench", "split": "train", "image_id": i,
                                        "width": 512, "height": 384, "captions": texts})
            peer.write({"__key__": key, "jpg": payload, "txt": texts[0],
                        "json": json.dumps({"key": key, "caption": texts[0], "status": "success", "width": 512,
                                            "height": 384}).encode()})
            path = os.path.join(files_dir, f"{key}.jpg")
            with open(path, "wb") as handle:
                handle.write(payload)
            pairs.extend((path, text) for text in texts)
        peer.close()
    ours = sorted(os.path.join(ours_dir, f) for f in os.listdir(ours_dir) if f.endswith(".tar"))
    return ours, peer_paths, pairs, total_bytes


def open_clip_loader(paths: list[str], size: int, batch: int, workers: int):
    """open_clip/training/data.py get_wds_dataset (not resampled), with open_clip's own image transform."""
    import webdataset as wds
    from open_clip import image_transform
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    preprocess = image_transform(size, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    pipeline = [
        wds.SimpleShardList(paths),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=1000, initial=500),
        wds.select(lambda s: ("txt" in s) and ("jpg" in s)),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=True),
    ]
    dataset = wds.DataPipeline(*pipeline)
    return wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, persistent_workers=workers > 0)


class PilRandomAugment:
    """ALBEF's RandomAugment(2, 7) on a PIL image, as the released transform applies it (isPIL=True): the ops,
    levels and probabilities of managertower.data.augment.random_augment_ops, drawn from Python's `random` (the
    DataLoader seeds it per worker), applied by torchvision's functional ops to the PIL image."""

    def __init__(self, colour_ops: bool = True):
        self.colour_ops = colour_ops

    def __call__(self, image):
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.autoaugment import _apply_op

        from managertower.data.augment import RANDOM_AUGMENT_FILL, random_augment_ops

        for name, value in random_augment_ops(random.getrandbits(62), self.colour_ops):
            image = _apply_op(image, name, value, interpolation=InterpolationMode.BILINEAR,
                              fill=[int(v) for v in RANDOM_AUGMENT_FILL])
        return image


class ReleasedPairs:
    """The released fine-tuning datasets' shape (e.g. ALBEF/ManagerTower re_train_dataset): one item per
    (image, caption) pair, the image opened and transformed on its own for every pair."""

    def __init__(self, pairs: list, transform):
        self.pairs, self.transform = pairs, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image

        path, caption = self.pairs[index]
        return self.transform(Image.open(path).convert("RGB")), caption


def released_finetune_loader(pairs: list, size: int, batch: int, workers: int):
    import torch
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    from managertower.data.augment import CLIP_MEAN, CLIP_STD, RRC_SCALE

    transform = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=RRC_SCALE, interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        PilRandomAugment(colour_ops=True),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])
    return torch.utils.data.DataLoader(ReleasedPairs(pairs, transform), batch_size=batch, shuffle=True,
                                       num_workers=workers, persistent_workers=workers > 0, drop_last=False)


def _tree_cpu_seconds() -> float:
    """CPU seconds of this process and its living children (DataLoader workers): what a pipeline costs,
    whatever else the machine runs."""
    import psutil

    total = 0.0
    for process in [psutil.Process()] + psutil.Process().children(recursive=True):
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a worker that ended in between
            pass
    return total


class Timed:
    """One pipeline: started (and its first batch taken) once, then timed over rounds of `wanted` images."""

    def __init__(self, make_iter, pixels_of, sync=lambda: None):
        self.make_iter, self.pixels_of, self.sync = make_iter, pixels_of, sync
        self.rates: list[float] = []
        self.cpu_ms: list[float] = []
        start = time.perf_counter()
        self.iterator = make_iter()
        next(self.iterator)  # the first batch pays for start-up; rounds are timed after it
        sync()
        self.first_batch_s = time.perf_counter() - start

    def round(self, wanted: int) -> float:
        """Images per second over the next `wanted` images (a finite pipeline starts its next pass)."""
        cpu, start = _tree_cpu_seconds(), time.perf_counter()
        seen = 0
        while seen < wanted:
            try:
                batch = next(self.iterator)
            except StopIteration:
                self.iterator = self.make_iter()
                continue
            seen += self.pixels_of(batch).shape[0]
        self.sync()
        elapsed = time.perf_counter() - start
        self.rates.append(seen / elapsed)
        self.cpu_ms.append((_tree_cpu_seconds() - cpu) / seen * 1000)
        return self.rates[-1]


def pixel_difference(gpu: dict, cpu: dict) -> tuple[float, float]:
    """(max, mean) |GPU - CPU| of two CLIP-normalised batches of the same images, in 0-255 pixel levels."""
    import torch

    from managertower.data.augment import CLIP_STD

    if gpu["texts"] != cpu["texts"]:
        raise RuntimeError("the GPU and CPU passes put different images in their first batch")
    scale = torch.tensor(CLIP_STD).reshape(1, 3, 1, 1) * 255.0
    levels = (gpu["pixel_values"].float().cpu() - cpu["pixel_values"].float()).abs() * scale
    return float(levels.max()), float(levels.mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=tuple(GOALS), default="pretrain")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: 288 pretrain, 384 finetune)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers per side")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the images per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per pipeline")
    parser.add_argument("--captions", type=int, default=5, help="--mode finetune: examples (captions) per image")
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temp folder)")
    parser.add_argument("--skip-ours-webdataset", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where batches go; cuda adds DALI's GPU decoding and its pixel difference to the CPU's")
    args = parser.parse_args(argv)
    finetune = args.mode == "finetune"
    size = args.size or (384 if finetune else 288)

    import torch

    from managertower.data.loader import LoaderSpec, build_loader

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees "
                     "no usable GPU: run on a GPU machine, or use --device cpu")
    if finetune and args.device == "cuda":
        parser.error("--mode finetune measures the CPU path (augmentation in worker threads); use --device cpu")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.set_num_threads(max(1, args.threads))
    root = args.dir or tempfile.mkdtemp(prefix="bench-loader-")
    started = time.perf_counter()
    captions = args.captions if finetune else 1
    ours, peer, pairs, total_bytes = write_shards(root, args.images, args.per_shard, captions)
    print(f"{args.images} JPEGs 512x384 ({total_bytes / args.images / 1024:.0f} KB mean) in {len(ours)} shards, "
          f"{captions} caption(s) each, written in {time.perf_counter() - started:.1f}s under {root}")
    wanted = int(args.images * captions * args.epochs)

    def ours_loader(backend, device, train=True):
        if finetune:
            return build_loader(LoaderSpec(
                [ours], backend=backend, batch_size=args.batch, image_size=size, rank=0, world_size=1, seed=0,
                expand=lambda meta, rng: [{"text": text} for text in meta["captions"]],
                collate=lambda examples, images: {"texts": [e["text"] for e in examples]},
                train=True, transform="albef_randaug", hflip=True, colour_ops=True, example_pool=256,
                num_threads=args.threads, shuffle_buffer=1000, device=device))
        return build_loader(LoaderSpec(
            [ours], backend=backend, batch_size=args.batch, image_size=size, rank=0, world_size=1, seed=0,
            expand=lambda meta, rng: [{"text": meta["captions"][0]}],
            collate=lambda examples, images: {"texts": [e["text"] for e in examples]},
            train=train, num_threads=args.threads, shuffle_buffer=1000, device=device))

    def ours_iter(backend, device):
        return lambda: iter(ours_loader(backend, device))

    def to_device(pixels):  # the peer's batches go where training would use them
        return pixels.to(args.device, non_blocking=True)

    pipelines, extra = {}, {}
    ours_name = f"ours (dali, {args.device})"
    pipelines[ours_name] = Timed(ours_iter("dali", args.device), lambda b: b["pixel_values"], sync)
    if args.device == "cuda":
        pipelines["ours (dali, cpu)"] = Timed(ours_iter("dali", "cpu"), lambda b: b["pixel_values"])
        loaders = [ours_loader("dali", device, train=False) for device in ("cuda", "cpu")]
        try:
            extra["pixel_max_diff"], extra["pixel_mean_diff"] = pixel_difference(*(next(iter(x)) for x in loaders))
        finally:
            for loader in loaders:
                loader.close()
    if finetune:
        peer_name = "released (PIL + torchvision)"
        peer_loader = released_finetune_loader(pairs, size, args.batch, args.threads)
        pipelines[peer_name] = Timed(lambda: iter(peer_loader), lambda b: b[0])
    else:
        peer_name = "open_clip (webdataset + PIL)"
        peer_loader = open_clip_loader(peer, size, args.batch, args.threads)  # its workers persist across passes
        pipelines[peer_name] = Timed(lambda: iter(peer_loader), lambda b: to_device(b[0]), sync)
    if not args.skip_ours_webdataset:
        pipelines["ours (webdataset + PIL)"] = Timed(ours_iter("webdataset", args.device),
                                                     lambda b: b["pixel_values"], sync)

    ratios = []
    for _ in range(args.rounds):  # alternating: a load change on the machine hits every pipeline alike
        for pipeline in pipelines.values():
            pipeline.round(wanted)
        ratios.append(pipelines[ours_name].rates[-1] / pipelines[peer_name].rates[-1])

    unit = "examples/s" if finetune else "images/s"
    print(f"\n{'pipeline':<32}{unit:>12}{'CPU ms each':>13}{'first batch s':>15}")
    for name, pipeline in pipelines.items():
        print(f"{name:<32}{statistics.median(pipeline.rates):>12.1f}{statistics.median(pipeline.cpu_ms):>13.2f}"
              f"{pipeline.first_batch_s:>15.2f}")
    ratio = statistics.median(ratios)
    cpu_ratio = statistics.median(pipelines[peer_name].cpu_ms) / statistics.median(pipelines[ours_name].cpu_ms)
    label = "DALI" if not finetune else "DALI fine-tuning"
    print(f"\n{label} ({args.device}) / {peer_name.split(' ')[0]}: {ratio:.2f}x (median of {args.rounds} alternating "
          f"rounds: {', '.join(f'{r:.2f}' for r in ratios)}; CPU time {cpu_ratio:.2f}x less)  ({size} px, batch "
          f"{args.batch}, {args.threads} threads/workers, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}; goal >= {GOALS[args.mode]}x)")
    if extra:
        print(f"DALI cuda vs cpu decoding, first batch: max |difference| {extra['pixel_max_diff']:.1f}, mean "
              f"{extra['pixel_mean_diff']:.2f} pixel levels (of 255)")
    return {"ratio": ratio, "cpu_ratio": cpu_ratio,
            **{name: statistics.median(p.rates) for name, p in pipelines.items()}, **extra}


if __name__ == "__main__":
    main()
