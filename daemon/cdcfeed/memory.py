"""Keeping a week-long run's memory flat and its large buffers cheap: glibc's mmap threshold.

glibc serves allocations above its mmap threshold with mmap, and raises ("slides") the
threshold to the size of each such block freed. Under asyncio's own event loop that sliding
fragmented the heap: every socket read is a fresh 256 KiB bytes object shrunk to what arrived,
and once the threshold had slid above that size the shrunk buffers left holes that smaller,
longer-lived objects settled into, so the heap grew (in `bench/soak.py` about 12 MiB per
100,000 batches, all of it free memory the process never gave back). Under uvloop, which the
daemon runs on, reads land in one fixed buffer and are copied out at their size, so that
pattern is gone.

The threshold is still fixed, so it never slides, but at the top of glibc's sliding range
(32 MiB): the buffers of a large batch (the rendered CSV, the feed file's bytes, asyncpg's
COPY message, 0.5-0.8 MB each at 10,000 rows) then come from the heap and reuse memory already
mapped, where served by mmap each one was a fresh mapping, page-faulted in and zeroed: about
0.8 ms of CPU per 10,000-row batch, a fifth of what the daemon spends on it.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems: the highest value sliding could reach.
MMAP_THRESHOLD = 32 * 1024 * 1024


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fixes glibc's mmap threshold; False where there is no glibc (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
