"""NLVR2: one sample per image pair (KEY.jpg = img0, KEY.img1.jpg = img1) with all its statements.

An identifier `split-set-pair-sentence` names the pair by its first three parts; the images are
`{split-set-pair}-img0.png` / `-img1.png`, found anywhere under the split's image folder (train spreads
them over numbered sub-folders given by the `directory` field).
"""
from __future__ import annotations

import os
from typing import Iterator

from managertower.data.formats.base import (SKIP_BAD_LINES, AnnotationError, Item, RawDataset, ReaderOption,
                                            index_image_files, iter_json_lines, require, sample_key)
from managertower.data.images import ImageSource

LABELS = {"true": 1, "false": 0}


def pair_id(identifier: str) -> str:
    return identifier.rsplit("-", 1)[0]


class NLVR2(RawDataset):
    name = "nlvr2"
    splits = ("train", "dev", "test1")
    default_split = "train"
    layout = """
ROOT/{train,dev,test1}.json     JSON lines {"identifier": "split-set-pair-sent", "sentence", "label": "True"/"False", ...}
                                (ROOT/data/{split}.json is found too)
ROOT/images/{split}/.../{split-set-pair}-img0.png and -img1.png   (or ROOT/{split}/...)
"""

    reader_options = (
        ReaderOption("annotations", "the split's JSON-lines file (default ROOT/{split}.json)"),
        ReaderOption("images", "the split's image folder (default ROOT/images/{split})"),
        SKIP_BAD_LINES,
    )

    def items(self) -> Iterator[Item]:
        path = self.find_file("annotations", [f"{self.split}.json", f"data/{self.split}.json"],
                              f"NLVR2 {self.split} statements")
        folder = self.find_folder("images", [f"images/{self.split}", self.split], f"NLVR2 {self.split} image folder")
        files = index_image_files([folder], recursive=True)
        pairs: dict[str, list[dict]] = {}
        for line, record in iter_json_lines(path, self.bad_line):
            try:
                identifier, statement = self._statement(record, path, line)
            except AnnotationError as error:
                self.bad_line(error)
                continue
            pairs.setdefault(pair_id(identifier), []).append(statement)
        for pair, statements in pairs.items():
            left, right = (files.get(f"{pair}-img{side}.png", os.path.join(folder, f"{pair}-img{side}.png"))
                           for side in (0, 1))
            yield Item(key=sample_key(self.name, pair), image=ImageSource(left), second_image=ImageSource(right),
                       meta={"image_id": pair, "captions": [], "statements": statements})

    @staticmethod
    def _statement(record: dict, path: str, line: int) -> tuple[str, dict]:
        identifier = str(require(record, "identifier", path, line=line))
        if identifier.count("-") < 3:
            raise AnnotationError(path, f"identifier {identifier!r} is not 'split-set-pair-sentence'",
                                  line=line, key="identifier")
        statement = {"identifier": identifier, "sentence": require(record, "sentence", path, line=line)}
        if record.get("label") is not None:
            label = LABELS.get(str(record["label"]).lower())
            if label is None:
                raise AnnotationError(path, f"label {record['label']!r} is neither True nor False", line=line,
                                      key="label")
            statement["label"] = label
        return identifier, statement
