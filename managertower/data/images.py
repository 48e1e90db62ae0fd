"""Decode, sanitise and re-encode one image for a shard.

Every image that enters a shard is decoded here first, so a shard never holds a member the training
loaders cannot decode. What comes out is always an RGB baseline JPEG (what DALI's and PIL's fast paths
expect), whatever came in: CMYK, grayscale, palette, 16-bit, alpha, EXIF-rotated, or a PNG/WebP/GIF that
only carries a `.jpg` name. What cannot be decoded raises `ImageRejected` with a short reason that the
driver counts in the manifest.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must be rejected, not silently completed with grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90
# PIL's own default (about 89.5 megapixels, a 1024x1024x3 ... x 32 bytes image): above it a small file that
# inflates to gigabytes of pixels is treated as a decompression bomb. We check it ourselves (PIL only
# warns below twice the limit) so the reason is counted instead of crashing a worker.
DEFAULT_MAX_PIXELS = 89_478_485
WHITE = (255, 255, 255)
HIGH_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
# Pixels converted at a time from 16/32-bit grayscale: 2 MB of float64 per temporary.
TILE_PIXELS = 1 << 18
EXIF_ORIENTATION = 0x0112


class ImageRejected(Exception):
    """An image that cannot go into a shard; `reason` is the key counted in the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes live: a whole file, or `size` bytes at `offset` inside one (a tar member)."""

    path: str
    offset: int = 0
    size: int | None = None

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as handle:
                if self.size is None:
                    return handle.read()
                handle.seek(self.offset)
                return handle.read(self.size)
        except FileNotFoundError:
            raise ImageRejected("missing", self.path) from None
        except (IsADirectoryError, PermissionError, OSError) as error:
            raise ImageRejected("unreadable", f"{self.path}: {error}") from None


@dataclass(frozen=True)
class EncodedImage:
    jpeg: bytes
    width: int
    height: int
    original_width: int
    original_height: int


def _high_bit_to_gray(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> 8-bit L with the range rescaled (PIL's convert("L") clips at 255: a white image).

    Converted one tile of at most TILE_PIXELS at a time: a float64 copy of the whole image (the obvious way)
    costs 8 bytes a pixel and several temporaries, 2.3 GB for a 9400x9400 PNG under the pixel limit, times
    the workers. Here the extra memory is the 1-byte result plus a few MB, and the pixels are the same.
    """
    top = 65535.0 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255.0
    gray = Image.new("L", image.size)
    tile_width = min(image.width, TILE_PIXELS)
    tile_height = max(1, TILE_PIXELS // tile_width)
    for top_row in range(0, image.height, tile_height):
        for left in range(0, image.width, tile_width):
            box = (left, top_row, min(left + tile_width, image.width), min(top_row + tile_height, image.height))
            pixels = np.asarray(image.crop(box), dtype=np.float64)
            tile = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
            gray.paste(Image.fromarray(tile, "L"), box[:2])
    return gray


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white (what a viewer shows).

    16/32-bit grayscale comes back as 8-bit L: the caller downsizes it before the RGB copy (4 bytes a pixel
    in PIL) so a large 16-bit image never exists as full-size RGB."""
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_BIT_GRAY_MODES:
        return _high_bit_to_gray(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # CMYK (PIL undoes Adobe's inverted CMYK itself), L, 1, P, YCbCr, LAB, HSV.
    return image.convert("RGB")


def _is_clean_baseline_jpeg(image: Image.Image) -> bool:
    """True when the original bytes can go into the shard unchanged: RGB baseline JPEG, no rotation."""
    return (image.format == "JPEG" and image.mode == "RGB"
            and not image.info.get("progressive") and not image.info.get("progression")
            and image.getexif().get(EXIF_ORIENTATION, 1) == 1)


def sanitize_image(data: bytes, max_side: int | None = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> EncodedImage:
    """Decode `data` fully and return an RGB baseline JPEG whose longer side is at most `max_side`.

    A clean baseline RGB JPEG that is already small enough keeps its original bytes (no second lossy
    encoding); everything else is re-encoded at `quality`. Raises ImageRejected(reason) with reason one of
    empty, decompression_bomb, truncated, undecodable.
    """
    if not data:
        raise ImageRejected("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBombWarning, EXIF and palette warnings
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRejected("decompression_bomb", f"{width}x{height} pixels")
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated GIF/WebP/PNG: the first frame
            keep_bytes = _is_clean_baseline_jpeg(image) and (max_side is None or max(width, height) <= max_side)
            if image.format == "JPEG" and max_side is not None and not keep_bytes:
                # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much smaller: the
                # largest saving of the whole pipeline for big photos. draft() never goes below the request.
                image.draft("RGB" if image.mode == "RGB" else None, (max_side, max_side))
            image.load()
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise ImageRejected("decompression_bomb", str(error)) from None
    except UnidentifiedImageError as error:
        raise ImageRejected("undecodable", str(error)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as error:
        message = str(error)
        reason = "truncated" if "truncated" in message or isinstance(error, EOFError) else "undecodable"
        raise ImageRejected(reason, message) from None

    if keep_bytes:
        return EncodedImage(data, width, height, width, height)
    if orientation != 1:  # without one, exif_transpose returns a full-size copy: memory for nothing
        try:
            image = ImageOps.exif_transpose(image)
        except Exception:  # a malformed EXIF block must not lose an otherwise good image
            pass
    image = _to_rgb(image)
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        target = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if image.mode != "RGB":  # the gray of a 16-bit image, after downsizing
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False)
    # original_* is the upright size before downsizing: region boxes are rescaled with it.
    if orientation in (5, 6, 7, 8):  # these EXIF orientations swap the axes
        width, height = height, width
    return EncodedImage(buffer.getvalue(), image.width, image.height, width, height)


def load_image(source: ImageSource, max_side: int | None = DEFAULT_MAX_SIDE,
               quality: int = DEFAULT_QUALITY) -> EncodedImage:
    """Read and sanitise one image; every failure is an ImageRejected with a countable reason."""
    return sanitize_image(source.read(), max_side=max_side, quality=quality)
