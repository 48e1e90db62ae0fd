"""The fine-tuning transforms match the authors' released ones (LooperXX/ManagerTower, src/transforms)."""
from collections import Counter

import numpy as np
import pytest
import torch

from managertower.data.augment import (RANDOM_AUGMENT_COLOUR_OPS, RANDOM_AUGMENT_OPS, augment_example, random_augment,
                                       random_augment_ops, sample_geometry)

SEEDS = range(4000)


def test_released_random_augment_op_set_and_probabilities():
    """src/transforms/randaugment.py `RandomAugment(2, 7, isPIL=True, augs=[...])` as used by transform.py:
    `albef_transform_randaug_wc` (lines 131-139: the ten ops + Solarize, Color, Contrast, Posterize) for NLVR2,
    SNLI-VE and retrieval, `albef_transform_randaug_wohf` (lines 141-149: the ten ops) for VQA;
    `get_random_ops` draws N=2 ops with replacement and `__call__` skips each with probability 0.5."""
    for colour_ops, expected in ((True, set(RANDOM_AUGMENT_OPS) | set(RANDOM_AUGMENT_COLOUR_OPS)),
                                 (False, set(RANDOM_AUGMENT_OPS))):
        applied = [random_augment_ops(seed, colour_ops) for seed in SEEDS]
        names = Counter(name for ops in applied for name, _ in ops)
        assert set(names) == expected
        assert len(expected) == (14 if colour_ops else 10)
        # 2 draws x p 0.5: one op per image on average, none in a quarter of the images, both in a quarter
        counts = Counter(len(ops) for ops in applied)
        assert abs(sum(len(ops) for ops in applied) / len(SEEDS) - 1.0) < 0.05
        assert abs(counts[0] / len(SEEDS) - 0.25) < 0.03 and abs(counts[2] / len(SEEDS) - 0.25) < 0.03
        # each op equally likely among those applied
        share = np.array(list(names.values())) / sum(names.values())
        assert np.all(np.abs(share - 1 / len(expected)) < 0.025), names


def test_released_random_augment_levels_and_signs():
    """randaugment.py `arg_dict` at level 7 of MAX_LEVEL 10: enhance factor 0.7 x 1.8 + 0.1 = 1.36 (no sign),
    shear 0.21, translate 7 px (translate_const 10), rotate 21 degrees, each with a random sign; solarize
    threshold int(0.7 x 256) = 179, posterize int(0.7 x 4) = 2 bits."""
    values: dict[str, set] = {}
    for seed in SEEDS:
        for name, value in random_augment_ops(seed, True):
            values.setdefault(name, set()).add(round(value, 6))
    assert values["Brightness"] == values["Sharpness"] == values["Color"] == values["Contrast"] == {0.36}
    assert values["ShearX"] == values["ShearY"] == {-0.21, 0.21}
    assert values["TranslateX"] == values["TranslateY"] == {-7.0, 7.0}
    assert values["Rotate"] == {-21.0, 21.0}
    assert values["Solarize"] == {179.0} and values["Posterize"] == {2.0}


def test_released_random_augment_fills_grey():
    """randaugment.py `replace_value = (128, 128, 128)`: what a rotation uncovers is grey, not black."""
    white = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    seed = next(s for s in SEEDS if [n for n, _ in random_augment_ops(s, False)] == ["Rotate"])
    out = random_augment(white, seed, colour_ops=False)
    assert out[:, 0, 0].tolist() == [128, 128, 128] and out[:, 32, 32].tolist() == [255, 255, 255]


def test_released_eval_transform_resizes_the_whole_image():
    """transform.py `albef_transform` (lines 100-106): Resize((size, size), BICUBIC), no centre crop; the
    pre-training `clip_transform` keeps Resize(size) + CenterCrop(size)."""
    whole = sample_geometry(640, 480, 384, "albef", seed=0)
    assert (whole.top, whole.left, whole.bottom, whole.right, whole.flip) == (0, 0, 480, 640, False)
    center = sample_geometry(640, 480, 384, "clip", seed=0)
    assert (center.bottom - center.top, center.right - center.left) == (480, 480)  # a quarter of the width lost


@pytest.mark.parametrize("hflip", [True, False])
def test_released_augmentation_is_per_example(hflip):
    """The released datasets transform each (image, text) pair on its own: two examples of one image get
    different crops; without hflip (VQA, `_wohf`) no view is mirrored."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 255, (3, 120, 160), dtype=np.uint8))
    views = [augment_example(image, 48, seed, hflip, colour_ops=True) for seed in range(6)]
    assert all(v.shape == (3, 48, 48) and v.dtype == torch.uint8 for v in views)
    assert len({v.numpy().tobytes() for v in views}) == 6
    flips = [sample_geometry(160, 120, 48, "albef_randaug", seed, hflip).flip for seed in range(200)]
    assert (0.35 < np.mean(flips) < 0.65) if hflip else not any(flips)
