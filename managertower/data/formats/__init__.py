"""One reader per raw dataset, by the SOURCE name `python -m dataprep SOURCE` takes."""
from __future__ import annotations

from managertower.data.formats.base import AnnotationError, DataprepError, Item, RawDataset, ReaderOption, Scan
from managertower.data.formats.cc3m import ConceptualCaptions
from managertower.data.formats.img2dataset import Img2DatasetOutput
from managertower.data.formats.karpathy import CocoKarpathy, Flickr30kKarpathy
from managertower.data.formats.nlvr2 import NLVR2
from managertower.data.formats.sbu import SbuCaptions
from managertower.data.formats.snli_ve import SnliVE
from managertower.data.formats.vg import VisualGenome
from managertower.data.formats.vqav2 import VQAv2

READERS: dict[str, type[RawDataset]] = {reader.name: reader for reader in (
    CocoKarpathy, VisualGenome, ConceptualCaptions, SbuCaptions, Img2DatasetOutput, VQAv2, NLVR2, SnliVE,
    Flickr30kKarpathy)}

__all__ = ["READERS", "AnnotationError", "DataprepError", "Item", "RawDataset", "ReaderOption", "Scan"]
