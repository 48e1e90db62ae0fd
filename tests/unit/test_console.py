"""The quiet console: the known, harmless notices go, every other warning stays."""
from __future__ import annotations

import logging
import warnings

from managertower.console import KNOWN_LOG_RECORDS, KNOWN_WARNINGS, silence_known_warnings

ALL_GATHER = ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
              "`torch.distributed.all_gather_single` instead.")


def test_known_warnings_are_ignored_and_others_still_show():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        silence_known_warnings()  # twice: still one filter each
        warnings.warn(ALL_GATHER, FutureWarning)
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated.", UserWarning)  # another category
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated.", FutureWarning)  # another message
        ours = {known.message for known in KNOWN_WARNINGS}
        assert sum(f[1] is not None and f[1].pattern in ours for f in warnings.filters) == len(ours)
    assert [str(w.message) for w in caught] == ["`torch.distributed.all_gather_into_tensor` is deprecated.",
                                               "`torch.distributed.reduce_scatter_tensor` is deprecated."]


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_the_cuda_home_notice_goes_in_cpu_runs_only(monkeypatch):
    silence_known_warnings()
    logger = logging.getLogger("torch.utils.cpp_extension")
    keep = _Keep()
    logger.addHandler(keep)
    try:
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error checking compiler version for c++")  # another notice of the same logger
        monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # a GPU run without a CUDA runtime: a real problem
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    finally:
        logger.removeHandler(keep)
    assert keep.messages == ["Error checking compiler version for c++",
                             "No CUDA runtime is found, using CUDA_HOME='/usr/local'"]


def test_every_known_notice_says_why_it_is_harmless():
    for known in (*KNOWN_WARNINGS, *KNOWN_LOG_RECORDS):
        assert len(known.why) > 60, known
