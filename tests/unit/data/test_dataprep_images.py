"""Every kind of bad or odd image: converted to an RGB baseline JPEG, or rejected with a counted reason."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from managertower.data.images import ImageRejected, ImageSource, load_image, sanitize_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def decoded(jpeg: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    assert not image.info.get("progressive") and not image.info.get("progression")  # baseline
    image.load()
    return image


def mean_rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(decoded(jpeg), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def red_image(size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, (200, 30, 30))


def test_clean_small_baseline_jpeg_keeps_its_bytes():
    original = encode(red_image(), "JPEG", quality=90)
    result = sanitize_image(original, max_side=512)
    assert result.jpeg == original and (result.width, result.height) == (40, 30)


def test_cmyk_jpeg_becomes_rgb_with_the_same_colour():
    result = sanitize_image(encode(red_image().convert("CMYK"), "JPEG", quality=95))
    assert np.allclose(mean_rgb(result.jpeg), (200, 30, 30), atol=12)


def test_grayscale_becomes_rgb():
    result = sanitize_image(encode(Image.new("L", (32, 32), 77), "JPEG"))
    assert np.allclose(mean_rgb(result.jpeg), (77, 77, 77), atol=3)


def test_palette_png_with_transparency_becomes_rgb_on_white():
    image = Image.new("P", (32, 32), 0)
    image.putpalette([10, 200, 10] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    result = sanitize_image(encode(image, "PNG", transparency=0))
    assert np.allclose(mean_rgb(result.jpeg), (255, 255, 255), atol=3)  # fully transparent -> white


def test_palette_png_becomes_rgb():
    result = sanitize_image(encode(red_image().convert("P"), "PNG"))
    assert np.allclose(mean_rgb(result.jpeg), (200, 30, 30), atol=12)


def test_16_bit_grayscale_png_is_rescaled_not_clipped():
    pixels = np.full((24, 24), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    source = encode(Image.fromarray(pixels), "PNG")
    assert Image.open(io.BytesIO(source)).mode.startswith("I")
    assert np.allclose(mean_rgb(sanitize_image(source).jpeg), (128, 128, 128), atol=3)


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (0, 0, 255, 128))  # half-transparent blue
    assert np.allclose(mean_rgb(sanitize_image(encode(image, "PNG")).jpeg), (127, 127, 255), atol=6)


def test_exif_rotation_is_applied_to_the_pixels():
    # 60x20: left half red, right half blue; orientation 6 means "rotate 90 clockwise to view".
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    image.paste((0, 0, 255), (30, 0, 60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    result = sanitize_image(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    upright = np.asarray(decoded(result.jpeg), dtype=np.int32)
    assert upright.shape[:2] == (60, 20)  # now 20 wide, 60 tall
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 60   # top: what was the left (red)
    assert upright[55, 10, 2] > 200 and upright[55, 10, 0] < 60  # bottom: what was the right (blue)
    assert (result.original_width, result.original_height) == (20, 60)
    assert Image.open(io.BytesIO(result.jpeg)).getexif().get(0x0112, 1) == 1  # no second rotation later


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_other_formats_named_jpg_become_jpeg(tmp_path, fmt):
    path = tmp_path / "photo.jpg"
    path.write_bytes(encode(red_image(), fmt))
    result = load_image(ImageSource(str(path)))
    assert Image.open(io.BytesIO(result.jpeg)).format == "JPEG"
    assert np.allclose(mean_rgb(result.jpeg), (200, 30, 30), atol=20)


def test_animated_gif_keeps_the_first_frame():
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((250, 0, 0), (0, 250, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    assert mean_rgb(sanitize_image(buffer.getvalue()).jpeg)[0] > 200


def test_progressive_jpeg_is_reencoded_as_baseline():
    source = encode(red_image(), "JPEG", progressive=True)
    result = sanitize_image(source)
    assert result.jpeg != source
    decoded(result.jpeg)


def test_large_image_is_downsized_keeping_the_aspect():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8))
    result = sanitize_image(encode(big, "JPEG"), max_side=300)
    assert (result.width, result.height) == (300, 225) and decoded(result.jpeg).size == (300, 225)
    assert (result.original_width, result.original_height) == (1200, 900)
    assert sanitize_image(encode(big, "JPEG"), max_side=None).width == 1200


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height zero pixels: a few KB on disk, gigapixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    raw = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


@pytest.mark.parametrize("payload, reason", [
    (b"", "empty"),
    (b"this is not an image at all" * 20, "undecodable"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "undecodable"),
])
def test_bad_bytes_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(ImageRejected) as caught:
        sanitize_image(payload)
    assert caught.value.reason == reason


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_images_are_rejected(fmt):
    noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    with pytest.raises(ImageRejected) as caught:
        sanitize_image(data[: len(data) // 2])
    assert caught.value.reason == "truncated"


def test_decompression_bomb_is_rejected_before_decoding():
    bomb = _png_bomb(20_000, 20_000)  # 400 megapixels in about 50 KB
    assert len(bomb) < 200_000
    with pytest.raises(ImageRejected) as caught:
        sanitize_image(bomb)
    assert caught.value.reason == "decompression_bomb"


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ImageRejected) as caught:
        load_image(ImageSource(str(tmp_path / "nope.jpg")))
    assert caught.value.reason == "missing"
    with pytest.raises(ImageRejected) as caught:
        load_image(ImageSource(str(tmp_path)))  # a folder where a file should be
    assert caught.value.reason == "unreadable"


def test_reading_a_member_by_offset(tmp_path):
    jpeg = encode(red_image(), "JPEG")
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100 + jpeg + b"y" * 50)
    assert load_image(ImageSource(str(path), offset=100, size=len(jpeg))).jpeg == jpeg
