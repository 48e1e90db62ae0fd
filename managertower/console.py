"""A quiet console: the known, harmless notices of the libraries we call are kept off it; nothing else is.

Every door calls `silence_known_warnings()` once at start-up, and so does every rank, since the launchers start
ranks through the door's own main. Each notice below is matched by its exact message (a regular expression
from the start of the message) and its category or logger, and says why it is harmless; any other warning,
including another one of the same category from the same library, still shows.
"""
from __future__ import annotations

import logging
import os
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class KnownWarning:
    """A `warnings.warn` notice to ignore."""

    message: str  # regular expression matched from the start of the message
    category: type[Warning]
    why: str


@dataclass(frozen=True)
class KnownLogRecord:
    """A `logging` record to drop, where `applies()` holds when it is logged."""

    logger: str
    message: str  # regular expression matched from the start of the record's message
    level: int
    why: str
    cpu_run_only: bool = False

    def applies(self) -> bool:
        # DeepSpeed picks the CPU accelerator when DS_ACCELERATOR is unset and no CUDA device is present.
        return not self.cpu_run_only or os.environ.get("DS_ACCELERATOR", "cpu") in ("cpu", "")


KNOWN_WARNINGS = (
    KnownWarning(
        r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
        FutureWarning,
        why="DeepSpeed's ZeRO gathers (deepspeed/comm/torch.py) call the collective under its old name, which "
            "torch still runs unchanged; the rename is DeepSpeed's to make. Printed by every rank of every run "
            "and again after each evaluation.",
    ),
)

KNOWN_LOG_RECORDS = (
    KnownLogRecord(
        "torch.utils.cpp_extension",
        r"No CUDA runtime is found, using CUDA_HOME=",
        logging.WARNING,
        why="On the CPU DeepSpeed builds its shared-memory all-reduce (deepspeed_shm_comm_op) with torch's "
            "extension builder, which notes at import that there is no CUDA runtime; the CPU op needs none. "
            "Dropped only in CPU runs: on a GPU run a missing CUDA runtime is a real problem.",
        cpu_run_only=True,
    ),
)


class _DropKnown(logging.Filter):
    def __init__(self, known: KnownLogRecord):
        super().__init__()
        self.known = known
        self.pattern = re.compile(known.message)

    def filter(self, record: logging.LogRecord) -> bool:
        drop = (record.levelno == self.known.level and self.pattern.match(record.getMessage()) is not None
                and self.known.applies())
        return not drop


_LOG_FILTERS = tuple(_DropKnown(known) for known in KNOWN_LOG_RECORDS)


def silence_known_warnings() -> None:
    """Ignore KNOWN_WARNINGS and drop KNOWN_LOG_RECORDS in this process; safe to call more than once."""
    for known in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=known.message, category=known.category)
    for log_filter in _LOG_FILTERS:
        logging.getLogger(log_filter.known.logger).addFilter(log_filter)  # a filter already there is not re-added
