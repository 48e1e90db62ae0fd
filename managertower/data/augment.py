"""Image geometry and augmentation shared by the DALI and the webdataset pipelines.

Both backends compute every random choice here, in Python, from one integer seed per image sample (derived
from the run seed, the rank, the dataset and the sample's position in its stream). The random state therefore
lives in the data position alone: resuming a run at a position reproduces the same crops, flips and
RandAugment ops, and the two backends make the same choices for the same sample.

The transforms, named after the released code's (src/transforms/transform.py), then CLIP mean/std:
  clip           pre-training and its evaluation: resize the shorter side to `size` (bicubic) and take the centre
                 `size x size` crop, exactly as torchvision's `Resize(size) + CenterCrop(size)` place it
                 (released `clip_transform`).
  albef          fine-tuning evaluation: resize the whole image to (size, size), bicubic, no crop (released
                 `albef_transform`; the paper's Table 9: no centre crop).
  albef_randaug  fine-tuning training, per example: RandomResizedCrop(size, scale=(0.5, 1), bicubic), a
                 horizontal flip with p 0.5 (not for VQA: the `_wohf` variant), and ALBEF's RandomAugment(2, 7)
                 (`random_augment` below; the colour ops only in the `_wc` variant, which the released NLVR2,
                 SNLI-VE and retrieval scripts use, not VQA).

RandAugment's ops are torchvision's (`_apply_op` on uint8 tensors, the semantics the released-transform tests
pin). Four of them are computed here instead, bit for bit as torchvision computes them but at a fraction of its
CPU time (tests/unit/data/test_augment_fast_ops.py compares them): Sharpness, Equalize and the affine ops (the
shears, translations and rotation, whose sampling grids are made once per magnitude and size). DALI ships
RandAugment building blocks too (nvidia.dali.auto_aug), but not these semantics (its equalize follows
OpenCV's, its sharpness differs on the border, its random choices come from the pipeline's generator rather
than each example's seed), and on the CPU its kernels were the slower ones (measured on one thread at 384 px:
fn.rotate 7.5 ms, fn.warp_affine 6.7 ms, fn.saturation 4.8 ms, a RandomResizedCrop `fn.resize` 4.7 ms, against
1.5, 1.5, 0.7 and 0.6 ms here); the loader uses DALI for reading and decoding.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRANSFORMS = ("clip", "albef", "albef_randaug")
RRC_SCALE = (0.5, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# ALBEF's RandomAugment(N=2, M=7) as the released src/transforms/randaugment.py defines it: N ops drawn with
# replacement from the list, each applied with probability 0.5, at level M of 10; grey (128) fill.
RANDOM_AUGMENT_OPS = ("Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize", "ShearX", "ShearY",
                      "TranslateX", "TranslateY", "Rotate")
RANDOM_AUGMENT_COLOUR_OPS = ("Solarize", "Color", "Contrast", "Posterize")  # the `_wc` variants only
RANDOM_AUGMENT_N, RANDOM_AUGMENT_LEVEL, RANDOM_AUGMENT_MAX_LEVEL = 2, 7, 10
RANDOM_AUGMENT_P = 0.5
RANDOM_AUGMENT_FILL = [128.0, 128.0, 128.0]


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from a tuple of ints/strings, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Geometry:
    """Where to crop in the source image (pixels, may be fractional) and whether to mirror the result.

    The crop region is resized to `size x size`: the DALI pipeline does it with one `fn.resize` over this ROI,
    the webdataset pipeline with torchvision's Resize+CenterCrop (pre-training) or `resized_crop` (fine-tuning).
    """

    top: float
    left: float
    bottom: float
    right: float
    flip: bool = False


def center_geometry(width: int, height: int, size: int) -> Geometry:
    """torchvision `Resize(size, BICUBIC)` then `CenterCrop(size)`, expressed as a crop of the source image."""
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    top = int(round((new_h - size) / 2.0))  # torchvision's rounding (half to even), not DALI's crop_pos
    left = int(round((new_w - size) / 2.0))
    scale_y, scale_x = height / new_h, width / new_w
    return Geometry(top * scale_y, left * scale_x, (top + size) * scale_y, (left + size) * scale_x)


def random_resized_crop_box(width: int, height: int, rng: random.Random,
                            scale: tuple[float, float] = RRC_SCALE,
                            ratio: tuple[float, float] = RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's `RandomResizedCrop.get_params` with a seeded `random.Random`: (top, left, h, w)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def sample_geometry(width: int, height: int, size: int, transform: str, seed: int, hflip: bool = True) -> Geometry:
    """The crop (and flip) of one image under `transform`; random choices drawn from `seed`."""
    if transform == "clip":
        return center_geometry(width, height, size)
    if transform == "albef":
        return Geometry(0.0, 0.0, float(height), float(width))
    rng = random.Random(mix_seed(seed, "geometry"))
    top, left, crop_h, crop_w = random_resized_crop_box(width, height, rng)
    flip = hflip and rng.random() < 0.5
    return Geometry(float(top), float(left), float(top + crop_h), float(left + crop_w), flip)


def random_augment_ops(seed: int, colour_ops: bool) -> list[tuple[str, float]]:
    """The ops ALBEF's RandomAugment(2, 7) applies to one image, with their signed magnitudes in torchvision's
    units (`_apply_op`): each of the two drawn ops is applied with probability 0.5, and the geometric ones take
    a random sign, as in the released code; enhancement factors are (7 / 10) x 1.8 + 0.1 = 1.36."""
    rng = random.Random(mix_seed(seed, "randaugment"))
    ops = RANDOM_AUGMENT_OPS + (RANDOM_AUGMENT_COLOUR_OPS if colour_ops else ())
    level = RANDOM_AUGMENT_LEVEL / RANDOM_AUGMENT_MAX_LEVEL
    chosen = [ops[rng.randrange(len(ops))] for _ in range(RANDOM_AUGMENT_N)]
    applied = []
    for name in chosen:
        if rng.random() > RANDOM_AUGMENT_P:
            continue
        sign = -1.0 if rng.random() > 0.5 else 1.0
        if name in ("Brightness", "Sharpness", "Color", "Contrast"):
            value = level * 1.8 + 0.1 - 1.0  # torchvision applies factor 1 + value
        elif name in ("ShearX", "ShearY"):
            value = sign * level * 0.3
        elif name in ("TranslateX", "TranslateY"):
            value = sign * level * 10.0  # pixels (the released translate_const)
        elif name == "Rotate":
            value = sign * level * 30.0  # degrees
        elif name == "Solarize":
            value = float(int(level * 256))  # the threshold
        elif name == "Posterize":
            value = float(int(level * 4))  # bits kept
        else:
            value = 0.0
        applied.append((name, value))
    return applied


def random_augment(image: torch.Tensor, seed: int, colour_ops: bool = True) -> torch.Tensor:
    """ALBEF's RandomAugment(2, 7) on a uint8 C x H x W tensor, its choices drawn from `seed` (not from the global
    generators the training loop owns: the same ops on both backends and after a resume)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    for name, value in random_augment_ops(seed, colour_ops):
        if name == "Sharpness":
            image = adjust_sharpness(image, 1.0 + value)
        elif name in AFFINE_OPS:
            image = affine_op(image, name, value)
        elif name == "Equalize" and image.device.type == "cpu":
            image = equalize(image)
        else:
            image = _apply_op(image, name, value, interpolation=InterpolationMode.BILINEAR, fill=RANDOM_AUGMENT_FILL)
    return image


AFFINE_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@functools.lru_cache(maxsize=64)
def _affine_sampling(name: str, value: float, height: int, width: int, device: torch.device
                     ) -> tuple[torch.Tensor, ...]:
    """What torchvision's `_apply_op(name, value)` samples with on an H x W image (bilinear, grey fill), made once
    per op, magnitude and size (a fine-tuning run has ten of them): its affine grid, the fill's mask (the ones
    channel torchvision appends to the image and samples along) and the fill's term (1 - mask) x fill. Made on
    the CPU and moved to `device`: the same sampling positions on every device."""
    from torchvision.transforms import functional as F
    from torchvision.transforms._functional_tensor import _gen_affine_grid

    if name == "Rotate":  # F.rotate about the image centre: the inverse matrix of -angle
        matrix = F._get_inverse_affine_matrix([0.0, 0.0], -value, [0.0, 0.0], 1.0, [0.0, 0.0])
    else:  # F.affine: shears about the top-left corner (center=[0, 0]), translations about the centre
        shear = {"ShearX": [math.degrees(math.atan(value)), 0.0],
                 "ShearY": [0.0, math.degrees(math.atan(value))]}.get(name, [0.0, 0.0])
        translate = {"TranslateX": [1.0 * int(value), 0.0], "TranslateY": [0.0, 1.0 * int(value)]}.get(name, [0.0, 0.0])
        center = [-0.5 * width, -0.5 * height] if name in ("ShearX", "ShearY") else [0.0, 0.0]
        matrix = F._get_inverse_affine_matrix(center, 0.0, translate, 1.0, shear)
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    grid = _gen_affine_grid(theta, w=width, h=height, ow=width, oh=height)
    mask = torch.nn.functional.grid_sample(torch.ones((1, 1, height, width)), grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=False).expand(1, 3, height, width)
    fill = torch.tensor(RANDOM_AUGMENT_FILL, dtype=torch.float32).view(1, 3, 1, 1).expand_as(mask)
    return tuple(t.to(device) for t in (grid, mask, (1.0 - mask) * fill))


def affine_op(image: torch.Tensor, name: str, value: float) -> torch.Tensor:
    """torchvision's `_apply_op` for the shear, translate and rotate ops on a uint8 3 x H x W tensor, bit for bit
    (the same grid, bilinear sampling, mask blend, rounding), with the grid and the fill's mask made once
    (`_affine_sampling`): 3.7 ms per 384 px image on one thread with torchvision against about a third."""
    grid, mask, fill_term = _affine_sampling(name, float(value), image.shape[-2], image.shape[-1], image.device)
    sampled = torch.nn.functional.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros",
                                              align_corners=False)
    return (sampled * mask + fill_term).round_().to(torch.uint8)[0]


def adjust_sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's `adjust_sharpness` on a uint8 C x H x W tensor, bit for bit, without its float conv2d
    (17 ms per 384 px image on one thread here; this takes about a tenth).

    torchvision blurs with the kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 in float32 and rounds; here the sum
    (a separable 3 x 3 box plus 4 x the centre: integers below 2^24, exact in float32) is divided by 13 and
    rounded: sum / 13 is never within 1 / 26 of a rounding tie, far above float32's error, so both give the same
    integer. The border rows and columns keep the original pixels, and the blend is torchvision's own float
    expression (`_blend`: truncated to uint8)."""
    height, width = image.shape[-2:]
    if height <= 2 or width <= 2:
        return image
    degenerate = image.float()
    rows = degenerate[..., :, :-2] + degenerate[..., :, 1:-1] + degenerate[..., :, 2:]
    total = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :] + 4 * degenerate[..., 1:-1, 1:-1]
    degenerate[..., 1:-1, 1:-1] = total.div_(13).round_()
    return (factor * image + (1.0 - factor) * degenerate).clamp(0, 255).to(image.dtype)


def equalize(image: torch.Tensor) -> torch.Tensor:
    """torchvision's `equalize` on a uint8 C x H x W CPU tensor, bit for bit (the same integer histogram
    arithmetic per channel), in numpy: 2.5 ms per 384 px image on one thread with torchvision's int64 gather,
    a fraction of it here."""
    array = image.numpy()
    out = np.empty(array.shape, np.uint8)
    for c, channel in enumerate(array):
        histogram = np.bincount(channel.ravel(), minlength=256)
        step = int(histogram[histogram != 0][:-1].sum()) // 255
        if step == 0:
            out[c] = channel
            continue
        lut = (np.cumsum(histogram) + step // 2) // step
        out[c] = np.concatenate(([0], lut[:-1])).clip(0, 255).astype(np.uint8)[channel]
    return torch.from_numpy(out)


def augment_example(image: torch.Tensor, size: int, seed: int, hflip: bool, colour_ops: bool) -> torch.Tensor:
    """One fine-tuning example's view of a decoded image (uint8 C x H x W, any size): RandomResizedCrop to
    `size`, flip, RandomAugment; uint8 out. Every example of an image gets its own draw, as the released
    per-pair datasets give it (`seed` is the example's)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    geom = sample_geometry(image.shape[-1], image.shape[-2], size, "albef_randaug", seed, hflip)
    crop = TF.resized_crop(image, int(geom.top), int(geom.left), int(geom.bottom - geom.top),
                           int(geom.right - geom.left), [size, size], interpolation=InterpolationMode.BICUBIC,
                           antialias=True)
    if geom.flip:
        crop = TF.horizontal_flip(crop)
    return random_augment(crop, seed, colour_ops)


def resize_image(image: torch.Tensor, size: int, transform: str) -> torch.Tensor:
    """A decoded uint8 C x H x W image (any strides: a channels-last view is the fast case) -> uint8 C x size x
    size under the "clip" or "albef" transform, exactly as torchvision.transforms.v2 computes them on a uint8
    tensor: `Resize(size)` + `CenterCrop(size)`, or `Resize((size, size))`, bicubic with antialiasing (torch's
    uint8 kernel, which like PIL's resampling, the released transform's, rounds between its two passes: the two
    differ by at most a level)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if transform == "albef":
        return TF.resize(image, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)
    if transform != "clip":
        raise ValueError(f"resize_image makes the 'clip' and 'albef' views, not {transform!r}")
    resized = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.center_crop(resized, [size, size])


def normalize_into(out: torch.Tensor, image: torch.Tensor) -> None:
    """uint8 3 x H x W (any strides) -> CLIP-normalised float32 written into `out` (a CPU 3 x H x W row of a
    batch): one pass per image in a worker thread, no batch-sized temporary."""
    array = out.numpy()
    np.subtract(image.numpy(), _MEAN_255, out=array)
    array *= _INV_STD_255


_MEAN_255 = np.array(CLIP_MEAN, np.float32).reshape(3, 1, 1) * 255.0
_INV_STD_255 = 1.0 / (np.array(CLIP_STD, np.float32).reshape(3, 1, 1) * 255.0)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0..255 float) N x 3 x H x W -> float32 CLIP-normalised."""
    if images.device.type == "cpu":
        # numpy on the CPU: torch's threaded elementwise ops on one image cost ~100x more on small machines
        # (measured 25 ms vs 0.04 ms for 3 x 288 x 288 with 2 threads on 2 cores)
        array = images.numpy().astype(np.float32)
        array -= np.array(CLIP_MEAN, np.float32).reshape(1, 3, 1, 1) * 255.0
        array *= 1.0 / (np.array(CLIP_STD, np.float32).reshape(1, 3, 1, 1) * 255.0)
        return torch.from_numpy(array)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - mean) / std
