"""A small synthetic world of rendered shapes, written in the REAL raw dataset formats.

    write_world("raw/synthetic", seed=0, size="demo")          # Karpathy COCO, VQAv2, NLVR2, SNLI-VE, Flickr30K
    shard_world("raw/synthetic", "shards/synthetic", workers=2)  # every reader over it, like real data

Each image (128x128) holds 1-3 shapes, each in its own cell of a 2x2 grid: colour (red, green, blue,
yellow), shape (circle, square, triangle), size (small 28 px, large 52 px: the demo trains at 64 px with
8-px patches, and shapes narrower than 1.5 patches stay indistinguishable for a tiny model), position
(top/bottom + left/right). Every task needs both modalities:
  captions     name every shape with all four attributes: true of their image, false of most others;
  VQAv2        questions about colour, shape, size, position, count and existence, ten answers each;
  NLVR2        one true and one false statement per image pair;
  SNLI-VE      existence claims ('there is a small red circle.'): entailed when the shape is visible; when
               it is not, contradicted by a whole image, neutral where a grey box hides a cell it could be in.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw

IMAGE_SIZE = 128
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 25)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 28, "large": 52}  # pixel width at 128 px; small >= 24 px = 1.5 patches at 64 px / 8 px
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
OCCLUDER = (128, 128, 128)
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
WORLD_FILE = "world.json"
WORLD_VERSION = 1

# hard_negative_caption swaps a word for another of the same group (top<->bottom keeps 'top left' valid).
ATTRIBUTE_WORDS: dict[str, list[tuple[str, ...]]] = {
    "colour": [tuple(COLOURS)],
    "shape": [SHAPES, tuple(f"{shape}s" for shape in SHAPES)],
    "size": [tuple(SIZES)],
    "position": [("top", "bottom"), ("left", "right")],
}
ATTRIBUTE_WORDS["color"] = ATTRIBUTE_WORDS["colour"]


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    jitter: tuple[tuple[int, int], ...]
    hidden: str | None = None  # the cell covered by a grey box (SNLI-VE images only)

    def visible(self) -> tuple[Shape, ...]:
        return tuple(shape for shape in self.shapes if shape.position != self.hidden)


def _pick(rng, options: Sequence):
    """rng.choice for random.Random and numpy Generators alike (numpy would turn tuples into arrays)."""
    if hasattr(rng, "integers"):
        return options[int(rng.integers(len(options)))]
    return options[rng.randrange(len(options))]


def random_shape(rng: random.Random, position: str) -> Shape:
    return Shape(_pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, tuple(SIZES)), position)


def random_scene(rng: random.Random, hide_probability: float = 0.0) -> Scene:
    count = rng.choices((1, 2, 3), weights=(2, 4, 4))[0]  # few single-shape images: they repeat the most
    positions = sorted(rng.sample(POSITIONS, count), key=POSITIONS.index)
    shapes = tuple(random_shape(rng, position) for position in positions)
    background = tuple(rng.randint(225, 250) for _ in range(3))
    jitter = tuple((rng.randint(-4, 4), rng.randint(-4, 4)) for _ in shapes)
    hidden = None
    if rng.random() < hide_probability:
        hidden = _pick(rng, POSITIONS)
    return Scene(shapes, background, jitter, hidden)


def _cell_centre(position: str) -> tuple[int, int]:
    vertical, horizontal = position.split()
    quarter = IMAGE_SIZE // 4
    return (quarter if horizontal == "left" else 3 * quarter, quarter if vertical == "top" else 3 * quarter)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(image)
    for shape, (dx, dy) in zip(scene.shapes, scene.jitter):
        cx, cy = _cell_centre(shape.position)
        cx, cy = cx + dx, cy + dy
        width = SIZES[shape.size]
        colour = COLOURS[shape.colour]
        if shape.shape == "circle":
            draw.ellipse((cx - width / 2, cy - width / 2, cx + width / 2, cy + width / 2), fill=colour)
        elif shape.shape == "square":
            side = round(width * 0.86)  # about a circle's area; small squares stay >= 24 px
            draw.rectangle((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), fill=colour)
        else:
            height = width * 0.9
            draw.polygon([(cx, cy - height / 2), (cx - width / 2, cy + height / 2), (cx + width / 2, cy + height / 2)],
                         fill=colour)
    if scene.hidden is not None:
        cx, cy = _cell_centre(scene.hidden)
        half = IMAGE_SIZE // 4 - 1
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=OCCLUDER)
    return image


# ---------------------------------------------------------------------------------------------------------
# Text.

def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    """2-3 captions, each naming every visible shape with all four attributes (so every attribute can be
    swapped for a hard negative)."""
    shapes = list(scene.visible())
    if not shapes:
        return [f"a grey box covers the {scene.hidden} of an otherwise empty picture."]
    count = len(shapes)
    noun = "shape" if count == 1 else "shapes"
    captions = [_join([shape.phrase() for shape in shapes]) + ".",
                f"there {'is' if count == 1 else 'are'} {NUMBER_WORDS[count]} {noun}: "
                + _join([shape.phrase() for shape in reversed(shapes)]) + "."]
    if count > 1:
        focus = _pick(rng, shapes)
        captions.append(f"the picture shows {focus.phrase()}.")
    if scene.hidden is not None:
        captions = [caption[:-1] + f"; a grey box covers the {scene.hidden}." for caption in captions]
    return captions


def hard_negative_caption(caption: str, attribute: str, rng) -> str:
    """`caption` with one word of `attribute` (colour/color, shape, size, position) swapped for another value.

    Used for hard-negative image-text matching: the result differs from the caption in exactly one
    attribute word. Raises ValueError when the caption has no word of that attribute.
    """
    if attribute not in ATTRIBUTE_WORDS:
        raise ValueError(f"attribute {attribute!r}: choose one of colour, shape, size, position")
    groups = ATTRIBUTE_WORDS[attribute]
    vocabulary = {word: group for group in groups for word in group}
    occurrences = [match for match in re.finditer(r"[A-Za-z]+", caption) if match.group().lower() in vocabulary]
    if not occurrences:
        raise ValueError(f"caption {caption!r} names no {attribute}")
    match = _pick(rng, occurrences)
    word = match.group().lower()
    replacement = _pick(rng, [other for other in vocabulary[word] if other != word])
    if match.group()[0].isupper():
        replacement = replacement.capitalize()
    return caption[:match.start()] + replacement + caption[match.end():]


def _annotator_answers(rng: random.Random, answer: str, spellings: Sequence[str], wrong: Sequence[str]) -> list[dict]:
    """Ten answers: mostly the right one (in the spellings annotators use), now and then a wrong one."""
    answers = []
    for index in range(10):
        if rng.random() < 0.08 and wrong:
            text = _pick(rng, [w for w in wrong if w != answer] or [answer])
        else:
            text = _pick(rng, spellings)
        answers.append({"answer": text, "answer_confidence": "yes", "answer_id": index + 1})
    return answers


def vqa_questions(scene: Scene, rng: random.Random, count: int = 4) -> list[tuple[str, str, list[str], list[str], str]]:
    """(question, answer, spellings, wrong answers, answer type) tuples; every answer needs the image."""
    shapes = list(scene.shapes)
    target = _pick(rng, shapes)
    yes_no_shape = random_shape(rng, "top left")
    present = any(s.colour == yes_no_shape.colour and s.shape == yes_no_shape.shape for s in shapes)
    if rng.random() < 0.5 and not present:  # balance yes and no
        yes_no_shape, present = target, True
    colour_count = sum(1 for s in shapes if s.colour == target.colour)
    candidates = [
        ("how many shapes are there?", str(len(shapes)), [str(len(shapes)), NUMBER_WORDS[len(shapes)]],
         ["1", "2", "3"], "number"),
        (f"what color is the shape at the {target.position}?", target.colour, [target.colour, target.colour.capitalize()],
         list(COLOURS), "other"),
        (f"what shape is at the {target.position}?", target.shape, [target.shape, f"a {target.shape}"],
         list(SHAPES), "other"),
        (f"is the shape at the {target.position} small or large?", target.size, [target.size], list(SIZES), "other"),
        (f"where is the {target.size} {target.colour} {target.shape}?", target.position, [target.position],
         list(POSITIONS), "other"),
        (f"is there a {yes_no_shape.colour} {yes_no_shape.shape}?", "yes" if present else "no",
         ["yes" if present else "no"], ["yes", "no"], "yes/no"),
        (f"how many {target.colour} shapes are there?", str(colour_count), [str(colour_count), NUMBER_WORDS[colour_count]],
         ["1", "2", "3"], "number"),
    ]
    return rng.sample(candidates, min(count, len(candidates)))


def nlvr2_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    colour, shape, size = _pick(rng, tuple(COLOURS)), _pick(rng, SHAPES), _pick(rng, tuple(SIZES))
    position = _pick(rng, POSITIONS)
    side_name, side = _pick(rng, (("left", left), ("right", right)))

    def has(scene: Scene, **attributes) -> bool:
        return any(all(getattr(s, k) == v for k, v in attributes.items()) for s in scene.shapes)

    templates = [
        ("there are more shapes in the left image than in the right image.", len(left.shapes) > len(right.shapes)),
        (f"both images contain a {colour} shape.", has(left, colour=colour) and has(right, colour=colour)),
        (f"exactly one image contains a {shape}.", has(left, shape=shape) != has(right, shape=shape)),
        (f"the {side_name} image contains a {size} {colour} {shape}.", has(side, size=size, colour=colour, shape=shape)),
        (f"the {side_name} image has a {shape} at the {position}.", has(side, shape=shape, position=position)),
        ("the two images contain the same number of shapes.", len(left.shapes) == len(right.shapes)),
        (f"there is a {colour} shape at the {position} of the {side_name} image.", has(side, colour=colour, position=position)),
    ]
    return _pick(rng, templates)


SNLI_TEMPLATES = ("there is a {}.", "there is a {} in the picture.")


def snli_hypotheses(scene: Scene, rng: random.Random, absent: int = 2) -> list[tuple[int, str]]:
    """(label, hypothesis) pairs for one image: 0 contradiction, 1 neutral, 2 entailment (SNLI-VE's order).

    Every hypothesis claims a shape exists ('there is a small red circle.'). One names a visible shape:
    entailment. `absent` name a shape the image does not show: contradiction when the whole image is in view,
    neutral when a grey box hides a cell, which could hold it. All read alike: only the image tells the label,
    and it takes both the shape's three attributes and whether anything is hidden.
    """
    def claim(shape: Shape) -> str:
        return _pick(rng, SNLI_TEMPLATES).format(f"{shape.size} {shape.colour} {shape.shape}")

    seen = {(shape.colour, shape.shape, shape.size) for shape in scene.visible()}
    pairs = []
    if scene.visible():
        pairs.append((2, claim(_pick(rng, scene.visible()))))
    label = 1 if scene.hidden is not None else 0
    while len(pairs) < absent + (1 if scene.visible() else 0):
        shape = random_shape(rng, POSITIONS[0])
        if (shape.colour, shape.shape, shape.size) not in seen:
            pairs.append((label, claim(shape)))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# The raw folders.

@dataclass(frozen=True)
class WorldSize:
    coco_train: int
    coco_restval: int
    coco_val: int
    coco_test: int
    vqa_train: int
    vqa_val: int
    nlvr2_train: int
    nlvr2_dev: int
    nlvr2_test: int
    flickr_train: int
    flickr_dev: int
    flickr_test: int
    retrieval_train: int
    retrieval_eval: int


def world_size(size: str | int) -> WorldSize:
    """'small' (tests), 'demo' (3000 pre-training images), or N pre-training images with the rest in scale."""
    n = {"small": 300, "demo": 3000}.get(str(size))
    if n is None:
        if not str(size).isdigit() or int(size) < 20:
            raise ValueError(f"--size {size!r}: small, demo, or a number of pre-training images >= 20")
        n = int(size)
    part = lambda fraction: max(2, round(n * fraction))  # noqa: E731
    return WorldSize(coco_train=part(0.8), coco_restval=part(0.2), coco_val=part(1 / 30), coco_test=part(1 / 30),
                     vqa_train=part(0.4), vqa_val=part(0.1), nlvr2_train=part(0.4), nlvr2_dev=part(0.05),
                     nlvr2_test=part(0.05), flickr_train=part(0.4), flickr_dev=part(0.05), flickr_test=part(0.05),
                     retrieval_train=part(1 / 3), retrieval_eval=part(1 / 30))


def _save(image: Image.Image, path: str, format: str = "JPEG") -> None:
    if format == "JPEG":
        image.save(path, format="JPEG", quality=92)
    else:
        image.save(path, format=format)


def _dump(path: str, payload: Any, lines: bool = False) -> None:
    with open(path, "w") as handle:
        if lines:
            handle.writelines(json.dumps(record) + "\n" for record in payload)
        else:
            json.dump(payload, handle)


def _karpathy_entry(imgid: int, filename: str, split: str, captions: list[str], filepath: str | None = None,
                    cocoid: int | None = None, first_sentid: int = 0) -> dict:
    entry = {"filename": filename, "imgid": imgid, "split": split,
             "sentences": [{"raw": c, "tokens": re.findall(r"[a-z]+", c.lower()), "imgid": imgid,
                            "sentid": first_sentid + i} for i, c in enumerate(captions)],
             "sentids": list(range(first_sentid, first_sentid + len(captions)))}
    if filepath is not None:
        entry["filepath"] = filepath
    if cocoid is not None:
        entry["cocoid"] = cocoid
    return entry


def _write_coco(root: str, sizes: WorldSize, rng: random.Random) -> int:
    os.makedirs(os.path.join(root, "train2014"), exist_ok=True)
    os.makedirs(os.path.join(root, "val2014"), exist_ok=True)
    images, sentid = [], 0
    plan = ([("train", "train2014")] * sizes.coco_train + [("restval", "val2014")] * sizes.coco_restval
            + [("val", "val2014")] * sizes.coco_val + [("test", "val2014")] * sizes.coco_test)
    for imgid, (split, folder) in enumerate(plan):
        cocoid = 100_000 + imgid
        scene = random_scene(rng)
        captions = captions_for(scene, rng)
        if rng.random() < 0.05:
            captions.append(captions[0])  # COCO has a few repeated captions; the reader removes them
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        _save(render(scene), os.path.join(root, folder, filename))
        images.append(_karpathy_entry(imgid, filename, split, captions, filepath=folder, cocoid=cocoid,
                                      first_sentid=sentid))
        sentid += len(captions)
    _dump(os.path.join(root, "dataset_coco.json"), {"images": images, "dataset": "coco"})
    return len(images)


def _write_vqav2(root: str, sizes: WorldSize, rng: random.Random) -> int:
    question_id = 1
    total = 0
    for folder, count, first_id in (("train2014", sizes.vqa_train, 200_000), ("val2014", sizes.vqa_val, 300_000)):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        questions, annotations = [], []
        for offset in range(count):
            image_id = first_id + offset
            scene = random_scene(rng)
            _save(render(scene), os.path.join(root, folder, f"COCO_{folder}_{image_id:012d}.jpg"))
            for question, answer, spellings, wrong, answer_type in vqa_questions(scene, rng):
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({"question_id": question_id, "image_id": image_id, "answer_type": answer_type,
                                    "question_type": " ".join(question.split()[:2]), "multiple_choice_answer": answer,
                                    "answers": _annotator_answers(rng, answer, spellings, wrong)})
                question_id += 1
        info = {"description": "synthetic shapes world, VQAv2 layout", "version": "2.0"}
        _dump(os.path.join(root, f"v2_OpenEnded_mscoco_{folder}_questions.json"),
              {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": folder,
               "questions": questions})
        _dump(os.path.join(root, f"v2_mscoco_{folder}_annotations.json"),
              {"info": info, "data_type": "mscoco", "data_subtype": folder, "annotations": annotations})
        total += count
    return total


def _write_nlvr2(root: str, sizes: WorldSize, rng: random.Random) -> int:
    total = 0
    for split, count in (("train", sizes.nlvr2_train), ("dev", sizes.nlvr2_dev), ("test1", sizes.nlvr2_test)):
        records = []
        for pair in range(count):
            set_id = 1000 + pair // 4
            directory = str(set_id % 10) if split == "train" else None  # train spreads over numbered folders
            folder = os.path.join(root, "images", split, *([directory] if directory else []))
            os.makedirs(folder, exist_ok=True)
            prefix = f"{split}-{set_id}-{pair % 4}"
            left, right = random_scene(rng), random_scene(rng)
            _save(render(left), os.path.join(folder, f"{prefix}-img0.png"), "PNG")
            _save(render(right), os.path.join(folder, f"{prefix}-img1.png"), "PNG")
            wanted = [True, False]
            rng.shuffle(wanted)
            for sentence_index, label in enumerate(wanted):
                for _ in range(200):
                    sentence, truth = nlvr2_statement(left, right, rng)
                    if truth == label:
                        break
                else:
                    sentence, label = sentence, truth
                record = {"identifier": f"{prefix}-{sentence_index}", "sentence": sentence, "label": str(label),
                          "left_url": f"synthetic://{prefix}-img0.png", "right_url": f"synthetic://{prefix}-img1.png",
                          "writer": "synthetic", "synset": "shapes", "query": "shapes"}
                if directory:
                    record["directory"] = directory
                records.append(record)
        _dump(os.path.join(root, f"{split}.json"), records, lines=True)
        total += count
    return total


def _write_flickr_and_snli_ve(flickr_root: str, snli_root: str, sizes: WorldSize, rng: random.Random) -> int:
    images_folder = os.path.join(flickr_root, "flickr30k-images")
    os.makedirs(images_folder, exist_ok=True)
    os.makedirs(snli_root, exist_ok=True)
    karpathy, next_imgid, sentid = [], 0, 0
    labels = {0: "contradiction", 1: "neutral", 2: "entailment"}
    total = 0
    for snli_split, karpathy_split, count, retrieval_count in (
            ("train", "train", sizes.flickr_train, sizes.retrieval_train),
            ("dev", "val", sizes.flickr_dev, sizes.retrieval_eval),
            ("test", "test", sizes.flickr_test, sizes.retrieval_eval)):
        records = []
        for offset in range(count):
            flickr_id = 1_000_000_000 + total + offset
            scene = random_scene(rng, hide_probability=0.5)  # about as many neutral as contradiction claims
            captions = captions_for(scene, rng)
            _save(render(scene), os.path.join(images_folder, f"{flickr_id}.jpg"))
            for index, (label, hypothesis) in enumerate(snli_hypotheses(scene, rng)):
                # Both spellings of the id field occur in the wild; the reader accepts either.
                id_field = {"Flikr30kID": f"{flickr_id}.jpg"} if offset % 2 == 0 else {"Flickr30K_ID": str(flickr_id)}
                records.append({"gold_label": labels[label], "sentence1": captions[0], "sentence2": hypothesis,
                                "pairID": f"{flickr_id}.jpg#0r{index}{labels[label][0]}",
                                "captionID": f"{flickr_id}.jpg#0", **id_field})
            if offset < retrieval_count:
                karpathy.append(_karpathy_entry(next_imgid, f"{flickr_id}.jpg", karpathy_split, captions,
                                                first_sentid=sentid))
                next_imgid += 1
                sentid += len(captions)
        _dump(os.path.join(snli_root, f"snli_ve_{snli_split}.jsonl"), records, lines=True)
        total += count
    _dump(os.path.join(flickr_root, "dataset_flickr30k.json"), {"images": karpathy, "dataset": "flickr30k"})
    link = os.path.join(snli_root, "flickr30k-images")
    if not os.path.lexists(link):  # SNLI-VE uses the Flickr30K images: share them, do not copy
        os.symlink(os.path.relpath(images_folder, snli_root), link)
    return total


def write_world(raw_root: str | os.PathLike, seed: int = 0, size: str | int = "demo") -> dict[str, int]:
    """Write the synthetic raw datasets under raw_root/{coco,vqav2,nlvr2,flickr30k,snli_ve}; returns counts.

    Deterministic in (seed, size). A folder already holding the same world is left as it is.
    """
    raw_root = str(raw_root)
    sizes = world_size(size)
    stamp = {"version": WORLD_VERSION, "seed": seed, "size": str(size)}
    stamp_path = os.path.join(raw_root, WORLD_FILE)
    if os.path.exists(stamp_path):
        with open(stamp_path) as handle:
            existing = json.load(handle)
        if {k: existing.get(k) for k in stamp} == stamp:
            return existing["counts"]
    os.makedirs(raw_root, exist_ok=True)
    # One generator per dataset, so changing one dataset's recipe does not reshuffle the others.
    rng_for = lambda name: random.Random(f"{seed}:{name}")  # noqa: E731
    counts = {
        "coco images": _write_coco(os.path.join(raw_root, "coco"), sizes, rng_for("coco")),
        "vqav2 images": _write_vqav2(os.path.join(raw_root, "vqav2"), sizes, rng_for("vqav2")),
        "nlvr2 pairs": _write_nlvr2(os.path.join(raw_root, "nlvr2"), sizes, rng_for("nlvr2")),
        "flickr30k images": _write_flickr_and_snli_ve(os.path.join(raw_root, "flickr30k"),
                                                      os.path.join(raw_root, "snli_ve"), sizes, rng_for("flickr")),
    }
    with open(stamp_path, "w") as handle:
        json.dump(dict(stamp, counts=counts), handle, indent=1)
    return counts


# (source, raw sub-folder, splits) that shard_world writes to shard_root/<source>/
WORLD_SHARDS = (
    ("coco", "coco", ("train", "test")),
    ("vqav2", "vqav2", ("train", "val")),
    ("nlvr2", "nlvr2", ("train", "dev", "test1")),
    ("snli_ve", "snli_ve", ("train", "dev", "test")),
    ("flickr30k", "flickr30k", ("train", "val", "test")),
)


def shard_world(raw_root: str | os.PathLike, shard_root: str | os.PathLike, workers: int = 2,
                samples_per_shard: int = 500, seed: int = 0, progress: bool = False,
                summary: bool = True) -> dict[str, dict[str, dict]]:
    """Run every reader over the synthetic raw folders: shard_root/{coco,vqav2,nlvr2,snli_ve,flickr30k}/
    {split}-*.tar. Returns {source: {split: run manifest}}."""
    from managertower.data.prep import format_summary, prepare

    manifests: dict[str, dict[str, dict]] = {}
    for source, folder, splits in WORLD_SHARDS:
        for split in splits:
            manifests.setdefault(source, {})[split] = prepare(
                source, os.path.join(str(raw_root), folder), os.path.join(str(shard_root), source), split,
                workers=workers, samples_per_shard=samples_per_shard, seed=seed, progress=progress, summary=False,
                command=f"shard_world({str(raw_root)!r}, {str(shard_root)!r})")
    if summary:
        rows = [dict(m, split=f"{source}/{split}") for source, by_split in manifests.items() for split, m in by_split.items()]
        print(format_summary(rows, title=f"synthetic world sharded into {shard_root}"))
    return manifests
