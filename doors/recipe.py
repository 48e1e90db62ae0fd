"""What the pretrain and finetune doors share: the recipe options and one-line user errors.

Both doors take `--config`-style options of their own plus these: `--print-config`, `--print-keys`, the
`--local_rank` the deepspeed launcher appends, and `key=value` overrides (before or after the options).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from managertower.config import Config, ConfigError, all_keys

# Mistakes a user can make (bad recipe or override, missing path, Apex asked for but absent: ApexMissingError
# is a ConfigError): one line on stderr and exit code 2, no traceback.
USER_ERRORS = (ConfigError, FileNotFoundError)


def add_recipe_options(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    parser.add_argument("--print-keys", action="store_true", help="list every override key and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")


def user_error(error: Exception) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def resolve_config(build: Callable[[], Config], print_keys: bool, print_config: bool) -> Config | int:
    """The config to run, or the exit code when there is nothing to run (a listing, or a user error)."""
    if print_keys:
        print("\n".join(all_keys()))
        return 0
    try:
        cfg = build()
    except ConfigError as error:
        return user_error(error)
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    return cfg
