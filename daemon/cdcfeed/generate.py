"""Synthetic orders, rendered straight to CSV bytes.

Distributions are the design note's: customer_id uniform in 1..1000, amount uniform in
10.00..1000.00 with two decimals, created_at the current time; plus the batch id. With a
seed, the values of the n-th batch of a run are the same in every run.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from cdcfeed.sql import ORDER_COLUMNS

HEADER = (",".join(ORDER_COLUMNS) + "\n").encode()
CUSTOMER_MIN, CUSTOMER_MAX = 1, 1000
AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS = 10_00, 1000_00


def batch_rng(seed: int | None, sequence: int) -> np.random.Generator:
    """The generator for the `sequence`-th batch of a run: reproducible when seeded."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, sequence])


def orders_csv(
    batch_id: int,
    first_order_id: int,
    count: int,
    rng: np.random.Generator,
    created_at: datetime | None = None,
) -> bytes:
    """`count` orders with ids first_order_id.. as CSV with a header row."""
    customers = rng.integers(CUSTOMER_MIN, CUSTOMER_MAX + 1, count).tolist()
    cents = rng.integers(AMOUNT_MIN_CENTS, AMOUNT_MAX_CENTS + 1, count).tolist()
    stamp = (created_at or datetime.now(UTC)).isoformat(sep=" ")
    middle = f",{batch_id},"
    tail = f",{stamp}\n"
    lines = [
        f"{order_id}{middle}{customer},{amount // 100}.{amount % 100:02d}{tail}"
        for order_id, customer, amount in zip(
            range(first_order_id, first_order_id + count), customers, cents, strict=True
        )
    ]
    return HEADER + "".join(lines).encode()
