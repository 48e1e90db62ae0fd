"""The synthetic shapes world: deterministic, in the real raw formats, and every task needs the image."""
from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from managertower.data.shards import expand_shards, iter_shard, sha256_file
from managertower.data.synthetic import (COLOURS, SIZES, Scene, Shape, captions_for, hard_negative_caption, render,
                                         random_scene, shard_world, snli_hypotheses, write_world)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root / "raw", seed=3, size=60)
    shard_world(root / "raw", root / "shards", workers=1, seed=3, summary=False)
    return root


def shard_digests(shard_root) -> dict[str, str]:
    return {path.split("/shards/")[-1]: sha256_file(path) for path in expand_shards(f"{shard_root}/*/*.tar")}


def test_same_seed_gives_the_same_shards_and_another_seed_does_not(world, tmp_path):
    write_world(tmp_path / "raw", seed=3, size=60)
    shard_world(tmp_path / "raw", tmp_path / "shards", workers=2, seed=3, summary=False)
    assert shard_digests(tmp_path / "shards") == shard_digests(world / "shards")
    write_world(tmp_path / "raw4", seed=4, size=60)
    shard_world(tmp_path / "raw4", tmp_path / "shards4", workers=1, seed=4, summary=False)
    assert set(shard_digests(tmp_path / "shards4").values()).isdisjoint(shard_digests(world / "shards").values())


def test_world_has_every_dataset_and_split(world):
    expected = {"coco": {"train", "test"}, "vqav2": {"train", "val"}, "nlvr2": {"train", "dev", "test1"},
                "snli_ve": {"train", "dev", "test"}, "flickr30k": {"train", "val", "test"}}
    for source, splits in expected.items():
        found = {path.rsplit("/", 1)[-1].split("-")[0] for path in expand_shards(str(world / "shards" / source))}
        assert found == splits, source
    assert json.loads((world / "shards" / "vqav2" / "answer_vocab.json").read_text())
    coco = json.loads((world / "raw" / "coco" / "dataset_coco.json").read_text())
    assert Counter(image["split"] for image in coco["images"]) == {"train": 48, "restval": 12, "val": 2, "test": 2}


def test_captions_differ_between_images_and_describe_their_own(world):
    captions, colours_seen = [], []
    for path in expand_shards(str(world / "shards" / "coco")):
        for sample in iter_shard(path):
            meta = json.loads(sample["json"])
            captions.append(meta["captions"][0])
            assert 2 <= len(meta["captions"]) <= 3 and len(set(meta["captions"])) == len(meta["captions"])
            colours_seen += re.findall("|".join(COLOURS), meta["captions"][0])
    assert len(set(captions)) >= 0.8 * len(captions)
    assert set(colours_seen) == set(COLOURS)


def test_rendered_pixels_match_the_caption():
    rng = random.Random(0)
    for _ in range(20):
        scene = random_scene(rng)
        pixels = np.asarray(render(scene), dtype=np.int32)
        for shape in scene.shapes:
            vertical, horizontal = shape.position.split()
            cell = pixels[:64] if vertical == "top" else pixels[64:]
            cell = cell[:, :64] if horizontal == "left" else cell[:, 64:]
            mask = (np.abs(cell - np.array(COLOURS[shape.colour])).sum(axis=2) < 30)
            columns = np.flatnonzero(mask.any(axis=0))
            width = columns.max() - columns.min() + 1
            assert width >= 24, shape  # >= 1.5 patches of 8 px once the demo resizes to 64 px
            assert (width >= 40) == (shape.size == "large"), shape


def test_hard_negative_swaps_exactly_one_attribute_word():
    rng = random.Random(1)
    caption = "a large red circle at the top left and a small blue square at the bottom right."
    for attribute, vocabulary in (("colour", set(COLOURS)), ("size", set(SIZES)),
                                  ("shape", {"circle", "square", "triangle"}),
                                  ("position", {"top", "bottom", "left", "right"})):
        for _ in range(10):
            negative = hard_negative_caption(caption, attribute, rng)
            changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
            assert len(changed) == 1 and len(negative.split()) == len(caption.split())
            old, new = (word.strip(".") for word in changed[0])
            assert old in vocabulary and new in vocabulary and old != new
    assert "bottom left" in hard_negative_caption("a red circle at the top left.", "position", _Fixed(0))
    with pytest.raises(ValueError):
        hard_negative_caption("there are two shapes.", "colour", rng)


class _Fixed:
    """An rng that always picks index `i` (for an exact expectation)."""

    def __init__(self, index):
        self.index = index

    def randrange(self, n):
        return min(self.index, n - 1)


def test_hard_negative_accepts_a_numpy_generator():
    negative = hard_negative_caption("a small green triangle at the top right.", "shape", np.random.default_rng(0))
    assert negative != "a small green triangle at the top right." and "green" in negative


def test_captions_of_a_scene_with_a_hidden_cell_name_only_visible_shapes():
    scene = Scene((Shape("red", "circle", "small", "top left"), Shape("blue", "square", "large", "bottom right")),
                  (240, 240, 240), ((0, 0), (0, 0)), hidden="bottom right")
    for caption in captions_for(scene, random.Random(0)):
        assert "blue" not in caption and "red circle" in caption and "grey box covers the bottom right" in caption


def test_tasks_need_the_image(world):
    """The same question or hypothesis text gets different answers/labels on different images."""
    answers_by_question = {}
    for path in expand_shards(str(world / "shards" / "vqav2")):
        for sample in iter_shard(path):
            for question in json.loads(sample["json"])["questions"]:
                best = max(question["answers"], key=question["answers"].get)
                answers_by_question.setdefault(question["question"], set()).add(best)
    assert len(answers_by_question["how many shapes are there?"]) >= 2
    labels = Counter()
    for path in expand_shards(str(world / "shards" / "snli_ve")):
        for sample in iter_shard(path):
            for hypothesis in json.loads(sample["json"])["hypotheses"]:
                labels[hypothesis["label"]] += 1
    assert set(labels) == {0, 1, 2}
    statements = Counter()
    for path in expand_shards(str(world / "shards" / "nlvr2")):
        for sample in iter_shard(path):
            statements.update(s["label"] for s in json.loads(sample["json"])["statements"])
    assert statements[0] == statements[1] > 0


def _claimed(hypothesis: str) -> tuple[str, str, str]:
    size, colour, shape = re.match(r"there is an? (\w+) (\w+) (\w+)", hypothesis).groups()
    return colour, shape, size


def test_snli_ve_labels_follow_from_what_the_image_shows():
    """Entailment names a visible shape; contradiction and neutral name none, and are neutral exactly when a grey
    box hides a cell the shape could be in."""
    rng = random.Random(5)
    counts = Counter()
    for _ in range(300):
        scene = random_scene(rng, hide_probability=0.5)
        visible = {(s.colour, s.shape, s.size) for s in scene.visible()}
        pairs = snli_hypotheses(scene, rng)
        assert len(pairs) == 2 + (1 if visible else 0)
        for label, hypothesis in pairs:
            counts[label] += 1
            if label == 2:
                assert _claimed(hypothesis) in visible, (scene, hypothesis)
            else:
                assert _claimed(hypothesis) not in visible, (scene, hypothesis)
                assert label == (1 if scene.hidden else 0), (scene, hypothesis)
    assert min(counts.values()) > 0.25 * sum(counts.values()), counts  # no class is rare
