"""WebDataset shards: the one on-disk format between dataprep and the training pipelines.

A shard is `OUT/{split}-{index:06d}.tar` with a DALI index `OUT/{split}-{index:06d}.idx` beside it.
Each sample has the members

    KEY.jpg        RGB baseline JPEG (the image; for NLVR2 the left image, "img0")
    KEY.img1.jpg   NLVR2 only: the pair's right image
    KEY.json       metadata: {"key", "source", "split", "image_id", "width", "height", "captions": [...],
                   and the task fields: "questions" (VQAv2: [{"question_id", "question",
                   "answers": {answer: score}}]), "hypotheses" (SNLI-VE: [{"pair_id", "text",
                   "label"}]), "statements" (NLVR2: [{"identifier", "sentence", "label"}]), "regions"}

KEY holds no dot (webdataset and DALI both split the member name at the first dot of the base name).
A shard is written as `NAME.tar.tmp` and renamed when complete, so a crash never leaves a partial `NAME.tar`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..io import atomic_write

INDEX_VERSION = "v1.2"  # the format DALI's wds2idx writes and fn.readers.webdataset reads
PRIMARY_IMAGE = "jpg"
SECOND_IMAGE = "img1.jpg"
META = "json"


@dataclass
class ShardRecord:
    name: str
    samples: int
    captions: int
    bytes: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def index_path_for(tar_path: str | os.PathLike) -> str:
    tar_path = str(tar_path)
    return tar_path[: -len(".tar")] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class _OpenShard:
    """One tar being written, recording the DALI index entries as members are added."""

    def __init__(self, final_path: str):
        self.final_path = final_path
        self.tmp_path = final_path + ".tmp"
        self.tar = tarfile.open(self.tmp_path, "w", format=tarfile.USTAR_FORMAT)
        self.index: list[list[tuple[str, int, int, str]]] = []
        self.samples = 0
        self.captions = 0

    def add_sample(self, key: str, members: list[tuple[str, bytes]]) -> None:
        entry = []
        for ext, payload in members:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mtime = 0  # deterministic bytes: the same input gives the same sha256
            info.mode = 0o644
            header = info.tobuf(self.tar.format, self.tar.encoding, self.tar.errors)
            data_offset = self.tar.offset + len(header)
            self.tar.addfile(info, io.BytesIO(payload))
            entry.append((ext, data_offset, len(payload), name))
        self.index.append(entry)
        self.samples += 1

    def close(self) -> ShardRecord:
        self.tar.close()
        with open(self.tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        lines = [f"{INDEX_VERSION} {len(self.index)}"]
        lines += [" ".join(f"{ext} {off} {size} {name}" for ext, off, size, name in entry) for entry in self.index]
        atomic_write(index_path_for(self.final_path), "\n".join(lines) + "\n")
        os.replace(self.tmp_path, self.final_path)
        return ShardRecord(
            name=os.path.basename(self.final_path),
            samples=self.samples,
            captions=self.captions,
            bytes=os.path.getsize(self.final_path),
            sha256=sha256_file(self.final_path),
        )

    def abort(self) -> None:
        try:
            self.tar.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.remove(self.tmp_path)


class ShardWriter:
    """Writes samples into consecutive shards of `samples_per_shard`, atomically.

    `shard_indices` (optional) names the shard numbers to use in order: `--part I/N` hands each part
    a disjoint set so that N writers can fill one folder together.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, samples_per_shard: int = 1000,
                 shard_indices: Iterator[int] | None = None):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = str(out_dir)
        self.split = split
        self.samples_per_shard = samples_per_shard
        self._indices = iter(shard_indices) if shard_indices is not None else iter(range(10**6))
        self._open: _OpenShard | None = None
        self.records: list[ShardRecord] = []
        os.makedirs(self.out_dir, exist_ok=True)

    def write(self, key: str, image: bytes, meta: dict, extra_images: dict[str, bytes] | None = None) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._open is None:
            self._open = _OpenShard(os.path.join(self.out_dir, shard_name(self.split, next(self._indices))))
        members = [(PRIMARY_IMAGE, image)]
        for ext, payload in (extra_images or {}).items():
            members.append((ext, payload))
        members.append((META, json.dumps(meta, sort_keys=True).encode()))
        self._open.add_sample(key, members)
        self._open.captions += len(meta.get("captions", []))
        if self._open.samples >= self.samples_per_shard:
            self.flush()

    def flush(self) -> None:
        if self._open is not None:
            self.records.append(self._open.close())
            self._open = None

    def close(self) -> list[ShardRecord]:
        self.flush()
        return self.records

    def abort(self) -> None:
        if self._open is not None:
            self._open.abort()
            self._open = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class ShardError(FileNotFoundError):
    """A shard or its DALI index is missing, unreadable or not what a spec names; the message says the fix."""


def read_index(idx_path: str | os.PathLike) -> list[dict[str, tuple[int, int]]]:
    """Parse a DALI v1.2 index into one {ext: (offset, size)} dict per sample."""
    header, samples = _index_header(idx_path), []
    with open(idx_path) as handle:
        handle.readline()
        for line in handle:
            fields = line.split()
            if not fields:
                continue
            entry = {}
            for i in range(0, len(fields), 4):
                entry[fields[i]] = (int(fields[i + 1]), int(fields[i + 2]))
            samples.append(entry)
    if len(samples) != header:
        raise ShardError(f"{idx_path}: header says {header} samples, found {len(samples)}; rewrite it with "
                         f"`wds2idx` or rerun dataprep")
    return samples


def _index_header(idx_path: str | os.PathLike) -> int:
    """The sample count of a DALI index's header line (the only part a loader needs to plan)."""
    with open(idx_path) as handle:
        header = handle.readline().split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ShardError(f"{idx_path} is not a DALI {INDEX_VERSION} index (header {header}); rewrite it with "
                         "`wds2idx SHARD.tar SHARD.idx` (it ships with DALI) or rerun dataprep")
    return int(header[1])


def index_count(tar_path: str | os.PathLike) -> int:
    """Samples in one shard, from its DALI index; a missing shard or index is a ShardError with the fix."""
    tar_path, idx = str(tar_path), index_path_for(tar_path)
    if not os.path.exists(tar_path):
        raise ShardError(f"shard {tar_path} does not exist: run `python -m dataprep ...` to write it, or fix the "
                         "shard path")
    if not os.path.exists(idx):
        raise ShardError(f"DALI index {idx} is missing for shard {tar_path}: dataprep writes it beside every "
                         f"shard; for a shard made elsewhere run `wds2idx {tar_path} {idx}` (it ships with DALI)")
    return _index_header(idx)


def iter_metadata(paths: list[str]) -> Iterator[dict]:
    """Each sample's metadata dict, read through the DALI index (the image members are never read). A record
    that does not parse is skipped, as the loaders skip it."""
    for path in paths:
        index_count(path)  # the missing-shard / missing-index errors
        with open(path, "rb") as handle:
            for entry in read_index(index_path_for(path)):
                if META not in entry:
                    continue
                offset, size = entry[META]
                handle.seek(offset)
                try:
                    yield json.loads(handle.read(size))
                except ValueError:
                    continue


def iter_shard(tar_path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Yield the samples of one shard as {"__key__": key, ext: bytes, ...}, in order."""
    current: dict | None = None
    with tarfile.open(tar_path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = tar.extractfile(member).read()
    if current is not None:
        yield current


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard paths from a folder, a glob, a brace range (`train-{000000..000009}.tar`) or a list of them."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    paths: list[str] = []
    for item in specs:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(glob.escape(item), "*.tar")))
        elif "{" in item:
            import braceexpand

            found = [p for p in braceexpand.braceexpand(item)]
        else:
            found = sorted(glob.glob(item))
        paths.extend(found)
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise ShardError(f"shard {missing[0]} does not exist ({len(missing)} missing); "
                         "run `python -m dataprep ...` first or fix the shard path")
    if not paths:
        raise ShardError(f"no shards match {spec!r}: give a folder of .tar shards, a glob or a "
                         "brace range; `python -m dataprep` writes them")
    return paths


def resolve_shards(specs: list[str], key: str) -> list[str]:
    """The shard paths of a config entry (`key`, e.g. "task.train_shards"), with the key in every error."""
    if not specs:
        raise ShardError(f"{key} is empty: give the folders, globs or brace ranges `python -m dataprep` wrote, "
                         f"e.g. {key}=[shards/coco]")
    try:
        return expand_shards(list(specs))
    except ShardError as error:
        raise ShardError(f"{key}: {error}") from None


def resolve_datasets(specs: list[str], key: str) -> list[list[str]]:
    """One list of shard paths per entry of a config list whose entries are separate datasets (mixed by
    weights, as `data.train_shards`)."""
    return [resolve_shards([spec], key) for spec in specs] if specs else [resolve_shards(specs, key)]


def load_manifest(out_dir: str | os.PathLike) -> dict:
    with open(Path(out_dir) / "manifest.json") as handle:
        return json.load(handle)


def record_dict(record: ShardRecord) -> dict:
    return asdict(record)


REQUIRED_META_KEYS = ("key", "source", "split", "image_id", "width", "height", "captions")


def verify_shard(tar_path: str | os.PathLike, expected: ShardRecord | dict | None = None,
                 decode: bool = True) -> list[str]:
    """Problems found in one shard (an empty list when it is sound).

    Checks the DALI index against the tar byte for byte (offsets, sizes, member names), that every sample
    has its image and metadata, that the metadata parses and holds the required keys, that every image
    decodes as an RGB JPEG (`decode=True`), and, given the manifest's record, the sha256 and sample count.
    """
    from PIL import Image  # only verification decodes; writing shards never needs PIL here

    tar_path = str(tar_path)
    name = os.path.basename(tar_path)
    if not os.path.exists(tar_path):
        return [f"{name}: missing"]
    expected = asdict(expected) if isinstance(expected, ShardRecord) else expected
    problems: list[str] = []
    if expected is not None and sha256_file(tar_path) != expected.get("sha256"):
        problems.append(f"{name}: sha256 differs from the manifest (the shard was modified or truncated)")
    if not os.path.exists(index_path_for(tar_path)):
        return problems + [f"{name}: DALI index {os.path.basename(index_path_for(tar_path))} is missing"]
    try:
        index = read_index(index_path_for(tar_path))
    except (ShardError, ValueError) as error:
        return problems + [f"{name}: {error}"]
    try:
        with tarfile.open(tar_path, "r") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
            order: list[str] = []
            for member in members:
                key, _, ext = os.path.basename(member.name).partition(".")
                if key not in by_key:
                    by_key[key] = {}
                    order.append(key)
                by_key[key][ext] = member
            if len(order) != len(index):
                problems.append(f"{name}: index lists {len(index)} samples, the tar holds {len(order)}")
            if expected is not None and expected.get("samples") != len(order):
                problems.append(f"{name}: manifest says {expected.get('samples')} samples, the tar holds {len(order)}")
            for key, entry in zip(order, index):
                sample = by_key[key]
                for ext, (offset, size) in entry.items():
                    member = sample.get(ext)
                    if member is None or member.offset_data != offset or member.size != size:
                        problems.append(f"{name}: index entry {key}.{ext} does not match the tar")
                if PRIMARY_IMAGE not in sample or META not in sample:
                    problems.append(f"{name}: sample {key} lacks its .{PRIMARY_IMAGE} or .{META} member")
                    continue
                try:
                    meta = json.loads(tar.extractfile(sample[META]).read())
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problems.append(f"{name}: {key}.json is not valid JSON")
                    continue
                missing = [k for k in REQUIRED_META_KEYS if k not in meta]
                if missing:
                    problems.append(f"{name}: {key}.json lacks {', '.join(missing)}")
                if "statements" in meta and SECOND_IMAGE not in sample:
                    problems.append(f"{name}: NLVR2 sample {key} lacks {key}.{SECOND_IMAGE}")
                if decode:
                    for ext in (PRIMARY_IMAGE, SECOND_IMAGE):
                        if ext not in sample:
                            continue
                        try:
                            with Image.open(io.BytesIO(tar.extractfile(sample[ext]).read())) as image:
                                image.load()
                                if image.format != "JPEG" or image.mode != "RGB":
                                    problems.append(f"{name}: {key}.{ext} is {image.format} {image.mode}, not an RGB JPEG")
                        except Exception as error:  # any decoder failure is the finding itself
                            problems.append(f"{name}: {key}.{ext} does not decode ({error})")
    except (tarfile.TarError, OSError, EOFError) as error:
        problems.append(f"{name}: not a readable tar ({error})")
    return problems
