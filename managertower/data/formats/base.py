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
from typing import Any, Callable, ClassVar, Iterable, Iterator

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
        self.path, self.message, self.line, self.key = str(path), message, line, key


# What a reader does with one malformed line of a line-oriented file: raise it (the default) or count it.
BadLine = Callable[[AnnotationError], None]


def _raise(error: AnnotationError) -> None:
    raise error


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


_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what errors="surrogateescape" makes of a byte that is not UTF-8


def not_utf8(path: str, text: str, line: int) -> AnnotationError | None:
    """The error naming the first byte of `text` (read with read_text / iter_text_lines) that is not UTF-8."""
    bad = _UNDECODABLE.search(text)
    if bad is None:
        return None
    byte = ord(bad.group()) - 0xDC00
    return AnnotationError(path, f"not UTF-8 text (byte 0x{byte:02x} at column {bad.start() + 1}); save the file "
                           "as UTF-8", line=line)


def _open_text(path: str):
    """The file as text whose undecodable bytes survive as lone surrogates, so each is found on its line
    (a plain UTF-8 read fails with a traceback somewhere in the middle, naming neither)."""
    try:
        return open(path, encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise AnnotationError(path, "file not found") from None
    except OSError as error:
        raise AnnotationError(path, f"cannot be read ({error})") from None


def read_text(path: str) -> str:
    """A whole text file; bytes that are not UTF-8 come back as lone surrogates for not_utf8 to name."""
    with _open_text(path) as handle:
        try:
            return handle.read()
        except OSError as error:
            raise AnnotationError(path, f"cannot be read ({error})") from None


def _require_utf8(path: str, text: str) -> None:
    bad = _UNDECODABLE.search(text)
    if bad is not None:
        line_start = text.rfind("\n", 0, bad.start()) + 1
        raise not_utf8(path, text[line_start:bad.end()], text.count("\n", 0, bad.start()) + 1)


def load_json(path: str) -> Any:
    text = read_text(path)
    _require_utf8(path, text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise AnnotationError(path, f"not valid JSON ({error.msg}, column {error.colno})", line=error.lineno) from None


def iter_text_lines(path: str, on_bad_line: BadLine = _raise) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 text file (newline kept); a line that is not UTF-8 is an
    AnnotationError naming the file, line and column, handed to `on_bad_line` (which raises, or counts it)."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            error = not_utf8(path, line, number)
            if error is not None:
                on_bad_line(error)
                continue
            yield number, line


def iter_json_lines(path: str, on_bad_line: BadLine = _raise) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSON-lines file; a bad line (not UTF-8, not JSON,
    not an object) is an AnnotationError naming its number, handed to `on_bad_line`."""
    for number, line in iter_text_lines(path, on_bad_line):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            on_bad_line(AnnotationError(path, f"malformed JSON line ({error.msg})", line=number))
            continue
        if not isinstance(record, dict):
            on_bad_line(AnnotationError(path, f"expected a JSON object, got {type(record).__name__}", line=number))
            continue
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
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            text = handle.read()
    except OSError as error:
        raise DataprepError(f"{path}: cannot read the id list ({error})") from None
    _require_utf8(path, text)
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


# The switch line-oriented readers (CC3M TSV, SBU text, NLVR2 / SNLI-VE JSON lines) add to reader_options.
SKIP_BAD_LINES = ReaderOption("skip_bad_lines", "skip malformed annotation lines (not UTF-8, not JSON, fields "
                              "missing), counting them in the manifest and the summary, instead of stopping",
                              kind="switch")
MAX_BAD_LINES_SHOWN = 10


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
        self.bad_lines: list[str] = []  # the first few lines --skip-bad-lines skipped, for the summary

    # -- for subclasses ------------------------------------------------------------------------------
    def items(self) -> Iterator[Item]:
        raise NotImplementedError

    def notes(self) -> dict[str, Any]:
        """Facts about this run's extra files for the run manifest and the summary (VQAv2: the answer
        vocabulary's size)."""
        return {}

    def extra_files(self) -> dict[str, Any]:
        """JSON files to write beside the shards, {name: content} (e.g. VQAv2's answer_vocab.json).

        Computed with the scan, before any output exists, so a bad annotation still leaves nothing behind.
        """
        return {}

    # -- shared --------------------------------------------------------------------------------------
    def bad_line(self, error: AnnotationError) -> None:
        """One malformed line of a line-oriented annotation file: the run stops on it, naming file and line,
        unless the reader offers --skip-bad-lines and it was given: then it is counted (skipped: bad_line)
        and the first few are named in the summary."""
        offered = any(option.name == SKIP_BAD_LINES.name for option in self.reader_options)
        if not offered or not self.option(SKIP_BAD_LINES.name):
            if offered:
                raise AnnotationError(error.path, f"{error.message} (--skip-bad-lines skips and counts such lines)",
                                      line=error.line, key=error.key) from None
            raise error
        self.skipped["bad_line"] += 1
        if len(self.bad_lines) < MAX_BAD_LINES_SHOWN:
            self.bad_lines.append(str(error))

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
