"""Conceptual Captions 3M from its TSV (`caption<TAB>url`, no header; the row index is the id) and a folder
of downloaded images named `<row index>.<ext>`. Most users download with img2dataset instead: see
`img2dataset`."""
from __future__ import annotations

import os
from typing import Iterator

from managertower.data.formats.base import (SKIP_BAD_LINES, AnnotationError, Item, RawDataset, ReaderOption,
                                            dedupe_captions, iter_text_lines, sample_key)
from managertower.data.images import ImageSource

TSV_NAMES = {"train": "Train_GCC-training.tsv", "val": "Validation_GCC-1.1.0-Validation.tsv"}


class ConceptualCaptions(RawDataset):
    name = "cc3m"
    splits = ("train", "val")
    default_split = "train"
    layout = """
ROOT/Train_GCC-training.tsv               caption<TAB>url, no header; row index = id   (--split train)
ROOT/Validation_GCC-1.1.0-Validation.tsv                                               (--split val)
ROOT/images/<row index>.<ext>             the downloaded images (rows without a file count as missing)
"""

    reader_options = (
        ReaderOption("tsv", "the split's TSV file (default: see the layout)"),
        ReaderOption("images", "the folder of <row index>.<ext> images (default ROOT/images)"),
        SKIP_BAD_LINES,
    )

    def items(self) -> Iterator[Item]:
        tsv = self.find_file("tsv", [TSV_NAMES[self.split]], f"the CC3M {self.split} TSV")
        folder = self.option("images", os.path.join(self.root, "images"))
        by_row: dict[int, str] = {}
        if os.path.isdir(folder):
            with os.scandir(folder) as entries:
                for entry in entries:
                    stem = entry.name.split(".")[0]
                    if stem.isdigit() and not entry.name.endswith((".json", ".txt")):
                        by_row.setdefault(int(stem), entry.path)
        for number, line in iter_text_lines(tsv, self.bad_line):
            row = number - 1  # the row index is the id, also of the lines around a skipped one
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or not fields[0].strip():
                self.bad_line(AnnotationError(tsv, "expected 'caption<TAB>url'", line=number))
                continue
            path = by_row.get(row, os.path.join(folder, f"{row}.jpg"))
            yield Item(key=sample_key(self.name, f"{row:09d}"), image=ImageSource(path),
                       meta={"image_id": row, "captions": dedupe_captions([fields[0]]), "url": fields[1]})
