"""Threads for the loader's per-image work on the CPU: resizing decoded images and augmenting every example.

Threads, not processes: torch's image kernels and numpy's loops release the GIL, so N threads keep N cores
busy on images that already live in this process (a process pool would pickle every decoded image twice).
Each thread runs torch with ONE intra-op thread. A per-image op is a few hundred microseconds of work; split
over torch's OpenMP team it costs more in wake-ups than it saves, and two pool threads with two OpenMP threads
each oversubscribe the cores: measured on the 2-core machine under load, per-example augmentation at 384 px
took 41 ms of CPU per example in the loader thread with torch's default 2 threads against about 4 ms in
one thread. The training thread's own setting is left as it was (see `_one_torch_thread`).

Every job is a pure function of its inputs (the image and the example's seed), so the results do not depend
on which thread ran which job or in what order: the loader's output stays deterministic.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import torch


def _one_torch_thread(threads_elsewhere: int) -> None:
    """Give the calling (pool) thread one torch intra-op thread without changing anyone else's.

    `torch.set_num_threads` sets the calling thread's OpenMP team size and, as a side effect, the process-wide
    default that threads started later take, and MKL's global count: those two are put back from a throwaway
    thread, whose own team size dies with it. torch's per-thread initialisation runs first
    (`get_num_threads`), or it would reset this thread to the default at its first parallel op."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    restore = threading.Thread(target=torch.set_num_threads, args=(threads_elsewhere,), daemon=True)
    restore.start()
    restore.join()


class ImageWorkers:
    """A pool of `threads` threads that map a function over items; results in the items' order."""

    def __init__(self, threads: int):
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None

    def map(self, function: Callable, items: Iterable) -> list:
        items = list(items)
        if not items:
            return []
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="managertower-images",
                                            initializer=_one_torch_thread,
                                            initargs=(torch.get_num_threads(),))
        return list(self._pool.map(function, items))

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
