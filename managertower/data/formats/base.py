"""What every raw-dataset reader shares: the work item, the error type, and the annotation helpers.

A reader turns a dataset folder, as its owners ship it, into a list of `Item`s: one per output sample,
holding where the image(s) are and the sample's metadata, but no pixels. Reading annotations is cheap and
done up front by every `--part` alike, so the plan of which item goes into which shard is the same on
every machine; the expensive image work happens later in the workers.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

from managertower.data.images import ImageSource


class DataprepError(Exception):
    """A mistake the user can fix (a path, a flag, a file); printed as one line by `python -m dataprep`."""


class AnnotationError(DataprepError):
    """A missing, misplaced or malformed annotation file; the message names the file and the line or key."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None, key: str | None = None):
        where = str(path)
        if line is not None:
            where += f", line {line}"
        if key is not None:
            where += f", key {key!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.key = str(path), line, key


@dataclass
class Item:
    """One output sample before its images are read: `meta` becomes KEY.json once width/height are known."""

    key: str
    image: ImageSource
    meta: dict[str, Any]
    second_image: ImageSource | None = None  # NLVR2's right image, stored as KEY.img1.jpg


@dataclass
class Scan:
    items: list[Item]
    skipped: Counter = field(default_factory=Counter)  # annotation-level skips (excluded ids, no label, ...)
    captions: int = 0


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(*parts: Any) -> str:
    """A shard key from id parts: only [A-Za-z0-9_-], since '.' splits member names in webdataset and DALI."""
    return _KEY_UNSAFE.sub("_", "_".join(str(part) for part in parts))


def normalize_caption(text: str) -> str:
    """The form two captions are compared in when removing duplicates (case, spacing, final full stop)."""
    return " ".join(text.lower().split()).rstrip(" .")


def dedupe_captions(captions: Iterable[str]) -> list[str]:
    """Captions stripped of surrounding space, empty ones and repeats dropped, first spelling kept."""
    seen: set[str] = set()
    kept = []
    for caption in captions:
        caption = " ".join(str(caption).split())
        normal = normalize_caption(caption)
        if normal and normal not in seen:
            seen.add(normal)
            kept.append(caption)
    return kept


def load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    except json.JSONDecodeError as error:
        raise AnnotationError(path, f"not valid JSON ({error.msg}, column {error.colno})", line=error.lineno) from None
    except (OSError, UnicodeDecodeError) as error:
        raise AnnotationError(path, f"cannot be read ({error})") from None


def iter_json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; a bad line names its number."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(path, f"malformed JSON line ({error.msg})", line=number) from None
            if not isinstance(record, dict):
                raise AnnotationError(path, f"expected a JSON object, got {type(record).__name__}", line=number)
            yield number, record


def require(record: Any, key: str, path: str, line: int | None = None, context: str = "") -> Any:
    """record[key], or an AnnotationError naming the file, line and key (the usual wrong-layout symptom)."""
    if not isinstance(record, dict):
        raise AnnotationError(path, f"expected a JSON object{context}, got {type(record).__name__}", line=line)
    if key not in record:
        present = ", ".join(sorted(map(str, record))[:8]) or "none"
        raise AnnotationError(path, f"missing field{context} (fields present: {present}); is this the right file?",
                              line=line, key=key)
    return record[key]


def require_list(value: Any, path: str, key: str, line: int | None = None) -> list:
    if not isinstance(value, list):
        raise AnnotationError(path, f"expected a list, got {type(value).__name__}", line=line, key=key)
    return value


def index_image_files(folders: Iterable[str], recursive: bool = False) -> dict[str, str]:
    """File name -> path for every file under `folders` (the first folder wins on a clash).

    One directory listing replaces a stat per image, and finds images whatever sub-folder they sit in.
    """
    found: dict[str, str] = {}
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        if recursive:
            for directory, subdirs, files in os.walk(folder):
                subdirs.sort()
                for name in sorted(files):
                    found.setdefault(name, os.path.join(directory, name))
        else:
            with os.scandir(folder) as entries:
                for entry in sorted(entries, key=lambda e: e.name):
                    if not entry.is_dir():
                        found.setdefault(entry.name, entry.path)
    return found


def read_id_list(path: str) -> set[str]:
    """Ids to exclude: a JSON list or one id per line ('#' comments allowed); compared as strings."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise DataprepError(f"{path}: cannot read the id list ({error})") from None
    if text.lstrip().startswith("["):
        try:
            return {str(value) for value in json.loads(text)}
        except json.JSONDecodeError as error:
            raise AnnotationError(path, f"not a valid JSON list ({error.msg})", line=error.lineno) from None
    return {line.split("#")[0].strip() for line in text.splitlines()} - {""}


@dataclass(frozen=True)
class ReaderOption:
    """One setting of a reader beyond root and split, as data: `python -m dataprep` shows it as `--NAME`
    (underscores as dashes) and passes what the user gave as `options[name]`; an option not given is absent."""

    name: str  # the key in RawDataset.options, e.g. "regions_file" (--regions-file)
    help: str
    kind: str = "path"  # path: a file or folder; text; count: a whole number; paths: one or more; switch: on/off

    KINDS: ClassVar[tuple[str, ...]] = ("path", "text", "count", "paths", "switch")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"reader option {self.name}: kind {self.kind!r} is not one of {', '.join(self.KINDS)}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


class RawDataset:
    """Base of every reader. Subclasses set the class fields and implement `items()`.

    `options` are the reader's own settings (path overrides and switches, declared in `reader_options`),
    already plain values; a setting the user did not give is absent.
    """

    name: ClassVar[str]
    splits: ClassVar[tuple[str, ...]]
    default_split: ClassVar[str]
    layout: ClassVar[str]  # the folder layout it expects, shown by `python -m dataprep SOURCE --help`
    reader_options: ClassVar[tuple[ReaderOption, ...]] = ()

    def __init__(self, root: str | os.PathLike | None, split: str | None = None, exclude_ids: str | None = None,
                 **options: Any):
        self.root = str(root) if root is not None else ""
        self.split = split or self.default_split
        if self.split not in self.splits:
            raise DataprepError(f"{self.name}: unknown split {self.split!r}; choose one of {', '.join(self.splits)}")
        self.exclude_ids = read_id_list(exclude_ids) if exclude_ids else set()
        self.options = options
        self.skipped: Counter = Counter()

    # -- for subclasses ------------------------------------------------------------------------------
    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    def extra_files(self) -> dict[str, Any]:
        """JSON files to write beside the shards, {name: content} (e.g. VQAv2's answer_vocab.json).

        Computed with the scan, before any output exists, so a bad annotation still leaves nothing behind.
        """
        return {}

    # -- shared --------------------------------------------------------------------------------------
    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def find_file(self, option: str, candidates: Iterable[str], what: str) -> str:
        """The path a flag names, else the first candidate under ROOT that exists; a clear error otherwise."""
        given = self.option(option)
        if given is not None:
            if not os.path.exists(given):
                raise AnnotationError(given, f"{what} not found (given by --{option.replace('_', '-')})")
            return given
        candidates = [os.path.join(self.root, c) for c in candidates]
        for candidate in candidates:
            if os.path.exists(candidate):
                return candidate
        raise AnnotationError(candidates[0], f"{what} not found under --root {self.root} ({self.layout_hint()}, "
                              f"or name the file with --{option.replace('_', '-')})")

    def find_folder(self, option: str, candidates: Iterable[str], what: str) -> str:
        folder = self.find_file(option, candidates, what)
        if not os.path.isdir(folder):
            raise DataprepError(f"{folder}: {what} is not a folder")
        return folder

    def layout_hint(self) -> str:
        return f"`python -m dataprep {self.name} --help` shows the layout expected"

    def scan(self) -> Scan:
        """Every item of the split in annotation order, minus excluded ids (counted as 'excluded')."""
        items = []
        seen_keys: set[str] = set()
        for item in self.items():
            if self.exclude_ids and str(item.meta.get("image_id")) in self.exclude_ids:
                self.skipped["excluded"] += 1
                continue
            if item.key in seen_keys:
                raise DataprepError(f"{self.name}: two samples share the key {item.key!r}; the annotations "
                                    "list one image twice")
            seen_keys.add(item.key)
            item.meta.setdefault("key", item.key)
            item.meta.setdefault("source", self.name)
            item.meta.setdefault("split", self.split)
            item.meta.setdefault("captions", [])
            items.append(item)
        captions = sum(len(item.meta["captions"]) for item in items)
        return Scan(items=items, skipped=self.skipped, captions=captions)
