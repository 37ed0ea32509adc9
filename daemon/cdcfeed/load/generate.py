"""Synthetic orders, rendered straight to CSV bytes.

Distributions are the design note's: customer_id uniform in 1..1000, amount uniform in
10.00..1000.00 with two decimals, created_at the current time; plus the batch id. With a
seed, the values of the n-th batch of a run are the same in every run.

Rendering has no Python loop per row, because at full speed generation competes with the
server for the same cores: a pure-Python formatter manages ~1.5M rows/s, this ~10M. A block of
rows is laid out as a matrix of 4-byte words, one row per line, each field taken whole from a
table that holds its ASCII text padded with NUL bytes: a number below 10,000 is one word, an
amount (",dddd.cc") two, so a field is one gather and one column copy. Deleting the NULs from
the matrix's bytes leaves the CSV; that pass is about half of the cost.

A batch up to INLINE_ROWS rows renders on the event loop (a millisecond at most: a thread hop
would cost more than it saves); a larger one in a worker thread, so that a batch of a million
rows never holds up heartbeats, health checks and the other batches for a tenth of a second.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import numpy as np

from cdcfeed.database.names import ORDER_COLUMNS

HEADER = (",".join(ORDER_COLUMNS) + "\n").encode()
CUSTOMER_MIN, CUSTOMER_MAX = 1, 1000
AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS = 10_00, 1000_00


# Unseeded runs share one generator: fresh OS entropy costs ~25 µs a batch, a third of
# rendering a small one. Large batches render in threads at once: a numpy Generator takes its
# bit generator's lock for every draw, so sharing it is safe.
_UNSEEDED = np.random.default_rng()


def batch_rng(seed: int | None, sequence: int) -> np.random.Generator:
    """The generator for the `sequence`-th batch of a run: reproducible when seeded."""
    if seed is None:
        return _UNSEEDED
    return np.random.default_rng([seed, sequence])


_Words = np.ndarray[Any, np.dtype[np.uint32]]


def _words(texts: list[str]) -> _Words:
    """Each text (at most 4 ASCII bytes) as one uint32, NUL-padded."""
    table = np.zeros((len(texts), 4), np.uint8)
    for index, text in enumerate(texts):
        raw = text.encode()
        table[index, : len(raw)] = np.frombuffer(raw, np.uint8)
    return table.view(np.uint32).ravel()


def _amounts(numbers: _Words) -> np.ndarray[Any, np.dtype[np.uint64]]:
    """The text ",<dollars>.<cents>" of every amount in cents up to the maximum, NUL-padded to
    8 bytes (",1000.00" fills them exactly)."""
    cents = np.arange(AMOUNT_MAX_CENTS + 1)
    dollars, hundredths = np.divmod(cents, 100)
    table = np.zeros((len(cents), 8), np.uint8)
    table[:, 0] = ord(",")
    table[:, 1:5] = numbers[dollars].view(np.uint8).reshape(-1, 4)
    point = 1 + (1 + (dollars >= 10) + (dollars >= 100) + (dollars >= 1000))
    table[cents, point] = ord(".")
    table[cents, point + 1] = ord("0") + hundredths // 10
    table[cents, point + 2] = ord("0") + hundredths % 10
    return table.view(np.uint64).ravel()


_NUMBER = _words([str(n) for n in range(10_000)])  # "0" .. "9999"
_NUMBER_NO_ZERO = _NUMBER.copy()  # a leading group that is all zeros prints nothing
_NUMBER_NO_ZERO[0] = 0
_FOUR_DIGITS = _words([f"{n:04d}" for n in range(10_000)])  # "0000" .. "9999"
_AMOUNT = _amounts(_NUMBER)
# Rows per matrix: a 10,000-row batch in one go, while the matrix stays in the CPU's cache.
_BLOCK_ROWS = 16_384
_BLOCK_WORDS = _BLOCK_ROWS * 16


def _constant(text: str) -> _Words:
    raw = text.encode()
    return np.frombuffer(raw + b"\0" * (-len(raw) % 4), np.uint32)


# About a millisecond of rendering: the most a batch may hold the event loop for.
INLINE_ROWS = 10_000


async def render_orders(
    batch_id: int, first_order_id: int, count: int, rng: np.random.Generator
) -> bytes:
    """`orders_csv`, in a worker thread when it would hold the event loop for long."""
    if count <= INLINE_ROWS:
        return orders_csv(batch_id, first_order_id, count, rng)
    return await asyncio.to_thread(orders_csv, batch_id, first_order_id, count, rng)


def orders_csv(
    batch_id: int,
    first_order_id: int,
    count: int,
    rng: np.random.Generator,
    created_at: datetime | None = None,
    *,
    suffix: str = "",
    header: bytes = HEADER,
) -> bytes:
    """`count` orders with ids first_order_id.. as CSV with a header row.

    `suffix`: text after created_at on every row (the same for all: a note, the staging
    columns of a batch that also updates and deletes; see `changes.py`), for `header`.
    """
    if first_order_id < 0 or count < 0:
        raise ValueError("order ids and counts are never negative")
    customers = rng.integers(CUSTOMER_MIN, CUSTOMER_MAX + 1, count)
    cents = rng.integers(AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS + 1, count)
    stamp = (created_at or datetime.now(UTC)).isoformat(sep=" ")
    middle = _constant(f",{batch_id},")
    tail = _constant(f",{stamp}{suffix}\n")
    groups = (len(str(max(first_order_id + count - 1, 0))) + 3) // 4  # of four digits
    customer = groups + len(middle)
    amount = customer + 1
    width = amount + 2 + len(tail)
    # Fewer rows per matrix when a long suffix (a note of kilobytes) makes rows wide.
    block_rows = max(1, min(_BLOCK_ROWS, _BLOCK_WORDS // width))
    matrix = np.empty((min(count, block_rows), width), np.uint32)
    parts = [header]
    for start in range(0, count, block_rows):
        end = min(count, start + block_rows)
        rows = matrix[: end - start]
        ids = np.arange(first_order_id + start, first_order_id + end, dtype=np.int64)
        _render_order_ids(rows, ids, groups)
        rows[:, groups:customer] = middle
        rows[:, customer] = _NUMBER[customers[start:end]]
        rows[:, amount : amount + 2] = _AMOUNT[cents[start:end]].view(np.uint32).reshape(-1, 2)
        rows[:, amount + 2 :] = tail
        parts.append(rows.tobytes().translate(None, b"\0"))
    return b"".join(parts)


def _render_order_ids(rows: _Words, ids: np.ndarray[Any, np.dtype[np.int64]], groups: int) -> None:
    """Writes the ids into the first `groups` words, most significant group of digits first.

    A group is printed without leading zeros when every group above it is zero, and not at
    all when it is zero itself (except the last): ids of different lengths in one batch
    (9999, 10000) come out right. The ids are consecutive, so the upper groups are nearly
    always one value for the whole block and the choice of table one choice for all rows.
    """
    first, last = int(ids[0]), int(ids[-1])
    for column, group in enumerate(range(groups - 1, -1, -1)):
        unit = 10 ** (4 * group)
        leading = _NUMBER_NO_ZERO if group else _NUMBER
        above = 10_000 * unit  # the ids from which a group above this one is printed
        if first // unit == last // unit:
            value = first // unit % 10_000
            table = _FOUR_DIGITS if first >= above else leading
            rows[:, column] = table[value]
            continue
        values = ids // unit % 10_000
        if first >= above:
            rows[:, column] = _FOUR_DIGITS[values]
        elif last < above:
            rows[:, column] = leading[values]
        else:
            rows[:, column] = np.where(ids >= above, _FOUR_DIGITS[values], leading[values])
