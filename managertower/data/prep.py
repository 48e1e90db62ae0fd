"""The dataprep driver: raw dataset -> shuffled, verified WebDataset shards with a manifest.

    prepare("coco", root="raw/coco", out="shards/coco", split="train", workers=8)

1. The reader scans the annotations (cheap, no pixels) into a list of items; a bad annotation raises
   AnnotationError before anything is written.
2. The items are shuffled with the seed and cut into a fixed plan: shard j holds items
   [j*S, (j+1)*S). Every `--part I/N` computes the same plan and writes the shards j with j % N == I, so
   N machines fill one folder with disjoint names. A shard loses the items whose images are bad, so it may
   hold fewer than S samples; in exchange the plan never depends on what another worker found.
3. Workers decode, sanitise and re-encode the images and write each shard under a temporary name, then
   rename it and leave a completion record (`OUT/.dataprep/shards/`). `--resume` keeps the shards whose
   record matches the plan and whose sha256 still matches, and redoes the rest.
4. Each run writes its own manifest (`OUT/.dataprep/runs/{split}.part-I-of-N.json`); the merged
   `OUT/manifest.json` and `OUT/sizes.json` are rebuilt from all run manifests in the folder.

Nothing is deleted without asking: before any image is read, OUT is checked for shards this run would
replace or delete (another source's, another plan's, or shards no dataprep record knows), and the run
stops with OutputConflictError unless `overwrite=True`. Parts record their plan fingerprint, and a merge
of parts cut to different plans fails with PlanMismatchError naming them. Paths are never glob patterns
here: a folder named `out[1]` is that folder.
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import json
import numbers
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Any, Callable

from managertower.data.formats import READERS, DataprepError, Item
from managertower.io import atomic_write_json
from managertower.data.images import DEFAULT_MAX_SIDE, DEFAULT_QUALITY, EncodedImage, ImageRejected, load_image
from managertower.data.shards import (SECOND_IMAGE, ShardWriter, index_path_for, read_index,
                                      sha256_file, shard_name, verify_shard)

MANIFEST = "manifest.json"
SIZES = "sizes.json"
STATE_DIR = ".dataprep"
MANIFEST_FORMAT = 1
_SHARD_FILE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")


# Reader options that change what a run reports, not which items it plans (their effect on the plan is
# already in the item keys): left out of the plan fingerprint.
RUN_ONLY_OPTIONS = frozenset({"skip_bad_lines"})
JPEG_QUALITY_RANGE = (1, 100)  # libjpeg clamps anything else into this range; PIL advises at most 95


class WorkerDiedError(DataprepError):
    """A worker process was killed (OOM killer, SIGKILL, a node going down) in the middle of a shard."""


class OutputConflictError(DataprepError):
    """OUT holds shards this run would replace or delete: another source's, another plan's, or unknown ones."""


class PlanMismatchError(DataprepError):
    """Runs of one split in OUT were cut to different plans (seed, shard size, annotations, image settings)."""


def _whole_number(flag: str, value: Any, minimum: int | None = None) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise DataprepError(f"{flag} must be a whole number{bound}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class PrepSettings:
    """The numbers of one run, checked before anything is read or written: a wrong one is one DataprepError
    line naming the flag (the door only passes the values on)."""

    workers: int = 1
    samples_per_shard: int = 1000
    max_image_side: int | None = DEFAULT_MAX_SIDE  # None or 0: every image keeps its size
    quality: int = DEFAULT_QUALITY
    seed: int = 0
    part: tuple[int, int] = (0, 1)

    def __post_init__(self) -> None:
        _whole_number("--workers", self.workers, 1)
        _whole_number("--samples-per-shard", self.samples_per_shard, 1)
        if self.max_image_side is not None:
            side = _whole_number("--max-image-side", self.max_image_side)
            if side < 0:
                raise DataprepError(f"--max-image-side must be the longer side in pixels (>= 1), or 0 to keep "
                                    f"every image's size; got {side}")
            object.__setattr__(self, "max_image_side", side or None)
        low, high = JPEG_QUALITY_RANGE
        quality = _whole_number("--quality", self.quality)
        if not low <= quality <= high:
            raise DataprepError(f"--quality must be a JPEG quality from {low} to {high} (PIL advises at most 95), "
                                f"got {quality}")
        _whole_number("--seed", self.seed)
        part = parse_part(self.part) if isinstance(self.part, str) else tuple(self.part)
        if len(part) != 2:
            raise DataprepError(f"--part {self.part!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        parse_part(f"{_whole_number('--part I', part[0])}/{_whole_number('--part N', part[1])}")
        object.__setattr__(self, "part", (int(part[0]), int(part[1])))


@dataclass
class ShardTask:
    out: str
    split: str
    index: int
    items: list[Item]
    max_image_side: int | None
    quality: int
    plan: str  # fingerprint of the whole plan; a completion record only counts for the same plan


@dataclass
class ShardResult:
    index: int
    record: dict | None  # None when every item of the shard was skipped
    skipped: dict[str, int]
    images: int
    kept_from_previous_run: bool = False


# ---------------------------------------------------------------------------------------------------------
# Worker side: one shard per task.

_progress_tick: Callable[[int], None] = lambda n: None
_worker_parent: int | None = None  # the parent pid a worker started under; None in the driver itself
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(counter, driver_pid: int) -> None:
    global _progress_tick

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _progress_tick = tick
    _end_with_parent(driver_pid)


def _end_with_parent(driver_pid: int) -> None:
    """A worker must not outlive its driver: a driver killed with SIGKILL (OOM killer, scancel) used to leave
    its workers writing shards nobody records, then blocked forever on a queue nobody reads. On Linux the
    kernel kills the worker when its parent dies (PR_SET_PDEATHSIG); everywhere, the worker checks before
    each item that it still has the parent it started under."""
    global _worker_parent
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl in this libc: the parent check below still ends us
            pass
    _worker_parent = os.getppid()
    if not _process_alive(driver_pid):  # the driver died before prctl took effect
        os._exit(1)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:  # a killed driver stays a zombie until its parent reaps it
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _exit_if_orphaned() -> None:
    if _worker_parent is not None and os.getppid() != _worker_parent:
        os._exit(1)  # the driver is gone: nobody would record this shard; --resume redoes it


def _state_path(out: str, *parts: str) -> str:
    return os.path.join(out, STATE_DIR, *parts)


def _done_record_path(out: str, split: str, index: int) -> str:
    return _state_path(out, "shards", shard_name(split, index)[: -len(".tar")] + ".json")


def _rescale_regions(regions: list[dict], image: EncodedImage) -> list[dict]:
    """Region boxes come in original pixels; the shard stores a possibly downsized image."""
    sx, sy = image.width / image.original_width, image.height / image.original_height
    return [dict(region, box=[round(region["box"][0] * sx, 1), round(region["box"][1] * sy, 1),
                              round(region["box"][2] * sx, 1), round(region["box"][3] * sy, 1)])
            for region in regions]


def encode_item(item: Item, max_image_side: int | None, quality: int = DEFAULT_QUALITY
                ) -> tuple[bytes, dict, dict[str, bytes]]:
    """(JPEG, metadata, extra images) of one item; raises ImageRejected with the reason to count."""
    image = _load(item.image, max_image_side, quality)
    meta = dict(item.meta, width=image.width, height=image.height)
    extra: dict[str, bytes] = {}
    if item.second_image is not None:
        second = _load(item.second_image, max_image_side, quality)
        extra[SECOND_IMAGE] = second.jpeg
        meta.update(img1_width=second.width, img1_height=second.height)
    if meta.get("regions"):
        meta["regions"] = _rescale_regions(meta["regions"], image)
    return image.jpeg, meta, extra


def _load(source, max_image_side, quality) -> EncodedImage:
    try:
        return load_image(source, max_side=max_image_side, quality=quality)
    except ImageRejected:
        raise
    except Exception as error:  # a decoder bug on one odd file must cost one image, not the run
        raise ImageRejected("undecodable", f"{type(error).__name__}: {error}") from None


def write_shard(task: ShardTask) -> ShardResult:
    skipped: Counter = Counter()
    images = 0
    writer = ShardWriter(task.out, task.split, samples_per_shard=max(1, len(task.items)),
                         shard_indices=[task.index])
    try:
        for item in task.items:
            _exit_if_orphaned()
            try:
                jpeg, meta, extra = encode_item(item, task.max_image_side, task.quality)
            except ImageRejected as rejected:
                skipped[rejected.reason] += 1
            else:
                writer.write(item.key, jpeg, meta, extra)
                images += 1 + len(extra)
            _progress_tick(1)
        records = writer.close()
    except BaseException:
        writer.abort()
        raise
    record = asdict(records[0]) if records else None
    if record is None:  # every item skipped: no tar, and an old one from another plan must not linger
        tar_path = os.path.join(task.out, shard_name(task.split, task.index))
        for path in (tar_path, index_path_for(tar_path)):
            if os.path.exists(path):
                os.remove(path)
    result = ShardResult(task.index, record, dict(skipped), images)
    atomic_write_json(_done_record_path(task.out, task.split, task.index),
                      {"plan": task.plan, "record": record, "skipped": dict(skipped), "images": images}, sort_keys=True)
    return result


# ---------------------------------------------------------------------------------------------------------
# Driver side.

def parse_part(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise DataprepError(f"--part {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match.group(1)), int(match.group(2))


def plan_shards(items: list[Item], samples_per_shard: int, seed: int) -> list[list[Item]]:
    """The shuffled plan every part agrees on: DALI and webdataset only shuffle inside a buffer, so the
    global shuffle across shards happens here, once."""
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[start:start + samples_per_shard] for start in range(0, len(shuffled), samples_per_shard)]


def _plan_fingerprint(source: str, split: str, plan: list[list[Item]], settings: dict) -> str:
    settings = dict(settings, options={name: value for name, value in settings["options"].items()
                                       if name not in RUN_ONLY_OPTIONS})
    digest = hashlib.sha256(json.dumps([source, split, settings], sort_keys=True, default=str).encode())
    for shard in plan:
        digest.update(b"|")
        for item in shard:
            digest.update(item.key.encode() + b",")
    return digest.hexdigest()[:16]


def _kept_shard(out: str, split: str, index: int, plan: str) -> ShardResult | None:
    """The result of a finished shard of the same plan whose bytes still match its record, else None."""
    try:
        with open(_done_record_path(out, split, index)) as handle:
            done = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    if done.get("plan") != plan:
        return None
    record = done.get("record")
    if record is not None:
        tar_path = os.path.join(out, record["name"])
        try:
            if sha256_file(tar_path) != record["sha256"] or len(read_index(index_path_for(tar_path))) != record["samples"]:
                return None
        except (OSError, ValueError):
            return None
    return ShardResult(index, record, done.get("skipped", {}), done.get("images", 0), kept_from_previous_run=True)


def _in_folder(folder: str, pattern: str) -> list[str]:
    """glob inside a literal folder: `[`, `]`, `*` and `?` in the folder's own name match themselves."""
    return glob.glob(os.path.join(glob.escape(folder), pattern))


def _remove_stale_outputs(out: str, split: str, planned_shards: int, own: list[int]) -> None:
    """Shards of this split beyond the plan (a previous, bigger run) and our own half-written temp files.
    Called after _out_conflicts: what it removes is this plan's, or what the user let go with overwrite."""
    for path in _in_folder(out, f"{glob.escape(split)}-*.tar*"):
        match = _SHARD_FILE.match(os.path.basename(path).removesuffix(".tmp"))
        if match and match.group("split") == split and int(match.group("index")) >= planned_shards:
            os.remove(path)
            for extra in (index_path_for(path.removesuffix(".tmp")),
                          _done_record_path(out, split, int(match.group("index")))):
                if os.path.exists(extra):
                    os.remove(extra)
    for index in own:
        tmp = os.path.join(out, shard_name(split, index) + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)


def _run_tasks(tasks: list[ShardTask], workers: int, bar) -> list[ShardResult]:
    global _progress_tick
    if workers <= 1 or len(tasks) <= 1:
        _progress_tick = bar.update
        try:
            return [write_shard(task) for task in tasks]
        finally:
            _progress_tick = lambda n: None
    import multiprocessing

    counter = multiprocessing.Value("q", 0)
    results = []
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), initializer=_init_worker,
                             initargs=(counter, os.getpid())) as pool:
        pending = {pool.submit(write_shard, task) for task in tasks}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                bar.update(counter.value - (bar.n - bar.initial_count))
                for future in finished:
                    results.append(future.result())
        except BrokenProcessPool:
            raise WorkerDiedError(
                f"a worker process died (killed, or out of memory) while writing shards; the {len(results)} "
                "finished shards of this run are kept: rerun the same command with --resume") from None
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return results


class _Bar:
    """tqdm when asked for, a silent counter otherwise (tests, --quiet)."""

    def __init__(self, total: int, initial: int, show: bool, description: str):
        self.initial_count = initial
        self.n = initial
        self._tqdm = None
        if show:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, initial=initial, unit="img", desc=description, dynamic_ncols=True,
                              smoothing=0.1)

    def update(self, count: int) -> None:
        if count > 0:
            self.n += count
            if self._tqdm is not None:
                self._tqdm.update(count)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()


def prepare(source: str, root: str | os.PathLike | None, out: str | os.PathLike, split: str | None = None, *,
            workers: int = 1, samples_per_shard: int = 1000, max_image_side: int | None = DEFAULT_MAX_SIDE,
            part: tuple[int, int] | str = (0, 1), resume: bool = False, seed: int = 0,
            quality: int = DEFAULT_QUALITY, overwrite: bool = False, progress: bool = True,
            summary: bool = True, command: str | None = None, **options: Any) -> dict:
    """Shard one split of one raw dataset into OUT; returns this run's manifest.

    `options` are the reader's own flags as plain values (e.g. annotations=..., images=..., exclude_ids=...).
    Raises DataprepError (AnnotationError for bad annotations) before writing anything when the input is
    wrong; OutputConflictError, before writing anything, when OUT holds shards this run would replace or
    delete (another source's, another plan's, unknown ones) unless `overwrite` (which deletes them first);
    PlanMismatchError when another part of this split finished meanwhile with a different plan;
    WorkerDiedError when a worker is killed (the finished shards stay for --resume).
    """
    started = time.time()
    if source not in READERS:
        raise DataprepError(f"unknown source {source!r}; choose one of {', '.join(READERS)}")
    checked = PrepSettings(workers=workers, samples_per_shard=samples_per_shard, max_image_side=max_image_side,
                           quality=quality, seed=seed, part=part)
    workers, samples_per_shard, max_image_side = checked.workers, checked.samples_per_shard, checked.max_image_side
    quality, seed, (part_index, part_count) = checked.quality, checked.seed, checked.part
    out = str(out)

    reader = READERS[source](root, split, **options)
    scan = reader.scan()
    extras = reader.extra_files()
    notes = reader.notes()
    split = reader.split
    if not scan.items:
        raise DataprepError(f"{source} {split}: the annotations under {reader.root or '--root'} list no samples "
                            f"(skipped: {dict(scan.skipped) or 'none'})")
    plan = plan_shards(scan.items, samples_per_shard, seed)
    settings = {"seed": seed, "samples_per_shard": samples_per_shard, "max_image_side": max_image_side,
                "quality": quality, "options": options}
    fingerprint = _plan_fingerprint(source, split, plan, settings)
    own = [index for index in range(len(plan)) if index % part_count == part_index]

    conflicts, kept = _prepare_output(out, source, split, fingerprint, settings, len(plan), own, overwrite, resume)
    tasks = [ShardTask(out, split, index, plan[index], max_image_side, quality, fingerprint)
             for index in own if index not in kept]
    total_items = sum(len(plan[index]) for index in own)
    bar = _Bar(total_items, sum(len(plan[i]) for i in kept), progress, f"{source} {split}")
    try:
        results = list(kept.values()) + _run_tasks(tasks, workers, bar)
    finally:
        bar.close()
    results.sort(key=lambda result: result.index)

    skipped: Counter = Counter(scan.skipped if part_index == 0 else {})  # annotation-level skips: counted once
    for result in results:
        skipped.update(result.skipped)
    records = [result.record for result in results if result.record is not None]
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "split": split,
        "part": [part_index, part_count],
        "command": command or f"prepare({source!r}, root={reader.root!r}, out={out!r}, split={split!r})",
        "settings": settings,
        "plan": fingerprint,
        "planned_shards": len(plan),
        "planned_items": sum(len(plan[index]) for index in own),
        "samples": sum(record["samples"] for record in records),
        "images": sum(result.images for result in results),
        "captions": sum(record["captions"] for record in records),
        "skipped": dict(sorted(skipped.items())),
        "shards": records,
        "kept_from_previous_run": sorted(kept),
        "overwritten": [conflict.what for conflict in conflicts],
        "bad_lines": reader.bad_lines,  # the first few annotation lines --skip-bad-lines skipped
        "extras": sorted(extras),
        "notes": notes,
        "elapsed_s": round(time.time() - started, 3),
    }
    merged = _publish(out, split, part_count, manifest, extras)
    if summary:
        for conflict in conflicts:
            print(f"--overwrite: deleted {conflict.what}")
        _print_summary(manifest, merged, scan.skipped.get("bad_line", 0))
    return manifest


def _prepare_output(out: str, source: str, split: str, fingerprint: str, settings: dict, planned_shards: int,
                    own: list[int], overwrite: bool, resume: bool) -> tuple[list["_Conflict"], dict[int, ShardResult]]:
    """Make OUT ready for this part: refuse (or, with `overwrite`, delete) what it must not replace, drop this
    plan's stale files, and with `resume` keep the shards already done. Returns (conflicts deleted, kept)."""
    conflicts = _out_conflicts(out, source, split, fingerprint, settings, planned_shards, own)
    if conflicts and not overwrite:
        raise OutputConflictError(_conflict_message(out, source, split, conflicts, resume))
    for path in sorted({path for conflict in conflicts for path in conflict.paths}):
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(out, exist_ok=True)
    _remove_stale_outputs(out, split, planned_shards, own)
    kept = {}
    if resume:
        for index in own:
            result = _kept_shard(out, split, index, fingerprint)
            if result is not None:
                kept[index] = result
    return conflicts, kept


def _publish(out: str, split: str, part_count: int, manifest: dict, extras: dict) -> dict:
    """Write the reader's extra files and this part's run manifest, then merge every part's into manifest.json
    (under the folder lock: parts finish concurrently). Returns the merged manifest."""
    part_index = manifest["part"][0]
    with _folder_lock(out):
        for name, content in extras.items():
            atomic_write_json(os.path.join(out, name), content, sort_keys=True)
        atomic_write_json(_state_path(out, "runs", f"{split}.part-{part_index:04d}-of-{part_count:04d}.json"),
                          manifest, sort_keys=True)
        for stale in _in_folder(_state_path(out, "runs"), f"{glob.escape(split)}.part-*-of-*.json"):
            if not stale.endswith(f"-of-{part_count:04d}.json"):  # a previous run cut into a different N
                os.remove(stale)
        return write_merged_manifest(out)


def _print_summary(manifest: dict, merged: dict, bad_lines: int) -> None:
    (part_index, part_count), source, split = manifest["part"], manifest["source"], manifest["split"]
    print(format_summary([manifest], title=f"dataprep {source} {split} part {part_index}/{part_count}"))
    for name, value in manifest["notes"].items():
        print(f"  {name}: {value}")
    if bad_lines:
        print(f"  --skip-bad-lines: skipped {bad_lines} malformed annotation line(s); the first: "
              f"{manifest['bad_lines'][0]}")
    if part_count > 1 and not merged["complete"]:
        print(f"  {len(merged['missing_parts'])} part(s) of this folder still to run; manifest.json "
              "is merged again when each part finishes")


# ---------------------------------------------------------------------------------------------------------
# What OUT already holds: nothing is replaced or deleted without `overwrite`.

@dataclass
class _Conflict:
    what: str  # a phrase for the one-line error, e.g. "coco shards (split train, 3 shards)"
    paths: list[str]  # the files `overwrite` deletes


def _settings_difference(theirs: dict | None, ours: dict) -> str:
    """Why two plans differ, in the flags' words: "--seed 0 there, 7 here; ..."."""
    theirs = theirs or {}
    differences = []
    for name in ("seed", "samples_per_shard", "max_image_side", "quality"):
        if theirs.get(name) != ours.get(name):
            differences.append(f"--{name.replace('_', '-')} {theirs.get(name)} there, {ours.get(name)} here")
    their_options, our_options = theirs.get("options") or {}, ours.get("options") or {}
    for name in sorted(set(their_options) | set(our_options)):
        if name not in RUN_ONLY_OPTIONS and their_options.get(name) != our_options.get(name):
            differences.append(f"--{name.replace('_', '-')} {their_options.get(name)} there, "
                               f"{our_options.get(name)} here")
    return "; ".join(differences) or "the same settings over different annotations"


def _shard_files(out: str, name: str) -> list[str]:
    """A shard's tar, its DALI index and its completion record."""
    tar_path = os.path.join(out, name)
    return [tar_path, index_path_for(tar_path), _state_path(out, "shards", name.removesuffix(".tar") + ".json")]


def _out_conflicts(out: str, source: str, split: str, fingerprint: str, settings: dict, planned_shards: int,
                   own: list[int]) -> list[_Conflict]:
    """What in OUT this run would replace or delete without being its own plan's: run manifests of another
    source (any split: one folder holds one source), run manifests and unfinished shards of this split cut
    to another plan, and shards of this split that no dataprep record knows but this run would overwrite or
    remove. Other parts' shards of the same plan and other splits of the same source are left alone."""
    if not os.path.isdir(out):
        return []
    conflicts: list[_Conflict] = []
    known: set[str] = set()
    for path, manifest in _run_manifest_files(out):
        names = [record["name"] for record in manifest.get("shards", [])]
        known.update(names)
        files = [path] + [file for name in names for file in _shard_files(out, name)]
        label = (f"split {manifest.get('split')}, part {'/'.join(map(str, manifest.get('part', ['?', '?'])))}, "
                 f"{len(names)} shards")
        if manifest.get("source") != source:
            files += [os.path.join(out, extra) for extra in manifest.get("extras", [])]
            conflicts.append(_Conflict(f"{manifest.get('source')} shards ({label})", files))
        elif manifest.get("split") == split and manifest.get("plan") != fingerprint:
            conflicts.append(_Conflict(f"{source} {split} shards of another plan ({label}; "
                                       f"{_settings_difference(manifest.get('settings'), settings)})", files))
    unfinished = []
    for path in sorted(_in_folder(_state_path(out, "shards"), "*.json")):
        match = _SHARD_FILE.match(os.path.basename(path).removesuffix(".json") + ".tar")
        if not match or match.group("split") != split:
            continue
        name = os.path.basename(path).removesuffix(".json") + ".tar"
        known.add(name)
        try:
            with open(path) as handle:
                plan = json.load(handle).get("plan")
        except (OSError, ValueError, AttributeError):
            plan = None
        if plan != fingerprint:
            unfinished.append(name)
    covered = {path for conflict in conflicts for path in conflict.paths}
    unfinished = [name for name in unfinished if os.path.join(out, name) not in covered]
    if unfinished:
        conflicts.append(_Conflict(f"{len(unfinished)} {split} shard(s) of another plan from a run that never "
                                   f"finished ({unfinished[0]}, ...)",
                                   [file for name in unfinished for file in _shard_files(out, name)]))
    unknown = []
    for path in sorted(_in_folder(out, "*.tar")):
        match = _SHARD_FILE.match(os.path.basename(path))
        if (match and match.group("split") == split and os.path.basename(path) not in known
                and (int(match.group("index")) in own or int(match.group("index")) >= planned_shards)):
            unknown.append(os.path.basename(path))
    if unknown:
        conflicts.append(_Conflict(f"{len(unknown)} {split} shard(s) no dataprep record knows ({unknown[0]}, ...)",
                                   [file for name in unknown for file in _shard_files(out, name)]))
    if not _run_manifest_files(out):  # a manifest.json / sizes.json this run would replace, from elsewhere
        foreign = [name for name in (MANIFEST, SIZES) if os.path.exists(os.path.join(out, name))]
        if foreign:
            conflicts.append(_Conflict(f"{' and '.join(foreign)} that no dataprep run manifest explains",
                                       [os.path.join(out, name) for name in foreign]))
    return conflicts


def _conflict_message(out: str, source: str, split: str, conflicts: list[_Conflict], resume: bool) -> str:
    more = f" and {len(conflicts) - 1} more" if len(conflicts) > 1 else ""
    advice = ("--resume only continues the same plan: rerun with that run's settings, choose another --out, "
              "or pass --overwrite to delete them first") if resume else (
              "choose another --out, or pass --overwrite to delete them first")
    return (f"{out} already holds {conflicts[0].what}{more}, which this {source} {split} run would replace or "
            f"delete; {advice}")


# ---------------------------------------------------------------------------------------------------------
# Manifests, verify, stats.

class _folder_lock:
    """An exclusive lock on OUT while the merged manifest is rebuilt (parts may finish at the same time)."""

    def __init__(self, out: str):
        os.makedirs(_state_path(out), exist_ok=True)
        self.path = _state_path(out, "lock")

    def __enter__(self):
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        except OSError:  # some network filesystems lack flock; the merge is idempotent, so go on
            pass
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _run_manifest_files(out: str) -> list[tuple[str, dict]]:
    found = []
    for path in sorted(_in_folder(_state_path(out, "runs"), "*.json")):
        try:
            with open(path) as handle:
                manifest = json.load(handle)
        except (OSError, ValueError) as error:
            raise DataprepError(f"{path}: unreadable dataprep run manifest ({error}); delete it and rerun that "
                                "part") from None
        if not isinstance(manifest, dict) or "split" not in manifest:
            raise DataprepError(f"{path}: not a dataprep run manifest; delete it and rerun that part")
        found.append((path, manifest))
    return found


def run_manifests(out: str | os.PathLike) -> list[dict]:
    return [manifest for _, manifest in _run_manifest_files(str(out))]


def merge_manifests(manifests: list[dict]) -> dict:
    """One view of every run in a folder: per split (its parts merged) and totals over all splits."""
    splits: dict[str, dict] = {}
    plans: dict[str, dict[str, list[dict]]] = {}  # split -> plan fingerprint -> the runs cut to it
    for manifest in sorted(manifests, key=lambda m: (m["split"], m["part"])):
        entry = splits.setdefault(manifest["split"], {
            "source": manifest["source"], "parts": manifest["part"][1], "parts_done": [], "commands": [],
            "samples": 0, "images": 0, "captions": 0, "skipped": Counter(), "shards": [], "elapsed_s": 0.0,
            "settings": manifest["settings"], "plan": manifest.get("plan")})
        plans.setdefault(manifest["split"], {}).setdefault(manifest.get("plan"), []).append(manifest)
        entry["parts_done"].append(manifest["part"][0])
        entry["commands"].append(manifest["command"])
        for name in ("samples", "images", "captions"):
            entry[name] += manifest[name]
        entry["skipped"].update(manifest["skipped"])
        entry["shards"].extend(manifest["shards"])
        entry["elapsed_s"] = round(entry["elapsed_s"] + manifest["elapsed_s"], 3)
    plan_conflicts = [_plan_conflict(split, by_plan) for split, by_plan in plans.items() if len(by_plan) > 1]
    missing_parts = []
    for split, entry in splits.items():
        entry["shards"].sort(key=lambda record: record["name"])
        entry["skipped"] = dict(sorted(entry["skipped"].items()))
        entry["missing_parts"] = [f"{i}/{entry['parts']}" for i in range(entry["parts"]) if i not in entry["parts_done"]]
        missing_parts += [f"{split} {part}" for part in entry["missing_parts"]]
    skipped: Counter = Counter()
    for entry in splits.values():
        skipped.update(entry["skipped"])
    sources = sorted({entry["source"] for entry in splits.values()})
    return {
        "format": MANIFEST_FORMAT,
        "source": sources[0] if len(sources) == 1 else sources,
        "splits": splits,
        "samples": sum(entry["samples"] for entry in splits.values()),
        "images": sum(entry["images"] for entry in splits.values()),
        "captions": sum(entry["captions"] for entry in splits.values()),
        "skipped": dict(sorted(skipped.items())),
        "shards": [record for entry in splits.values() for record in entry["shards"]],
        "elapsed_s": round(sum(entry["elapsed_s"] for entry in splits.values()), 3),
        "complete": not missing_parts and not plan_conflicts,
        "missing_parts": missing_parts,
        "plan_conflicts": plan_conflicts,
    }


def _plan_conflict(split: str, by_plan: dict[str, list[dict]]) -> str:
    """One line naming the parts of `split` and the plan each was cut to."""
    groups = list(by_plan.values())
    first = groups[0][0].get("settings")
    described = []
    for index, runs in enumerate(groups):
        parts = ", ".join(f"{run['part'][0]}/{run['part'][1]}" for run in runs)
        why = "" if index == 0 else f": {_settings_difference(first, runs[0].get('settings') or {})}"
        described.append(f"part {parts} (plan {runs[0].get('plan')}{why})")
    return (f"{split}: parts cut to different plans were merged: {' vs '.join(described)}; rerun the odd "
            "part(s) with the same settings and --overwrite")


def write_merged_manifest(out: str | os.PathLike) -> dict:
    """Rebuild OUT/manifest.json and OUT/sizes.json (open_clip's {"shard.tar": n_samples}) from the runs."""
    out = str(out)
    merged = merge_manifests(run_manifests(out))
    atomic_write_json(os.path.join(out, MANIFEST), merged, sort_keys=True)
    atomic_write_json(os.path.join(out, SIZES), {record["name"]: record["samples"] for record in merged["shards"]},
                      sort_keys=True)
    if merged["plan_conflicts"]:  # manifest.json says complete: false and why; the merge itself fails
        raise PlanMismatchError(f"{out}: {'; '.join(merged['plan_conflicts'])}")
    return merged


@dataclass
class VerifyReport:
    shards: int
    samples: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(out: str | os.PathLike, decode: bool = True, progress: bool = False) -> VerifyReport:
    """Check every shard in OUT against the merged manifest: sha256, index, members, and (decode=True)
    that every image decodes. Also flags shards no manifest knows, and parts that never finished."""
    out = str(out)
    manifests = run_manifests(out)
    if not manifests:
        return VerifyReport(0, 0, [f"{out}: no dataprep manifest found (.dataprep/runs/*.json); was this folder "
                                   "written by `python -m dataprep`?"])
    merged = merge_manifests(manifests)
    problems = list(merged["plan_conflicts"])
    problems += [f"part {part} has not finished (no run manifest)" for part in merged["missing_parts"]]
    for manifest in manifests:  # each shard's completion record names the plan it was cut to
        for record in manifest["shards"]:
            try:
                with open(_state_path(out, "shards", record["name"].removesuffix(".tar") + ".json")) as handle:
                    done = json.load(handle)
            except (OSError, ValueError):
                continue  # a folder copied without its completion records: the sha256 check still holds
            if isinstance(done, dict) and done.get("plan") != manifest.get("plan"):
                problems.append(f"{record['name']}: cut to plan {done.get('plan')}, but part "
                                f"{manifest['part'][0]}/{manifest['part'][1]} of {manifest['split']} is plan "
                                f"{manifest.get('plan')} (a shard of another plan)")
    known = {record["name"] for record in merged["shards"]}
    on_disk = {os.path.basename(p) for p in _in_folder(out, "*.tar")}
    problems += [f"{name}: on disk but in no manifest (a stale or foreign shard)" for name in sorted(on_disk - known)]
    records = merged["shards"]
    if progress:
        from tqdm import tqdm

        records = tqdm(records, unit="shard", desc="verify")
    for record in records:
        problems += verify_shard(os.path.join(out, record["name"]), record, decode=decode)
    return VerifyReport(len(merged["shards"]), merged["samples"], problems)


def stats(out: str | os.PathLike, write: bool = True) -> dict:
    """The merged manifest of OUT (all splits, all parts); rewrites manifest.json and sizes.json."""
    out = str(out)
    if not run_manifests(out):
        raise DataprepError(f"{out}: no dataprep manifest found; run `python -m dataprep SOURCE --out {out}` first")
    if write:
        with _folder_lock(out):
            return write_merged_manifest(out)
    return merge_manifests(run_manifests(out))


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return str(count)


def format_summary(rows: list[dict], title: str = "dataprep") -> str:
    """A table with one row per run manifest or merged split entry."""
    header = ("split", "part", "shards", "samples", "images", "captions", "size", "seconds", "img/s", "skipped")
    table = [header]
    for row in rows:
        seconds = row.get("elapsed_s", 0.0)
        part = row.get("part")
        part_text = f"{part[0]}/{part[1]}" if part else f"{len(row.get('parts_done', []))}/{row.get('parts', 1)} done"
        skipped = ", ".join(f"{reason} {count}" for reason, count in row.get("skipped", {}).items()) or "-"
        table.append((row.get("split", "?"), part_text, str(len(row["shards"])), f"{row['samples']:,}",
                      f"{row['images']:,}", f"{row['captions']:,}",
                      _human_bytes(sum(record["bytes"] for record in row["shards"])), f"{seconds:.1f}",
                      f"{row['images'] / seconds:,.0f}" if seconds > 0 else "-", skipped))
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = [title, "  ".join(cell.ljust(width) for cell, width in zip(table[0], widths)),
             "  ".join("-" * width for width in widths)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in table[1:]]
    return "\n".join(lines)


def format_stats(merged: dict) -> str:
    rows = [dict(entry, split=split) for split, entry in merged["splits"].items()]
    text = format_summary(rows, title=f"dataprep stats: {merged['source']}")
    if merged["missing_parts"]:
        text += f"\nunfinished parts: {', '.join(merged['missing_parts'])}"
    return text
