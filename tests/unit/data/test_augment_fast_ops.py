"""The loader's fast image ops compute exactly what the torchvision / PIL calls they replace compute."""
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2
from torchvision.transforms.autoaugment import _apply_op

from managertower.data.augment import (AFFINE_OPS, RANDOM_AUGMENT_FILL, adjust_sharpness, affine_op, equalize,
                                       normalize, normalize_into, random_augment, random_augment_ops, resize_image)
from managertower.data.dali import jpeg_size
from managertower.data.workers import ImageWorkers


def _images():
    """Noise, a hard black/white pattern and a channels-last view (what the DALI decoder hands out), odd sizes."""
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 96, 96), (3, 41, 67)):
        noise = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        yield noise
        yield (noise > 127).to(torch.uint8) * 255
        yield noise.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def test_sharpness_matches_torchvision_bit_for_bit():
    for image in _images():
        for factor in (1.36, 0.64, 0.0, 2.0):
            assert torch.equal(adjust_sharpness(image, factor), F.adjust_sharpness(image, factor))
    tiny = torch.full((3, 2, 5), 7, dtype=torch.uint8)
    assert torch.equal(adjust_sharpness(tiny, 1.36), tiny)


def test_equalize_matches_torchvision_bit_for_bit():
    flat = torch.full((3, 9, 9), 77, dtype=torch.uint8)  # one grey level: torchvision's step 0, left as it is
    for image in list(_images()) + [flat, next(_images()) // 64 * 10]:
        assert torch.equal(equalize(image), F.equalize(image))


@pytest.mark.parametrize("name", AFFINE_OPS)
def test_affine_ops_match_torchvision_bit_for_bit(name):
    """Same grid, bilinear sampling, grey fill and rounding as torchvision's `_apply_op` (both signs)."""
    magnitude = {"ShearX": 0.21, "ShearY": 0.21, "TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}[name]
    for image in _images():
        for value in (magnitude, -magnitude):
            expected = _apply_op(image, name, value, interpolation=InterpolationMode.BILINEAR,
                                 fill=RANDOM_AUGMENT_FILL)
            assert torch.equal(affine_op(image, name, value), expected), (name, value, tuple(image.shape))


def test_random_augment_matches_torchvision_ops():
    """Over many seeds (every op, both variants), `random_augment` equals torchvision's `_apply_op` chain."""
    image = next(_images())
    for seed in range(120):
        expected = image
        for name, value in random_augment_ops(seed, True):
            expected = _apply_op(expected, name, value, interpolation=InterpolationMode.BILINEAR,
                                 fill=RANDOM_AUGMENT_FILL)
        assert torch.equal(random_augment(image, seed, colour_ops=True), expected), seed


@pytest.mark.parametrize("transform", ["clip", "albef"])
def test_resize_image_is_torchvision_resize(transform):
    """torchvision.transforms.v2's Resize (+ CenterCrop) on the uint8 tensor exactly, and the released
    transform's calls on a PIL image (torchvision on PIL: PIL's resampling) within a level."""
    for image in _images():
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        views = []
        for functional, source in ((F2, image), (F, pil)):
            if transform == "clip":
                resized = functional.resize(source, 32, InterpolationMode.BICUBIC, antialias=True)
                views.append(functional.center_crop(resized, [32, 32]))
            else:
                views.append(functional.resize(source, [32, 32], InterpolationMode.BICUBIC, antialias=True))
        out = resize_image(image, 32, transform)
        assert out.shape == (3, 32, 32) and torch.equal(out, views[0])
        released = torch.from_numpy(np.array(views[1])).permute(2, 0, 1)
        assert (out.int() - released.int()).abs().max() <= 1
    with pytest.raises(ValueError, match="albef_randaug"):
        resize_image(image, 32, "albef_randaug")


def test_normalize_into_equals_normalize():
    for image in _images():
        out = torch.empty(image.shape, dtype=torch.float32)
        normalize_into(out, image)
        assert torch.equal(out, normalize(image.contiguous()[None])[0])


def test_jpeg_size_reads_the_frame_header_and_refuses_the_rest():
    rng = np.random.default_rng(0)
    for width, height in ((512, 384), (1, 1), (3000, 17)):
        for options in ({}, {"progressive": True}, {"subsampling": 0}, {"exif": b"Exif\x00\x00" + bytes(64)}):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", **options)
            assert jpeg_size(buffer.getvalue()) == (width, height)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, "PNG")
    for bad, reason in ((b"this is not a jpeg" * 20, "start-of-image"), (png.getvalue(), "start-of-image"),
                        (b"\xff\xd8\xff\xda\x00\x02", "frame header"), (b"\xff\xd8", "frame header")):
        with pytest.raises(ValueError, match=reason):
            jpeg_size(bad)


def test_image_workers_leave_the_callers_torch_threads_alone():
    """The pool's threads run torch with one thread; the caller and threads started later keep the default."""
    before = torch.get_num_threads()
    workers = ImageWorkers(2)
    try:
        inside = workers.map(lambda _: torch.get_num_threads(), range(8))
    finally:
        workers.close()
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert inside == [1] * 8
    assert torch.get_num_threads() == before and later == [before]
