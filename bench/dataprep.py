"""Sharding throughput against the disk ceiling: `python -m dataprep` vs `tar` of the same files.

    .venv/bin/python bench/dataprep.py [--images 300] [--workers 1 2]

Writes ~300 photo-like JPEGs (640x480, smooth gradients + shapes + sensor noise, so they compress like
photos: ~60-100 KB each) in the real CC3M raw layout (TSV + images/<row>.jpg), then times:
  tar          `tar -cf` of the image folder: reading and writing the same bytes, no decoding (the ceiling)
  dataprep     the cc3m reader at each worker count, default --max-image-side 512 (decode, resize, re-encode)
  dataprep/pass --max-image-side 0: images already baseline RGB JPEGs are decoded to check them and then
               copied unchanged (what small, clean web images cost)
Prints images/s, input MB/s and the ratio to tar, and the speed-up a pure CPU loop gets from the same
number of processes on this machine (the most more workers can give here). The page cache is warm for every contender (each reads
the images once before timing), so the ratio measures CPU cost, not the disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from managertower.data.prep import prepare  # noqa: E402


def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rng.uniform(40, 200) + rng.uniform(-60, 60) * np.sin(x / rng.uniform(80, 300) + c)
                     * np.cos(y / rng.uniform(80, 300)) for c in range(3)], axis=2)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 10)):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        box = (x0, y0, x0 + rng.integers(20, 250), y0 + rng.integers(20, 200))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))  # sensor noise
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_raw(root: str, count: int) -> int:
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    with open(os.path.join(root, "Train_GCC-training.tsv"), "w") as tsv:
        for row in range(count):
            photo_like(rng).save(os.path.join(root, "images", f"{row}.jpg"), quality=90)
            tsv.write(f"a synthetic photo number {row}\thttp://example.com/{row}.jpg\n")
    return sum(os.path.getsize(os.path.join(root, "images", name)) for name in os.listdir(os.path.join(root, "images")))


def _spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i * i
    return total


def parallel_ceiling(workers: int, iterations: int = 3_000_000) -> float:
    """How much faster `workers` processes finish `workers` equal CPU jobs than one process does one job
    x workers: 1.0 on a machine whose cores are shared or throttled, ~workers on real cores."""
    from concurrent.futures import ProcessPoolExecutor

    one = timed(lambda: [_spin(iterations) for _ in range(workers)])
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(_spin, 1).result()
        many = timed(lambda: list(pool.map(_spin, [iterations] * workers)))
    return one / many


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_dataprep_")
    try:
        raw = os.path.join(work, "raw")
        input_bytes = write_raw(raw, args.images)
        megabytes = input_bytes / 1e6
        print(f"{args.images} JPEGs 640x480, {megabytes:.1f} MB ({input_bytes / args.images / 1e3:.0f} KB each), "
              f"{os.cpu_count()} CPUs")
        subprocess.run(["tar", "-cf", os.devnull, "-C", raw, "images"], check=True)  # warm the page cache

        rows = []
        tar_out = os.path.join(work, "images.tar")
        seconds = timed(lambda: subprocess.run(["tar", "-cf", tar_out, "-C", raw, "images"], check=True))
        rows.append(("tar (disk ceiling)", seconds))
        for workers in args.workers:
            for label, side in (("dataprep", 512), ("dataprep/pass", 0)):
                out = os.path.join(work, f"out_{label.replace('/', '_')}_{workers}")
                seconds = timed(lambda: prepare("cc3m", raw, out, workers=workers, samples_per_shard=50,
                                                max_image_side=side, progress=False, summary=False))
                rows.append((f"{label} {workers} worker{'s' if workers > 1 else ''}", seconds))
                shutil.rmtree(out)
        tar_seconds = rows[0][1]
        for workers in args.workers:
            if workers > 1:
                print(f"machine parallel ceiling at {workers} processes (pure CPU loop): "
                      f"{parallel_ceiling(workers):.2f}x")
        print(f"{'contender':28s} {'seconds':>8s} {'images/s':>9s} {'MB/s':>7s} {'vs tar':>7s}")
        for label, seconds in rows:
            print(f"{label:28s} {seconds:8.2f} {args.images / seconds:9.0f} {megabytes / seconds:7.1f} "
                  f"{tar_seconds / seconds:7.3f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
