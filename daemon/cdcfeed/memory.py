"""Keeping a week-long run's memory flat: glibc's sliding mmap threshold.

asyncio reads every socket with `recv(256 KiB)` into a fresh bytes object and then shrinks it to
what arrived. glibc serves allocations that large with mmap — until the first one is freed, when
it raises its mmap threshold above that size and serves them from the heap from then on. Shrunk
in place, they leave holes that smaller, longer-lived objects settle into, so the next 256 KiB
no longer fits and the heap grows: in `bench/soak.py` about 12 MiB per 100,000 batches, all of it
free memory the process never gives back (tracemalloc sees nothing; mallinfo's free bytes grow).
Setting the threshold explicitly turns the sliding off and keeps those buffers in mmap, each
given back whole when it is freed; the cost is two system calls per socket read.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def pin_mmap_threshold(threshold: int = GLIBC_DEFAULT_THRESHOLD) -> bool:
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
