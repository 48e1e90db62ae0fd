"""Image loading throughput: this project's DALI loader against open_clip's webdataset + PIL pipeline.

    python bench/loader.py                      # 400 photo-like 512x384 JPEGs, 288 px, 2 threads / 2 workers
    python bench/loader.py --images 2000 --threads 8 --batch 64
    python bench/loader.py --device cuda --images 512 --threads 8     # + DALI's GPU ("mixed") decoding

Both sides read the same JPEG bytes from local tar shards and produce float32 B x 3 x 288 x 288 batches,
CLIP-normalised, on the CPU (with --device cuda: on the GPU, every side's batches moved there as training
would; ours decodes there):
  ours (dali):        build_loader(LoaderSpec(backend="dali")): fn.readers.webdataset -> fn.decoders.image_slice
                      -> fn.resize (ROI, bicubic) -> fn.crop_mirror_normalize, shards as dataprep writes them
                      (KEY.jpg + KEY.json, .idx).
  peer (open_clip):   open_clip's training pipeline (open_clip/training/data.py get_wds_dataset, replicated here
                      since open_clip.training is not installed): SimpleShardList -> split_by_worker ->
                      tarfile_to_samples -> shuffle -> decode("pilrgb") -> open_clip.image_transform (Resize +
                      CenterCrop bicubic, ToTensor, Normalize) -> batched, through a WebLoader with N workers, over
                      img2dataset-style shards (KEY.jpg + KEY.txt + KEY.json).
  ours (webdataset):  build_loader(LoaderSpec(backend="webdataset")), for reference.
  ours (dali, cuda):  --device cuda only: the same DALI pipeline with device="mixed" decoding (nvJPEG), resize and
                      normalisation on the GPU; its first batch of an ordered pass is compared with the CPU path's
                      (max and mean |difference| in 0-255 pixel levels: the two JPEG decoders round differently).
Text is passed through untokenised on every side: this measures image loading. The figure is images/s over
`--epochs` passes after one warm-up batch (with CUDA synchronised before the clock is read). Printed: a table and
the DALI / open_clip ratio (the goal is >= 2).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def write_shards(root: str, count: int, per_shard: int) -> tuple[list[str], list[str], int]:
    import webdataset

    from managertower.data.shards import ShardWriter

    ours_dir, peer_dir = os.path.join(root, "dataprep"), os.path.join(root, "img2dataset")
    os.makedirs(peer_dir, exist_ok=True)
    total_bytes = 0
    peer_paths = []
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
            caption = f"a photo number {i}"
            writer.write(key, payload, {"key": key, "source": "bench", "split": "train", "image_id": i,
                                        "width": 512, "height": 384, "captions": [caption]})
            peer.write({"__key__": key, "jpg": payload, "txt": caption,
                        "json": json.dumps({"key": key, "caption": caption, "status": "success", "width": 512,
                                            "height": 384}).encode()})
        peer.close()
    ours = sorted(os.path.join(ours_dir, f) for f in os.listdir(ours_dir) if f.endswith(".tar"))
    return ours, peer_paths, total_bytes


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


def images_per_second(make_iter, images_wanted: int, pixels_of, sync=lambda: None) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch); `sync` waits for queued GPU work."""
    start = time.perf_counter()
    iterator = make_iter()
    next(iterator)  # the first batch pays for start-up; timing starts after it
    sync()
    warm = time.perf_counter()
    seen = 0
    while seen < images_wanted:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = make_iter()
            continue
        seen += pixels_of(batch).shape[0]
    sync()
    return seen / (time.perf_counter() - warm), warm - start


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
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=288)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers per side")
    parser.add_argument("--epochs", type=float, default=3.0, help="passes over the images to time")
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temp folder)")
    parser.add_argument("--skip-ours-webdataset", action="store_true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where batches go; cuda adds DALI's GPU decoding and its pixel difference to the CPU's")
    args = parser.parse_args(argv)

    import torch

    from managertower.data.loader import LoaderSpec, build_loader

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda, but torch {torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees "
                     "no usable GPU: run on a GPU machine, or use --device cpu")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    torch.set_num_threads(max(1, args.threads))
    root = args.dir or tempfile.mkdtemp(prefix="bench-loader-")
    started = time.perf_counter()
    ours, peer, total_bytes = write_shards(root, args.images, args.per_shard)
    print(f"{args.images} JPEGs 512x384 ({total_bytes / args.images / 1024:.0f} KB mean) in {len(ours)} shards, "
          f"written in {time.perf_counter() - started:.1f}s under {root}")
    wanted = int(args.images * args.epochs)

    def ours_loader(backend, device, train=True):
        return build_loader(LoaderSpec(
            [ours], backend=backend, batch_size=args.batch, image_size=args.size, rank=0, world_size=1, seed=0,
            expand=lambda meta, rng: [{"text": meta["captions"][0]}],
            collate=lambda examples, images: {"texts": [e["text"] for e in examples]},
            train=train, num_threads=args.threads, shuffle_buffer=1000, device=device))

    def ours_iter(backend, device):
        return lambda: iter(ours_loader(backend, device))

    def to_device(pixels):  # the peer's batches go where training would use them
        return pixels.to(args.device, non_blocking=True)

    results, extra = {}, {}
    results["ours (dali, cpu)"] = images_per_second(ours_iter("dali", "cpu"), wanted, lambda b: b["pixel_values"])
    if args.device == "cuda":
        results["ours (dali, cuda)"] = images_per_second(ours_iter("dali", "cuda"), wanted,
                                                         lambda b: b["pixel_values"], sync)
        loaders = [ours_loader("dali", device, train=False) for device in ("cuda", "cpu")]
        try:
            extra["pixel_max_diff"], extra["pixel_mean_diff"] = pixel_difference(*(next(iter(x)) for x in loaders))
        finally:
            for loader in loaders:
                loader.close()
    results["open_clip (webdataset + PIL)"] = images_per_second(
        lambda: iter(open_clip_loader(peer, args.size, args.batch, args.threads)), wanted, lambda b: to_device(b[0]),
        sync)
    if not args.skip_ours_webdataset:
        results["ours (webdataset + PIL)"] = images_per_second(ours_iter("webdataset", args.device), wanted,
                                                               lambda b: b["pixel_values"], sync)

    print(f"\n{'pipeline':<32}{'images/s':>10}{'first batch s':>15}")
    for name, (rate, first) in results.items():
        print(f"{name:<32}{rate:>10.1f}{first:>15.2f}")
    ratio = results[f"ours (dali, {args.device})"][0] / results["open_clip (webdataset + PIL)"][0]
    print(f"\nDALI ({args.device}) / open_clip: {ratio:.2f}x  ({args.size} px, batch {args.batch}, {args.threads} "
          f"threads/workers, {os.cpu_count()} cores; goal >= 2x)")
    if extra:
        print(f"DALI cuda vs cpu decoding, first batch: max |difference| {extra['pixel_max_diff']:.1f}, mean "
              f"{extra['pixel_mean_diff']:.2f} pixel levels (of 255)")
    return {"ratio": ratio, **{k: v[0] for k, v in results.items()}, **extra}


if __name__ == "__main__":
    main()
