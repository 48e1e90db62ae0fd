"""Visual Genome region descriptions: one sample per image, its region phrases as captions, deduplicated.

VG repeats many phrases within an image ("white clouds in blue sky" a dozen times); the paper counts 4.8M
captions for 108K images after removing the duplicates.
"""
from __future__ import annotations

import os
from typing import Iterator

from managertower.data.formats.base import (Item, RawDataset, ReaderOption, dedupe_captions, load_json,
                                            normalize_caption, read_id_list, require, require_list, sample_key,
                                            index_image_files)
from managertower.data.images import ImageSource


class VisualGenome(RawDataset):
    name = "vg"
    splits = ("train",)
    default_split = "train"
    layout = """
ROOT/region_descriptions.json   [{"id", "regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}]
ROOT/image_data.json            [{"image_id", "url", "width", "height", "coco_id", "flickr_id"}]
ROOT/VG_100K/<image_id>.jpg and ROOT/VG_100K_2/<image_id>.jpg
"""

    reader_options = (
        ReaderOption("regions_file", "region_descriptions.json (default ROOT/region_descriptions.json)"),
        ReaderOption("image_data", "image_data.json (default ROOT/image_data.json)"),
        ReaderOption("regions", "also keep the region boxes (one per kept phrase), rescaled to the stored image",
                     kind="switch"),
        ReaderOption("exclude_coco_ids", "a file of COCO ids: VG images that are these COCO images are left out "
                                         "(e.g. the Karpathy val+test ids)"),
    )

    def items(self) -> Iterator[Item]:
        regions_path = self.find_file("regions_file", ["region_descriptions.json"], "region_descriptions.json")
        image_data_path = self.find_file("image_data", ["image_data.json"], "image_data.json")
        image_data = {}
        for position, record in enumerate(require_list(load_json(image_data_path), image_data_path, "[top level]")):
            image_data[require(record, "image_id", image_data_path, context=f" of [{position}]")] = record
        excluded_coco = read_id_list(self.option("exclude_coco_ids")) if self.option("exclude_coco_ids") else set()
        files = index_image_files([os.path.join(self.root, "VG_100K"), os.path.join(self.root, "VG_100K_2")])
        keep_regions = bool(self.option("regions", False))
        for position, entry in enumerate(require_list(load_json(regions_path), regions_path, "[top level]")):
            regions = require_list(require(entry, "regions", regions_path, context=f" of [{position}]"),
                                   regions_path, f"[{position}].regions")
            image_id = entry.get("id")
            if image_id is None and regions:
                image_id = require(regions[0], "image_id", regions_path, context=f" of [{position}].regions[0]")
            if image_id is None:
                continue  # an image without regions has nothing to say
            info = image_data.get(image_id, {})
            if excluded_coco and str(info.get("coco_id")) in excluded_coco:
                self.skipped["excluded"] += 1
                continue
            phrases = [require(region, "phrase", regions_path, context=f" of [{position}].regions") for region in regions]
            captions = dedupe_captions(phrases)
            meta = {"image_id": image_id, "captions": captions, "coco_id": info.get("coco_id")}
            if keep_regions:
                first_box: dict[str, list] = {}
                for region in regions:
                    first_box.setdefault(normalize_caption(str(region["phrase"])),
                                         [region.get("x", 0), region.get("y", 0),
                                          region.get("width", 0), region.get("height", 0)])
                meta["regions"] = [{"phrase": c, "box": first_box[normalize_caption(c)]} for c in captions]
            filename = f"{image_id}.jpg"
            path = files.get(filename, os.path.join(self.root, "VG_100K", filename))
            yield Item(key=sample_key(self.name, image_id), image=ImageSource(path), meta=meta)
