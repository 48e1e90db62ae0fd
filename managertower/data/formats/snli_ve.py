"""SNLI-VE: one sample per Flickr30K image with all its hypotheses (text = sentence2, the hypothesis only).

Labels: contradiction 0, neutral 1, entailment 2. The image id comes as `Flikr30kID` ("123.jpg", the
released spelling) or `Flickr30K_ID` ("123"); both are accepted. The premises (sentence1, Flickr30K
captions) are kept as the sample's captions.
"""
from __future__ import annotations

import os
from typing import Iterator

from managertower.data.formats.base import (SKIP_BAD_LINES, AnnotationError, Item, RawDataset, ReaderOption,
                                            dedupe_captions, iter_json_lines, require, sample_key)
from managertower.data.images import ImageSource

LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
ID_FIELDS = ("Flikr30kID", "Flickr30K_ID", "Flickr30kID")
IMAGE_FOLDERS = ("flickr30k-images", "flickr30k_images", "Flickr30K/flickr30k_images", "Flickr30k_images", "images")


class SnliVE(RawDataset):
    name = "snli_ve"
    splits = ("train", "dev", "test")
    default_split = "train"
    layout = """
ROOT/snli_ve_{train,dev,test}.jsonl   {"gold_label", "sentence1", "sentence2", "pairID", "Flikr30kID": "123.jpg"}
ROOT/flickr30k-images/<id>.jpg        (also flickr30k_images/, Flickr30K/flickr30k_images/, images/)
"""

    reader_options = (
        ReaderOption("annotations", "the split's jsonl file (default ROOT/snli_ve_{split}.jsonl)"),
        ReaderOption("images", "the Flickr30K image folder (default: see the layout)"),
        SKIP_BAD_LINES,
    )

    def items(self) -> Iterator[Item]:
        path = self.find_file("annotations", [f"snli_ve_{self.split}.jsonl", f"data/snli_ve_{self.split}.jsonl"],
                              f"SNLI-VE {self.split} file")
        folder = self.find_folder("images", IMAGE_FOLDERS, "Flickr30K image folder")
        by_image: dict[str, dict] = {}
        for line, record in iter_json_lines(path, self.bad_line):
            try:
                field = next((name for name in ID_FIELDS if name in record), None)
                if field is None:
                    raise AnnotationError(path, "no image id (expected Flikr30kID or Flickr30K_ID)", line=line,
                                          key="Flikr30kID")
                image_id = os.path.splitext(str(record[field]))[0]
                label = LABELS.get(str(require(record, "gold_label", path, line=line)).lower())
                hypothesis = require(record, "sentence2", path, line=line) if label is not None else None
            except AnnotationError as error:
                self.bad_line(error)
                continue
            if label is None:  # '-': the annotators did not agree; SNLI drops these too
                self.skipped["no_gold_label"] += 1
                continue
            sample = by_image.setdefault(image_id, {"premises": [], "hypotheses": []})
            sample["premises"].append(str(record.get("sentence1", "")))
            sample["hypotheses"].append({"pair_id": str(record.get("pairID", f"{image_id}-{line}")),
                                         "text": hypothesis, "label": label})
        for image_id, sample in by_image.items():
            yield Item(key=sample_key(self.name, image_id),
                       image=ImageSource(os.path.join(folder, f"{image_id}.jpg")),
                       meta={"image_id": int(image_id) if image_id.isdigit() else image_id,
                             "captions": dedupe_captions(sample["premises"]), "hypotheses": sample["hypotheses"]})
