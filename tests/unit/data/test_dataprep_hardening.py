"""dataprep on hostile input: 16-bit images in bounded memory with the same pixels as before, values that
make no sense refused before anything starts, and malformed annotations as one line naming file and line."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import managertower.data.images as images
from dataprep.__main__ import main
from managertower.data.formats import DataprepError
from managertower.data.images import sanitize_image
from managertower.data.prep import PrepSettings, prepare

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_door(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err


def write_coco(root, count: int = 3) -> str:
    os.makedirs(os.path.join(root, "train2014"), exist_ok=True)
    records = []
    for index in range(count):
        filename = f"COCO_train2014_{index:012d}.jpg"
        Image.new("RGB", (40, 30), (200, 30, 30)).save(os.path.join(root, "train2014", filename))
        records.append({"filepath": "train2014", "filename": filename, "cocoid": index, "split": "train",
                        "sentences": [{"raw": f"a red picture {index}"}]})
    with open(os.path.join(root, "dataset_coco.json"), "w") as handle:
        json.dump({"images": records}, handle)
    return str(root)


# -- 4. 16-bit images: bounded memory, the same pixels -------------------------------------------------

def gray16_png(width: int, height: int) -> bytes:
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(1, width - 1)).astype("<u2")
    pixels = np.ascontiguousarray(np.broadcast_to(ramp, (height, width)))
    buffer = io.BytesIO()
    Image.frombytes("I;16", (width, height), pixels.tobytes()).save(buffer, "PNG")
    return buffer.getvalue()


PEAK_SCRIPT = """
import resource, sys
from managertower.data.images import sanitize_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = sanitize_image(data, max_side=512)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(after - before, result.width, result.height)
"""


def test_a_large_16_bit_png_is_converted_in_bounded_memory(tmp_path):
    """The bound: PIL's decoded 16-bit image (2 bytes a pixel, unavoidable) plus the 8-bit gray result (1 byte
    a pixel) plus 32 MB for the tiles' temporaries, the downsized copy and the allocator's slack. The old
    float64 conversion of the whole image needed about 27 bytes a pixel (243 MB here; 2.3 GB at 9400x9400)."""
    side = 3000
    path = tmp_path / "gray16.png"
    path.write_bytes(gray16_png(side, side))
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    peak_kb, width, height = map(int, run.stdout.split())
    bound_kb = (3 * side * side + (32 << 20)) // 1024
    assert (width, height) == (512, 512)
    assert peak_kb < bound_kb, f"peak {peak_kb // 1024} MB over the bound {bound_kb // 1024} MB"


def old_high_bit_conversion(data: bytes, max_side: int | None, quality: int = 90) -> bytes:
    """What the sanitiser did before: the whole image as float64, rescaled, RGB, then downsized."""
    image = Image.open(io.BytesIO(data))
    image.load()
    pixels = np.asarray(image, dtype=np.float64)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
    gray = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(gray, "L").convert("RGB")
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def encoded(mode: str, pixels: np.ndarray, fmt: str) -> bytes:
    height, width = pixels.shape
    if mode == "I;16":
        image = Image.frombytes("I;16", (width, height), pixels.astype("<u2").tobytes())
    else:
        image = Image.fromarray(pixels.astype(np.int32 if mode == "I" else np.float32), mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt, low, high, size, max_side", [
    ("I;16", "PNG", 0, 65536, (37, 23), 512),        # kept size
    ("I;16", "PNG", 0, 65536, (130, 90), 64),        # downsized
    ("I", "TIFF", -300, 70000, (61, 40), 32),         # 32-bit, out of range both ways
    ("I", "TIFF", 0, 256, (45, 33), None),            # 32-bit holding 8-bit values: not rescaled
    ("F", "TIFF", -10.0, 300.0, (52, 31), 40),        # float
])
def test_16_and_32_bit_gray_gives_the_same_pixels_as_the_old_conversion(monkeypatch, mode, fmt, low, high, size,
                                                                         max_side):
    rng = np.random.default_rng(0)
    width, height = size
    values = rng.uniform(low, high, (height, width)) if mode == "F" else rng.integers(low, high, (height, width))
    data = encoded(mode, values, fmt)
    monkeypatch.setattr(images, "TILE_PIXELS", 50)  # many tiles, split across rows and columns
    assert sanitize_image(data, max_side=max_side).jpeg == old_high_bit_conversion(data, max_side)


# -- 6. values refused before anything starts ----------------------------------------------------------

@pytest.mark.parametrize("flag, value, named", [
    ("--max-image-side", "-5", "--max-image-side"),
    ("--quality", "1000", "--quality"),
    ("--quality", "0", "--quality"),
    ("--samples-per-shard", "0", "--samples-per-shard"),
    ("--workers", "-1", "--workers"),
    ("--workers", "0", "--workers"),
    ("--part", "2/2", "--part"),
])
def test_senseless_values_are_one_line_errors_before_anything_starts(tmp_path, capsys, flag, value, named):
    root = write_coco(tmp_path / "coco")
    out = tmp_path / "out"
    code, err = run_door(capsys, "coco", "--root", root, "--out", out, "--quiet", flag, value)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err and value in err
    assert not out.exists()


@pytest.mark.parametrize("settings", [
    dict(max_image_side=-5), dict(quality=1000), dict(quality=2.5), dict(samples_per_shard=0),
    dict(samples_per_shard=True), dict(workers=-1), dict(seed="7"), dict(part=(1, 1)), dict(part="x"),
])
def test_the_library_checks_the_same_values(tmp_path, settings):
    with pytest.raises(DataprepError):
        PrepSettings(**settings)
    with pytest.raises(DataprepError):  # before the (missing) annotations are even looked at
        prepare("coco", tmp_path / "nowhere", tmp_path / "out", progress=False, summary=False, **settings)
    assert not (tmp_path / "out").exists()


def test_sensible_values_pass_and_zero_keeps_the_image_size():
    assert PrepSettings(max_image_side=0).max_image_side is None
    assert PrepSettings(quality=100, workers=3, part="1/4").part == (1, 4)
