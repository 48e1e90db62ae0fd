"""COCO and Flickr30K captions in Karpathy's split files (`dataset_coco.json`, `dataset_flickr30k.json`).

Both share one schema: {"images": [{"filepath"?, "filename", "imgid", "cocoid"?, "split", "sentences":
[{"raw", ...}]}]}. The pre-training `train` split is Karpathy's train + restval (COCO: the paper's 113K
images); `val` and `test` are the retrieval evaluation images and never enter pre-training.
"""
from __future__ import annotations

import os
from typing import ClassVar, Iterator

from managertower.data.formats.base import (AnnotationError, Item, RawDataset, ReaderOption, dedupe_captions, load_json,
                                            require, require_list, sample_key)
from managertower.data.images import ImageSource

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def karpathy_options(annotation_file: str) -> tuple[ReaderOption, ...]:
    return (ReaderOption("annotations", f"the Karpathy split file (default ROOT/{annotation_file})"),
            ReaderOption("images", "the folder image paths are relative to (default: see the layout)"))


class KarpathyCaptions(RawDataset):
    splits = ("train", "val", "test")
    default_split = "train"
    annotation_file: ClassVar[str]

    def image_path(self, record: dict, images_root: str, path: str, position: int) -> str:
        raise NotImplementedError

    def image_id(self, record: dict, path: str, line: int) -> int | str:
        raise NotImplementedError

    def default_images_root(self) -> str:
        return self.root

    @staticmethod
    def text_field(record: dict, name: str, path: str, position: int, default: str | None = None) -> str:
        """A path part of images[position]: present (unless it has a default) and a string."""
        value = record.get(name, default) if default is not None else require(
            record, name, path, context=f" of images[{position}]")
        if not isinstance(value, str):
            raise AnnotationError(path, f"expected a file name, got {type(value).__name__}",
                                  key=f"images[{position}].{name}")
        return value

    def items(self) -> Iterator[Item]:
        path = self.find_file("annotations", [self.annotation_file, f"annotations/{self.annotation_file}"],
                              "Karpathy split file")
        data = load_json(path)
        images_root = self.option("images", self.default_images_root())
        wanted = KARPATHY_SPLITS[self.split]
        for position, record in enumerate(require_list(require(data, "images", path), path, "images")):
            context = f" of images[{position}]"
            karpathy_split = require(record, "split", path, context=context)
            if karpathy_split not in wanted:
                continue
            sentences = require_list(require(record, "sentences", path, context=context), path,
                                     f"images[{position}].sentences")
            captions = dedupe_captions(require(sentence, "raw", path, context=f" of images[{position}].sentences")
                                       for sentence in sentences)
            image_id = self.image_id(record, path, position)
            yield Item(key=sample_key(self.name, image_id),
                       image=ImageSource(self.image_path(record, images_root, path, position)),
                       meta={"image_id": image_id, "captions": captions, "karpathy_split": karpathy_split})


class CocoKarpathy(KarpathyCaptions):
    name = "coco"
    annotation_file = "dataset_coco.json"
    reader_options = karpathy_options(annotation_file)
    layout = """
ROOT/dataset_coco.json            Karpathy split: {"images": [{"filepath", "filename", "cocoid", "split", "sentences"}]}
ROOT/train2014/COCO_train2014_*.jpg   images at ROOT/<filepath>/<filename>
ROOT/val2014/COCO_val2014_*.jpg
--split train = Karpathy train + restval (113K, pre-training); val / test = the 5K retrieval splits.
"""

    def image_path(self, record: dict, images_root: str, path: str, position: int) -> str:
        return os.path.join(images_root, self.text_field(record, "filepath", path, position, default=""),
                            self.text_field(record, "filename", path, position))

    def image_id(self, record: dict, path: str, position: int) -> int:
        if "cocoid" not in record:
            raise AnnotationError(path, "missing field of a COCO Karpathy image", key=f"images[{position}].cocoid")
        return record["cocoid"]


class Flickr30kKarpathy(KarpathyCaptions):
    name = "flickr30k"
    annotation_file = "dataset_flickr30k.json"
    reader_options = karpathy_options(annotation_file)
    layout = """
ROOT/dataset_flickr30k.json       Karpathy split: {"images": [{"filename", "imgid", "split", "sentences"}]}
ROOT/flickr30k-images/*.jpg       the Flickr30K images (the 'flickr30k-images' folder of the download)
--split train / val / test = 29,000 / 1,014 / 1,000 images.
"""

    def default_images_root(self) -> str:
        for name in ("flickr30k-images", "flickr30k_images", "Flickr30k_images", "images"):
            if os.path.isdir(os.path.join(self.root, name)):
                return os.path.join(self.root, name)
        return os.path.join(self.root, "flickr30k-images")

    def image_path(self, record: dict, images_root: str, path: str, position: int) -> str:
        return os.path.join(images_root, self.text_field(record, "filename", path, position))

    def image_id(self, record: dict, path: str, position: int) -> int | str:
        filename = self.text_field(record, "filename", path, position)
        stem = os.path.splitext(os.path.basename(filename))[0]
        return int(stem) if stem.isdigit() else stem
