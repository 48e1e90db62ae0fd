"""The loaders apply the released fine-tuning transforms (LooperXX/ManagerTower, src/transforms/transform.py)."""
import io
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from managertower.data.augment import normalize
from managertower.data.collate import expand_pretrain
from managertower.data.loader import LoaderSpec, build_loader
from managertower.data.shards import ShardWriter, expand_shards

SIZE = 48


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Three 96 x 48 images (2:1), each with three captions; the left and right quarters are red and blue."""
    folder = tmp_path_factory.mktemp("wide")
    images = []
    with ShardWriter(folder, "train", samples_per_shard=10) as writer:
        for i in range(3):
            array = np.zeros((48, 96, 3), np.uint8)
            array[:, :24] = (220, 20, 20)
            array[:, 24:72] = 30 + 60 * i
            array[:, 72:] = (20, 20, 220)
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, "JPEG", quality=95)
            images.append(buffer.getvalue())
            meta = {"key": f"w{i}", "source": "t", "split": "train", "image_id": i, "width": 96, "height": 48,
                    "captions": [f"picture {i} caption {c}" for c in range(3)]}
            writer.write(f"w{i}", buffer.getvalue(), meta)
    return expand_shards(str(folder)), images


def _batch(shards, backend, transform, **kwargs):
    spec = LoaderSpec([shards], expand=partial(expand_pretrain, per_caption=True), collate=lambda e, i: {},
                      batch_size=9, image_size=SIZE, backend=backend, transform=transform, train=False,
                      num_threads=1, device="cpu", **kwargs)
    loader = build_loader(spec)
    try:
        return next(iter(loader))["pixel_values"]
    finally:
        loader.close()


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_released_eval_transform_keeps_the_whole_image(wide, backend):
    """transform.py `albef_transform` (lines 100-106): Resize((s, s), BICUBIC) of the whole image, so the red
    and blue quarters a centre crop (`clip_transform`, lines 81-88) cuts away stay in view."""
    shards, images = wide
    pixels = _batch(shards, backend, "albef")
    assert pixels.shape == (9, 3, SIZE, SIZE)
    with Image.open(io.BytesIO(images[0])) as opened:
        expected = np.asarray(opened.convert("RGB").resize((SIZE, SIZE), Image.BICUBIC)).transpose(2, 0, 1)
    expected = normalize(torch.from_numpy(expected.copy())[None])[0]
    assert (pixels[0] - expected).abs().mean() < 0.05  # decoders and resamplers differ by a little
    red_left = pixels[0, 0, :, :4].mean() - pixels[0, 2, :, :4].mean()
    assert red_left > 2.0  # normalised red minus blue in the leftmost columns
    cropped = _batch(shards, backend, "clip")
    assert abs(cropped[0, 0, :, :4].mean() - cropped[0, 2, :, :4].mean()) < 0.5  # the centre crop lost it


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_released_augmentation_per_example(wide, backend):
    """The released per-pair datasets augment every (image, text) example on its own: an image's three
    captions get three different crops (decoded once), and the evaluation transform gives them one view."""
    shards, _ = wide
    augmented = _batch(shards, backend, "albef_randaug")
    for first in (0, 3, 6):
        rows = {augmented[first + j].numpy().tobytes() for j in range(3)}
        assert len(rows) == 3
    plain = _batch(shards, backend, "albef")
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[1], plain[2])
