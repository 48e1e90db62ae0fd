"""Parameters and forward multiply-adds of the tower for every manager kind (paper Table 6).

    mt-inspect --size base --image-size 384 --text-len 50 --json
    python -m doors.inspect --size tiny --image-size 64 --manager saue --manager aaue_fused

The model is built on the meta device (no weights, no memory) and one image-text pair goes through it under
torch's FLOP counter. Counted as fvcore counts: one multiply-add = one FLOP, matrix products and
convolutions only (fvcore also counts normalisation layers, about 0.2% here). Parameters are those of the
tower without task heads.
"""
from __future__ import annotations

import argparse
import json
import sys

from doors.recipe import user_error
from managertower.config import MANAGER_KINDS, ConfigError
from managertower.console import silence_known_warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mt-inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="base", choices=["base", "tiny"])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--text-len", type=int, default=50)
    parser.add_argument("--manager", action="append", choices=MANAGER_KINDS,
                        help="repeatable; default: every kind")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument("overrides", nargs="*", help="model.key=value overrides")
    args = parser.parse_args(argv)
    silence_known_warnings()
    from managertower.inspect import count, format_table

    try:
        rows = [count(kind, args.size, args.image_size, args.text_len, args.overrides)
                for kind in (args.manager or MANAGER_KINDS)]
    except ConfigError as error:
        return user_error(error)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(format_table(rows, paper_setting=args.size == "base" and args.image_size == 384))
    return 0


if __name__ == "__main__":
    sys.exit(main())
