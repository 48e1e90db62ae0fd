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
"""
from __future__ import annotations

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
        image = _apply_op(image, name, value, interpolation=InterpolationMode.BILINEAR, fill=RANDOM_AUGMENT_FILL)
    return image


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
