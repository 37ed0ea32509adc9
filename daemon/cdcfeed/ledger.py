"""The ledger: `batch_control` rows and the order-id blocks behind them.

Each function is one step of the batch protocol (see `batch.py`) or of settling batches whose
outcome a run could not record. All take a connection; none hold one across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from cdcfeed.cdc_sql import CdcStatements
from cdcfeed.db import Connection
from cdcfeed.lsn import lsn_to_int
from cdcfeed.sql import SCHEMA_LOCK_KEY, Names

__all__ = ["lsn_to_int"]


async def init_schema(conn: Connection, names: Names) -> None:
    """Creates or upgrades the schema; idempotent and safe from several instances at once."""
    async with conn.transaction():
        await conn.execute(names.q.lock_schema, SCHEMA_LOCK_KEY)
        await conn.execute(names.q.schema_ddl)
        await conn.execute(CdcStatements(names).ledger_indexes_ddl)  # for the slot metrics
        await conn.execute(names.q.seed_order_ids, names.orders)


@dataclass(frozen=True, slots=True)
class Allocation:
    batch_id: int
    first_order_id: int


async def reserve(conn: Connection, names: Names, rows: int, batches: int) -> list[Allocation]:
    """Batch ids and order-id blocks for `batches` batches of `rows` orders, committed."""
    record = await conn.fetchrow(
        names.q.reserve_ids, names.orders, rows, names.q.sequence_regclass, batches
    )
    if record is None or record[0] is None:
        raise RuntimeError("order id allocation row is missing; run `cdcfeed init-db`")
    first: int = record[0]
    return [
        Allocation(batch_id=batch_id, first_order_id=first + index * rows)
        for index, batch_id in enumerate(record[1])
    ]


async def open_batch(
    conn: Connection,
    names: Names,
    allocation: Allocation,
    instance: str,
    rows: int,
    feed_file: str,
    generate_seconds: float,
    write_seconds: float,
) -> str:
    """Inserts the IN_PROGRESS row (committed on return) and returns its start LSN."""
    start_lsn: str = await conn.fetchval(
        names.q.open_batch,
        allocation.batch_id,
        instance,
        rows,
        allocation.first_order_id,
        feed_file,
        generate_seconds,
        write_seconds,
    )
    return start_lsn


async def complete_batch(
    conn: Connection, names: Names, batch_id: int, rows: int, copy_seconds: float
) -> tuple[str, str] | None:
    """Marks the batch COMPLETED; its (end LSN, xid), or None if it was settled already."""
    record = await conn.fetchrow(names.q.complete_batch, batch_id, rows, copy_seconds)
    return None if record is None else (record[0], record[1])


async def fail_batch(
    conn: Connection, names: Names, batch_id: int, error: str, copy_seconds: float | None
) -> None:
    await conn.execute(names.q.fail_batch, batch_id, error[:2000], copy_seconds)


@dataclass(frozen=True, slots=True)
class Settlement:
    # COMPLETED or FAILED (decided now, or before by another settler); IN_PROGRESS when its
    # COPY transaction (or a settler) still holds the row; NOT_STARTED when the ledger has no
    # row: the batch never got past step 3.
    status: str
    end_lsn: str | None = None
    row_count: int = 0


async def decide(
    conn: Connection,
    names: Names,
    batch_id: int,
    first_order_id: int,
    row_count: int,
    xid: str | None,
    reason: str,
) -> Settlement:
    """Settles an IN_PROGRESS batch whose row lock the caller holds, in its transaction.

    Under the lock no COPY of the batch is running and none will start, so the block's count
    is final: a COPY commits all of its rows or none. The COPY's transaction wrote its xid
    into the row; a row without one (written by an older cdcfeed) gets it from its orders.
    """
    present = await conn.fetchval(names.q.count_block, first_order_id, row_count, batch_id)
    if not present:
        await fail_batch(conn, names, batch_id, reason, None)
        return Settlement("FAILED")
    if xid is None:
        xid = await conn.fetchval(names.q.block_xid, first_order_id, row_count, batch_id)
    end_lsn = await conn.fetchval(names.q.recover_batch, batch_id, present, xid)
    return Settlement("COMPLETED", end_lsn, present)


async def settle(conn: Connection, names: Names, batch_id: int, reason: str) -> Settlement:
    """Decides a batch of this process whose COPY outcome was not recorded (connection lost,
    shutdown), from what the database holds: under its row lock, as reconciliation does."""
    async with conn.transaction():
        try:
            row = await conn.fetchrow(names.q.lock_batch, batch_id)
        except asyncpg.LockNotAvailableError:
            return Settlement("IN_PROGRESS")
        if row is None:
            return Settlement("NOT_STARTED")
        status, first_order_id, row_count, xid, end_lsn = row
        if status != "IN_PROGRESS":
            return Settlement(status, end_lsn, row_count)
        return await decide(conn, names, batch_id, first_order_id, row_count, xid, reason)


async def recent_batches(conn: Connection, names: Names, limit: int) -> list[dict[str, Any]]:
    records = await conn.fetch(names.q.recent_batches, limit)
    return [dict(record) for record in records]


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()
