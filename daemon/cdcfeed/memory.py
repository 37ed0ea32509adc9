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

`cdcfeed run` also raises the trim threshold, to 16 MiB: those buffers are freed at the top
of the heap at the end of each batch, and above the default trim threshold (128 KiB) glibc
handed that memory back to the kernel, so the next batch faulted it in again, zeroed: about
0.3 ms of CPU per 10,000-row batch, 7 % of the daemon's (bench/compare.py). Kept, the next
batch reuses it; the heap keeps at most that much free memory, it does not grow.

`verify --kafka` also raises the trim threshold. Each fetch response (up to
`max_partition_fetch_bytes`, 4 MiB, a partition) is read into a buffer, copied out whole and
cut into records, and then all of it is freed at once at the top of the heap; above the trim
threshold (128 KiB unless set; fixing the mmap threshold stops it sliding too) glibc hands
that back to the kernel and the next fetch faults it in again, zeroed: 300,000 page faults and
a third of the reader's CPU per 200,000 schema-enveloped events (bench/verify_kafka.py). Kept
up to 64 MiB, the next fetch reuses it.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems: the highest value sliding could reach.
MMAP_THRESHOLD = 32 * 1024 * 1024
FETCH_TRIM_THRESHOLD = 64 * 1024 * 1024  # free heap kept for the next Kafka fetch
BATCH_TRIM_THRESHOLD = 16 * 1024 * 1024  # free heap kept for the next batch's buffers


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD, trim: int | None = None) -> bool:
    """Fixes glibc's mmap threshold, and its trim threshold when given; False where there is
    no glibc (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    pinned = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if trim is not None:
        pinned = bool(mallopt(M_TRIM_THRESHOLD, trim)) and pinned
    return pinned


def keep_batch_buffers() -> bool:
    """What `cdcfeed run` runs with: the threshold pinned, a batch's buffers kept for the
    next (see above)."""
    return pin_mmap_threshold(trim=BATCH_TRIM_THRESHOLD)


def keep_fetch_buffers() -> bool:
    """What `verify --kafka` runs with: the threshold pinned, a fetch's memory kept for the
    next (see above)."""
    return pin_mmap_threshold(trim=FETCH_TRIM_THRESHOLD)
