"""Raw datasets -> shuffled WebDataset shards with DALI indexes, a manifest and sizes.json.

    python -m dataprep coco --root raw/coco --out shards/coco                # Karpathy train+restval
    python -m dataprep coco --root raw/coco --out shards/coco --split test   # retrieval test shards
    python -m dataprep vg --root raw/vg --out shards/vg --workers 16
    python -m dataprep img2dataset --root raw/cc3m_tars --out shards/cc3m --source-name cc3m
    python -m dataprep vqav2 --root raw/vqav2 --out shards/vqav2 --split val
    sbatch --array=0-7 ... python -m dataprep cc3m ... --part $SLURM_ARRAY_TASK_ID/8   # 8 machines, one OUT
    python -m dataprep cc3m ... --resume          # after a crash: keeps the verified finished shards
    python -m dataprep synthetic --out raw/synthetic --size demo
    python -m dataprep verify shards/coco         # exit 1 when any shard is broken
    python -m dataprep stats shards/coco          # merged counts of all splits and parts

`python -m dataprep SOURCE --help` shows the folder layout SOURCE expects.
"""
from __future__ import annotations

import argparse
import sys

from managertower.console import silence_known_warnings
from managertower.data.formats import READERS, DataprepError, ReaderOption
from managertower.data.images import DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from managertower.data.prep import format_stats, prepare, stats, verify

# How each kind of reader option reads on the command line; every option defaults to None (not given), so
# the reader sees only what the user set.
OPTION_KINDS = {
    "path": {},
    "text": {},
    "count": {"type": int},
    "paths": {"nargs": "+"},
    "switch": {"action": "store_true", "default": None},
}


def add_reader_options(parser: argparse.ArgumentParser, options: tuple[ReaderOption, ...]) -> None:
    for option in options:
        parser.add_argument(option.flag, dest=option.name, help=option.help, **OPTION_KINDS[option.kind])


def reader_settings(args: argparse.Namespace) -> dict:
    """The reader's own options the user gave (and --exclude-ids), by name: what `prepare` passes the reader."""
    names = ["exclude_ids", *(option.name for option in READERS[args.source].reader_options)]
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dataprep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="source", required=True, metavar="SOURCE",
                                     help=f"one of {', '.join(READERS)}, synthetic, verify, stats")
    for name, reader in READERS.items():
        sub = commands.add_parser(name, help=f"shard {name}", formatter_class=argparse.RawDescriptionHelpFormatter,
                                  description=f"Shard {name}. Expected layout under --root:\n{reader.layout}")
        sub.add_argument("--root", required=True, help="the dataset folder as its owners ship it")
        sub.add_argument("--out", required=True, help="the shard folder (several splits and parts may share it)")
        sub.add_argument("--split", choices=reader.splits, default=reader.default_split,
                         help=f"default {reader.default_split}")
        sub.add_argument("--workers", type=int, default=1, help="image worker processes (default 1)")
        sub.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000")
        sub.add_argument("--max-image-side", type=int, default=DEFAULT_MAX_SIDE,
                         help=f"downsize so the longer side is at most PX, keeping the aspect (default "
                              f"{DEFAULT_MAX_SIDE}: cheap to decode at train time, above the 384-576 px the "
                              "recipes crop; 0 keeps the size)")
        sub.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality of re-encoded images")
        sub.add_argument("--part", default="0/1", help="I/N: write only this part's shards (N machines, one OUT)")
        sub.add_argument("--resume", action="store_true", help="keep verified finished shards, redo the rest")
        sub.add_argument("--overwrite", action="store_true",
                         help="delete what OUT holds of another source or another plan first (without it, such "
                              "a folder is refused)")
        sub.add_argument("--seed", type=int, default=0, help="the shuffle across shards")
        sub.add_argument("--exclude-ids", help="a file of image ids (one per line, or a JSON list) to leave out")
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
        add_reader_options(sub, reader.reader_options)

    synthetic = commands.add_parser("synthetic", help="write the synthetic shapes world in the real raw formats")
    synthetic.add_argument("--out", required=True, help="the raw folder to write (coco/, vqav2/, nlvr2/, ...)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--size", default="demo", help="small, demo, or N (images of the pre-training set)")
    synthetic.add_argument("--shard", metavar="SHARD_ROOT",
                           help="also shard every dataset of the world into SHARD_ROOT/{coco,vqav2,...}")
    synthetic.add_argument("--workers", type=int, default=2)

    check = commands.add_parser("verify", help="check every shard of a folder; exit 1 on any problem")
    check.add_argument("out")
    check.add_argument("--quick", action="store_true", help="sha256 and index only, no image decoding")
    summary = commands.add_parser("stats", help="merged counts of a shard folder (all splits and parts)")
    summary.add_argument("out")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    silence_known_warnings()
    try:
        if args.source == "verify":
            report = verify(args.out, decode=not args.quick, progress=True)
            for problem in report.problems:
                print(f"FAIL {problem}")
            print(f"verify {args.out}: {report.shards} shards, {report.samples} samples, "
                  f"{'OK' if report.ok else f'{len(report.problems)} problem(s)'}")
            return 0 if report.ok else 1
        if args.source == "stats":
            print(format_stats(stats(args.out)))
            return 0
        if args.source == "synthetic":
            from managertower.data.synthetic import shard_world, write_world

            counts = write_world(args.out, seed=args.seed, size=args.size)
            print(f"synthetic world (seed {args.seed}, size {args.size}) in {args.out}: "
                  + ", ".join(f"{name} {count}" for name, count in counts.items()))
            if args.shard:
                shard_world(args.out, args.shard, workers=args.workers)
            return 0
        prepare(args.source, args.root, args.out, args.split, workers=args.workers,
                samples_per_shard=args.samples_per_shard, max_image_side=args.max_image_side, part=args.part,
                resume=args.resume, overwrite=args.overwrite, seed=args.seed, quality=args.quality,
                progress=not args.quiet,
                command=" ".join(["python -m dataprep", *argv]), **reader_settings(args))
        return 0
    except DataprepError as error:
        print(f"dataprep: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dataprep: interrupted; finished shards are kept: rerun with --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
