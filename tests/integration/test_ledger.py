"""The ledger's statements against a real server: id reservations and settling one batch.

The daemon-level fault tests reach these paths only by luck of timing (a connection lost
between two statements); here each state a settler can find is made on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import numpy as np
import pytest

from cdcfeed.database import Allocation, Database, Names
from cdcfeed.database.catalog import statements
from cdcfeed.database.database import BatchSession
from cdcfeed.database.ledger import Ledger, Settlement
from cdcfeed.database.schema import init_schema
from cdcfeed.load.changes import Plan, batch_csv
from cdcfeed.load.ids import IdReservations
from tests.support import wait_until

NAMES = Names(schema="public", orders="orders", batches="batch_control")
Q = statements(NAMES)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(dsn)
    await init_schema(connection, NAMES)
    try:
        yield connection
    finally:
        await connection.close()


async def _opened(conn: asyncpg.Connection, rows: int = 10) -> Allocation:
    """A batch through step 3: ids reserved, its IN_PROGRESS row committed."""
    (allocation,) = await Ledger(conn, NAMES).reserve(rows, 1)
    await Ledger(conn, NAMES).open_batch(allocation, "test", rows, "f.csv", 0.0, 0.0)
    return allocation


@asynccontextmanager
async def _copy_running(
    dsn: str, allocation: Allocation, rows: int = 10
) -> AsyncIterator[asyncpg.Connection]:
    """Step 4 up to, not including, its commit (claim, then the rows), on a connection of its
    own that is closed on the way out: without a commit first, a lost connection."""
    loader = await asyncpg.connect(dsn)
    try:
        assert await loader.execute(Q.claim_batch(allocation.batch_id)) == "UPDATE 1"
        await loader.execute(
            "INSERT INTO orders SELECT g, $2, 1, 1.00, now() "
            "FROM generate_series($1::bigint, $1::bigint + $3 - 1) g",
            allocation.first_order_id,
            allocation.batch_id,
            rows,
        )
        yield loader
    finally:
        await loader.close()


async def test_reservations_from_two_instances_never_overlap(dsn: str) -> None:
    pools = [await asyncpg.create_pool(dsn, min_size=1, max_size=4) for _ in range(2)]
    try:
        async with pools[0].acquire() as conn:
            await init_schema(conn, NAMES)
        reservations = [
            IdReservations(Database(pool, NAMES), rows=100, batches=5) for pool in pools
        ]
        taken = await asyncio.gather(*(r.take() for r in reservations for _ in range(23)))
    finally:
        for pool in pools:
            await pool.close()
    batch_ids = [a.batch_id for a in taken]
    assert len(set(batch_ids)) == len(taken)
    blocks = sorted((a.first_order_id, a.first_order_id + 100) for a in taken)
    assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(blocks))
    # 23 batches each from reservations of 5: five reservations per instance, 2 ids unused.
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT last_value FROM batch_control_batch_id_seq") == 50
    finally:
        await conn.close()


async def test_settling_a_batch_whose_row_never_arrived(conn: asyncpg.Connection) -> None:
    (allocation,) = await Ledger(conn, NAMES).reserve(10, 1)
    settled = await Ledger(conn, NAMES).settle(allocation.batch_id, "lost")
    assert settled.status == "NOT_STARTED"


async def test_settling_waits_for_a_copy_still_running(dsn: str, conn: asyncpg.Connection) -> None:
    allocation = await _opened(conn)
    async with _copy_running(dsn, allocation) as loader:
        # The COPY's transaction holds the row: nothing is decided while it runs.
        running = await Ledger(conn, NAMES).settle(allocation.batch_id, "lost")
        assert running.status == "IN_PROGRESS"
        await loader.execute(Q.commit)
    settled = await Ledger(conn, NAMES).settle(allocation.batch_id, "lost")
    assert (settled.status, settled.row_count) == ("COMPLETED", 10)
    row = await conn.fetchrow(
        "SELECT status, recovered, xid::text, end_lsn::text FROM batch_control WHERE batch_id = $1",
        allocation.batch_id,
    )
    # The xid is the one the COPY's own transaction wrote into the row.
    assert row["status"] == "COMPLETED" and row["recovered"] and row["xid"] is not None
    assert row["end_lsn"] == settled.end_lsn


async def test_settling_a_copy_that_rolled_back(dsn: str, conn: asyncpg.Connection) -> None:
    allocation = await _opened(conn)
    async with _copy_running(dsn, allocation):
        pass  # then the connection is lost: the server rolls the transaction back
    # Until the backend has gone and released the row.
    settled = await wait_until(
        "the lost connection's backend releases the row",
        lambda: Ledger(conn, NAMES).settle(allocation.batch_id, "lost"),
        lambda settled: settled.status != "IN_PROGRESS",
        timeout=5,
        every=0.05,
    )
    assert settled.status == "FAILED"
    row = await conn.fetchrow(
        "SELECT status, error, xid FROM batch_control WHERE batch_id = $1", allocation.batch_id
    )
    assert (row["status"], row["error"], row["xid"]) == ("FAILED", "lost", None)
    assert await conn.fetchval("SELECT count(*) FROM orders") == 0


async def test_settling_a_batch_already_decided_reports_it(conn: asyncpg.Connection) -> None:
    allocation = await _opened(conn)
    await Ledger(conn, NAMES).fail_batch(allocation.batch_id, "refused", None)
    settled = await Ledger(conn, NAMES).settle(allocation.batch_id, "lost")
    assert settled.status == "FAILED"
    error = await conn.fetchval(
        "SELECT error FROM batch_control WHERE batch_id = $1", allocation.batch_id
    )
    assert error == "refused"  # the first decision stands


async def _run_to_commit(
    conn: asyncpg.Connection, allocation: Allocation, plan: Plan
) -> BatchSession:
    """Steps 3 and 4 of a batch as the daemon runs them, its transaction committed; step 5
    (`complete`) is left out, as a daemon killed right after the commit leaves it."""
    session = BatchSession(conn, Q)
    data = batch_csv(allocation.batch_id, allocation, plan, "", np.random.default_rng(7))
    await session.open_batch(
        allocation, "test", plan.inserts, "f.csv", 0.0, 0.0, staged=bool(plan.changes)
    )
    if plan.changes:
        await session.apply(allocation.batch_id, data, None)
    else:
        await session.copy(allocation.batch_id, data, None)
    return session


@pytest.mark.parametrize("settler", ["settle", "reconciliation"])
async def test_settling_a_mixed_batch_that_committed_takes_what_its_row_recorded(
    conn: asyncpg.Connection, settler: str
) -> None:
    ledger = Ledger(conn, NAMES)
    (first,) = await ledger.reserve(10, 1)
    session = await _run_to_commit(conn, first, Plan(10))
    assert await session.complete(first.batch_id, 10, 0.0) is not None
    # A batch that updates two of the first batch's orders and deletes two, committed, then
    # cut off before it was marked COMPLETED.
    (mixed,) = await ledger.reserve(6, 1, changes=4)
    window = mixed.first_change_id
    assert (window, mixed.change_count) == (first.first_order_id, 4)
    plan = Plan(6, updates=(window, window + 1), deletes=(window + 2, window + 3))
    await _run_to_commit(conn, mixed, plan)
    claimed = await conn.fetchval(
        "SELECT xid::text FROM batch_control WHERE batch_id = $1", mixed.batch_id
    )
    assert claimed is not None
    # A later batch deletes some of its inserts: the block no longer counts what it inserted.
    block = mixed.first_order_id
    await conn.execute("DELETE FROM orders WHERE order_id = ANY($1::bigint[])", [block, block + 1])

    if settler == "settle":
        settled = await ledger.settle(mixed.batch_id, "lost")
    else:
        started = await conn.fetchval("SELECT clock_timestamp()")
        (abandoned,) = await ledger.settle_abandoned("test", started, own=True)
        assert abandoned.batch_id == mixed.batch_id
        settled = Settlement(
            abandoned.status,
            abandoned.end_lsn,
            abandoned.row_count,
            abandoned.updated,
            abandoned.deleted,
        )
    assert (settled.status, settled.row_count, settled.updated, settled.deleted) == (
        "COMPLETED",
        6,
        2,
        2,
    )
    row = await conn.fetchrow(
        "SELECT status, recovered, row_count, updated, deleted, xid::text, end_lsn::text "
        "FROM batch_control WHERE batch_id = $1",
        mixed.batch_id,
    )
    assert (row["status"], row["recovered"], row["row_count"]) == ("COMPLETED", True, 6)
    assert (row["updated"], row["deleted"]) == (2, 2)
    assert row["xid"] == claimed  # the xid its own transaction wrote
    assert row["end_lsn"] == settled.end_lsn


async def test_settling_an_older_versions_batch_that_later_batches_changed(
    conn: asyncpg.Connection,
) -> None:
    """A row without an xid: an older cdcfeed's batch, which did not record one."""
    allocation = await _opened(conn)
    first = allocation.first_order_id
    # Its COPY, as older versions ran it: committed, with no claim writing the xid.
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO orders SELECT g, $2, 1, 1.00, now() "
            "FROM generate_series($1::bigint, $1::bigint + 9) g",
            first,
            allocation.batch_id,
        )
        loaded_by = await conn.fetchval("SELECT pg_current_xact_id()::text")
    # Later batches of a mix delete two of its orders and update one. The first delete's
    # slot in the heap is vacuumed free, so that the update's new row version takes it and a
    # scan meets the updated row (its xmin the updater's) before any unchanged one.
    await conn.execute("DELETE FROM orders WHERE order_id = $1", first)
    await conn.execute("VACUUM (INDEX_CLEANUP ON) orders")
    await conn.execute(
        "UPDATE orders SET status = 'paid', updated_at = now() WHERE order_id = $1", first + 4
    )
    await conn.execute("DELETE FROM orders WHERE order_id = $1", first + 9)

    settled = await Ledger(conn, NAMES).settle(allocation.batch_id, "lost")
    # It committed all ten (a COPY commits all or nothing), whatever was deleted since.
    assert (settled.status, settled.row_count) == ("COMPLETED", 10)
    row = await conn.fetchrow(
        "SELECT row_count, recovered, xid::text FROM batch_control WHERE batch_id = $1",
        allocation.batch_id,
    )
    assert (row["row_count"], row["recovered"]) == (10, True)
    assert row["xid"] == loaded_by  # the loader's, not the updater's
