"""SBU Captions: `sbu-captions-all.json` (parallel lists) or the older two line-aligned text files; images
are named by the file name of their URL."""
from __future__ import annotations

import os
from typing import Iterator

from managertower.data.formats.base import (SKIP_BAD_LINES, AnnotationError, Item, RawDataset, ReaderOption,
                                            dedupe_captions, index_image_files, load_json, not_utf8, read_text,
                                            require, sample_key)
from managertower.data.images import ImageSource

URLS_TXT = "SBU_captioned_photo_dataset_urls.txt"
CAPTIONS_TXT = "SBU_captioned_photo_dataset_captions.txt"


class SbuCaptions(RawDataset):
    name = "sbu"
    splits = ("train",)
    default_split = "train"
    layout = f"""
ROOT/sbu-captions-all.json    {{"image_urls": [...], "captions": [...], "user_ids": [...]}} (parallel lists)
  or ROOT/{URLS_TXT} + ROOT/{CAPTIONS_TXT} (line-aligned)
ROOT/images/<URL file name>   e.g. images/4385058960_b0f291553e.jpg (sub-folders are searched too)
"""

    reader_options = (
        ReaderOption("annotations", "sbu-captions-all.json (default ROOT/sbu-captions-all.json)"),
        ReaderOption("images", "the images folder (default ROOT/images)"),
        SKIP_BAD_LINES,
    )

    def _pairs(self) -> list[tuple[str, str]]:
        given = self.option("annotations")
        json_path = given or os.path.join(self.root, "sbu-captions-all.json")
        if given or os.path.exists(json_path):
            data = load_json(json_path)
            urls, captions = require(data, "image_urls", json_path), require(data, "captions", json_path)
            if not isinstance(urls, list) or not isinstance(captions, list) or len(urls) != len(captions):
                raise AnnotationError(json_path, "'image_urls' and 'captions' must be lists of the same length")
            return list(zip(urls, captions))
        urls_path, captions_path = os.path.join(self.root, URLS_TXT), os.path.join(self.root, CAPTIONS_TXT)
        if not os.path.exists(urls_path):
            raise AnnotationError(json_path, f"file not found (nor {URLS_TXT}); {self.layout_hint()}")
        for path in (urls_path, captions_path):
            if not os.path.exists(path):
                raise AnnotationError(path, "file not found")
        # A URL line that is not UTF-8 stays in the list (as None) so the two files stay aligned.
        urls = [url if self._utf8_line(urls_path, url, number) else None
                for number, url in enumerate(read_text(urls_path).splitlines(), start=1)]
        with open(captions_path, encoding="utf-8", errors="replace") as c:
            captions = c.read().splitlines()
        if len(urls) != len(captions):
            raise AnnotationError(captions_path, f"has {len(captions)} lines but {URLS_TXT} has {len(urls)}; "
                                  "the two files must be line-aligned", line=min(len(urls), len(captions)) + 1)
        return [(url, caption) for url, caption in zip(urls, captions) if url is not None]

    def _utf8_line(self, path: str, text: str, number: int) -> bool:
        error = not_utf8(path, text, number)
        if error is not None:
            self.bad_line(error)
        return error is None

    def items(self) -> Iterator[Item]:
        pairs = self._pairs()
        folder = self.option("images", os.path.join(self.root, "images"))
        files = index_image_files([folder], recursive=True)
        for url, caption in pairs:
            filename = url.strip().rstrip("/").rsplit("/", 1)[-1]
            if not filename:
                continue
            stem = os.path.splitext(filename)[0]
            yield Item(key=sample_key(self.name, stem), image=ImageSource(files.get(filename, os.path.join(folder, filename))),
                       meta={"image_id": stem, "captions": dedupe_captions([caption]), "url": url.strip()})
