"""img2dataset output: `00000.tar` (+ `.parquet`, `_stats.json`) with KEY.jpg, KEY.txt, KEY.json per sample.

Images are read straight out of the tars by offset, never extracted. Keys are img2dataset's 9-digit keys,
not contiguous (failed downloads are skipped), prefixed with --source-name (e.g. cc3m, sbu).
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from typing import Iterator

from managertower.data.formats.base import (AnnotationError, DataprepError, Item, RawDataset, ReaderOption,
                                            dedupe_captions, sample_key)
from managertower.data.images import ImageSource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class Img2DatasetOutput(RawDataset):
    name = "img2dataset"
    splits = ("train", "val")
    default_split = "train"
    layout = """
ROOT/00000.tar, ROOT/00001.tar, ...   img2dataset --output_format webdataset (sub-folders are searched too)
  each sample: KEY.jpg, KEY.txt (caption), KEY.json (url, caption, key, status, width, height, ...)
"""

    reader_options = (
        ReaderOption("source_name", "the dataset name written into the samples and keys (default img2dataset; "
                                    "e.g. cc3m or sbu)", kind="text"),
    )

    def items(self) -> Iterator[Item]:
        # The root is a folder, not a pattern: a `[` in its name must match itself.
        tars = sorted(glob.glob(os.path.join(glob.escape(self.root), "**", "*.tar"), recursive=True))
        if not tars:
            raise DataprepError(f"{self.root}: no img2dataset .tar files found; {self.layout_hint()}")
        source = self.option("source_name", self.name)
        for tar_path in tars:
            yield from self._tar_items(tar_path, source)

    def _tar_items(self, tar_path: str, source: str) -> Iterator[Item]:
        samples: dict[str, dict] = {}
        try:
            with tarfile.open(tar_path, "r") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = os.path.basename(member.name).partition(".")
                    sample = samples.setdefault(key, {})
                    if ext in IMAGE_EXTENSIONS:
                        sample["image"] = ImageSource(tar_path, member.offset_data, member.size)
                    elif ext in ("txt", "json"):
                        sample[ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as error:
            raise AnnotationError(tar_path, f"not a readable tar ({error})") from None
        for key, sample in samples.items():
            meta: dict = {}
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except json.JSONDecodeError as error:
                    raise AnnotationError(tar_path, f"malformed JSON in member {key}.json ({error.msg})", key=key) from None
            caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get("caption") or ""
            if "image" not in sample:
                self.skipped["missing"] += 1
                continue
            yield Item(key=sample_key(source, key), image=sample["image"],
                       meta={"image_id": key, "source": source, "captions": dedupe_captions([caption]),
                             "url": meta.get("url")})
