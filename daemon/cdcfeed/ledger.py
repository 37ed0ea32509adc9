"""The ledger: `batch_control` rows and the order-id blocks behind them.

Each function is one step of the batch protocol (see `batch.py`) or of settling batches whose
outcome a run could not record. All take a connection; none hold one across steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cdcfeed.cdc_sql import CdcStatements
from cdcfeed.db import Connection
from cdcfeed.pgoutput import lsn_to_int
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


async def allocate(conn: Connection, names: Names, rows: int) -> Allocation:
    record = await conn.fetchrow(names.q.allocate, names.orders, rows, names.q.sequence_regclass)
    if record is None:
        raise RuntimeError("order id allocation row is missing; run `cdcfeed init-db`")
    return Allocation(batch_id=record[0], first_order_id=record[1])


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
    conn: Connection, names: Names, batch_id: int, xid: str, rows: int, copy_seconds: float
) -> str | None:
    """Marks the batch COMPLETED and returns its end LSN (None if it was settled already)."""
    end_lsn: str | None = await conn.fetchval(
        names.q.complete_batch, batch_id, xid, rows, copy_seconds
    )
    return end_lsn


async def fail_batch(
    conn: Connection, names: Names, batch_id: int, error: str, copy_seconds: float | None
) -> None:
    await conn.execute(names.q.fail_batch, batch_id, error[:2000], copy_seconds)


@dataclass(frozen=True, slots=True)
class Unsettled:
    batch_id: int
    first_order_id: int
    row_count: int
    xid: str | None


@dataclass(frozen=True, slots=True)
class Settlement:
    status: str  # COMPLETED, FAILED, or IN_PROGRESS when the transaction is still running
    end_lsn: str | None = None


async def settle(conn: Connection, names: Names, batch: Unsettled, reason: str) -> Settlement:
    """Decides a batch whose COPY outcome was not recorded, from what the database holds.

    With the COPY's xid known, `pg_xact_status` is definitive (and tells a transaction that
    is still running, which must be left alone). Without it, the order-id block decides: a
    COPY commits all its rows or none.
    """
    if batch.xid is not None:
        status = await conn.fetchval(names.q.xact_status, batch.xid)
        if status == "in progress":
            return Settlement("IN_PROGRESS")
        committed = status == "committed"
    else:
        present = await conn.fetchval(
            names.q.count_block, batch.first_order_id, batch.row_count, batch.batch_id
        )
        committed = present > 0
    if committed:
        present = await conn.fetchval(
            names.q.count_block, batch.first_order_id, batch.row_count, batch.batch_id
        )
        end_lsn = await conn.fetchval(names.q.recover_batch, batch.batch_id, present, batch.xid)
        return Settlement("COMPLETED", end_lsn)
    await fail_batch(conn, names, batch.batch_id, reason, None)
    return Settlement("FAILED")


async def recent_batches(conn: Connection, names: Names, limit: int) -> list[dict[str, Any]]:
    records = await conn.fetch(names.q.recent_batches, limit)
    return [dict(record) for record in records]


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()
