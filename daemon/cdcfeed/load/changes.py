"""A batch of the change mix: which orders of its window it updates and deletes, and its
feed file (`[load] mix`, `toast_bytes`; the model is in `lifecycle.py`).

A batch that only inserts renders with `generate.orders_csv` as always (with the note as one
more column when `toast_bytes` is set). A batch that also updates or deletes renders the
staging file `BatchSession.apply` loads: the inserts by the same fast path, the staging
columns as a constant suffix of every row, then one line per update and delete (at most a
batch's worth, rendered in Python).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from cdcfeed.database import Allocation
from cdcfeed.database.names import NOTED_ORDER_COLUMNS, STAGED_COLUMNS
from cdcfeed.lifecycle import Mix, updated_status
from cdcfeed.load.generate import INLINE_ROWS, orders_csv

NOTED_HEADER = (",".join(NOTED_ORDER_COLUMNS) + "\n").encode()
STAGED_HEADER = (",".join(STAGED_COLUMNS) + "\n").encode()


@dataclass(frozen=True, slots=True)
class Plan:
    """What a batch writes: its inserts and the orders it updates and deletes (ascending)."""

    inserts: int
    updates: tuple[int, ...] = ()
    deletes: tuple[int, ...] = ()

    @property
    def changes(self) -> bool:
        return bool(self.updates or self.deletes)


def plan_batch(mix: Mix, batch_size: int, allocation: Allocation, rng: np.random.Generator) -> Plan:
    """The batch's split by the mix; its updates and deletes drawn from its window.

    A window shorter than the mix asks for (the cursor caught up with the inserts) is shared
    between updates and deletes in the mix's proportion.
    """
    inserts, updates, deletes = mix.split(batch_size)
    window = min(allocation.change_count, updates + deletes)
    if window <= 0:
        return Plan(inserts)
    if window < updates + deletes:
        updates = (2 * window * updates + updates + deletes) // (2 * (updates + deletes))
        deletes = window - updates
    ids = allocation.first_change_id + rng.permutation(allocation.change_count)[:window]
    return Plan(
        inserts,
        tuple(sorted(int(i) for i in ids[:updates])),
        tuple(sorted(int(i) for i in ids[updates:])),
    )


def note_text(size: int, rng: np.random.Generator) -> str:
    """`size` characters of base64 from random bytes: no compressor shrinks it much, so
    stored EXTERNAL it is `size` bytes out of line. One per batch: rows share it."""
    return base64.b64encode(rng.bytes(size * 3 // 4 + 3)).decode()[:size]


def batch_csv(
    batch_id: int,
    allocation: Allocation,
    plan: Plan,
    note: str,
    rng: np.random.Generator,
    created_at: datetime | None = None,
) -> bytes:
    """The batch's feed file: the orders' own columns when it only inserts (with `note` when
    there is one), else the staging file."""
    first = allocation.first_order_id
    if not plan.changes:
        if not note:
            return orders_csv(batch_id, first, plan.inserts, rng, created_at)
        return orders_csv(
            batch_id, first, plan.inserts, rng, created_at, suffix=f",{note}", header=NOTED_HEADER
        )
    stamp = (created_at or datetime.now(UTC)).isoformat(sep=" ")
    inserts = orders_csv(
        batch_id,
        first,
        plan.inserts,
        rng,
        created_at or datetime.fromisoformat(stamp),
        suffix=f",{note},c,,",
        header=STAGED_HEADER,
    )
    lines = [f"{i},,,,,,u,{updated_status(i)},{stamp}\n" for i in plan.updates]
    lines += [f"{i},,,,,,d,,\n" for i in plan.deletes]
    return inserts + "".join(lines).encode()


async def render_batch(
    batch_id: int,
    allocation: Allocation,
    plan: Plan,
    toast_bytes: int,
    rng: np.random.Generator,
) -> bytes:
    """`batch_csv`, in a worker thread when it would hold the event loop for long."""
    note = note_text(toast_bytes, rng) if toast_bytes else ""
    if plan.inserts <= INLINE_ROWS and plan.inserts * toast_bytes <= INLINE_ROWS * 100:
        return batch_csv(batch_id, allocation, plan, note, rng)
    return await asyncio.to_thread(batch_csv, batch_id, allocation, plan, note, rng)
