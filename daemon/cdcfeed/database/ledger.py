"""The ledger on one connection: `batch_control` rows, the order-id blocks behind them, and
the instances' leases.

Each method is one step of the batch protocol (see `batch.py`) or of settling batches whose
outcome a run could not record. A `Ledger` wraps a connection it does not own; `Database`
hands them out, one per operation, and translates driver errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from cdcfeed.database.catalog import Statements, statements
from cdcfeed.database.names import Names

# A plain connection or one borrowed from the pool: the ledger works on either.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# Batches settled per transaction: bounds how long a settler holds row locks after a crash
# that left many batches behind; the next heartbeat takes the next slice.
SETTLE_SLICE = 100
INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Allocation:
    batch_id: int
    first_order_id: int
    # The window of order ids the batch may update or delete (a change mix): no other batch
    # ever gets any of them. Shorter than asked for (even empty) when the change cursor
    # caught up with the inserts.
    first_change_id: int = 0
    change_count: int = 0


@dataclass(frozen=True, slots=True)
class Changes:
    """What a batch's transaction changed: orders inserted, updated and deleted."""

    inserted: int
    updated: int = 0
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class Settlement:
    # COMPLETED or FAILED (decided now, or before by another settler); IN_PROGRESS when its
    # COPY transaction (or a settler) still holds the row; NOT_STARTED when the ledger has no
    # row: the batch never got past step 3.
    status: str
    end_lsn: str | None = None
    row_count: int = 0
    updated: int = 0
    deleted: int = 0


@dataclass(frozen=True, slots=True)
class Settled:
    """A batch an abandoned run left IN_PROGRESS, as a settler decided it."""

    batch_id: int
    instance: str
    status: str  # COMPLETED or FAILED
    row_count: int
    end_lsn: str | None
    updated: int = 0
    deleted: int = 0


class Ledger:
    def __init__(self, conn: Connection, names: Names | Statements) -> None:
        self.conn = conn
        self.q = names if isinstance(names, Statements) else statements(names)

    async def reserve(self, rows: int, batches: int, changes: int = 0) -> list[Allocation]:
        """Batch ids and order-id blocks for `batches` batches of `rows` orders, committed;
        with `changes`, each batch's window of that many order ids to change."""
        q = self.q
        if changes:
            record = await self.conn.fetchrow(
                q.reserve_ids_and_changes,
                q.names.orders,
                rows,
                q.sequence_regclass,
                batches,
                changes,
            )
        else:
            record = await self.conn.fetchrow(
                q.reserve_ids, q.names.orders, rows, q.sequence_regclass, batches
            )
        if record is None or record[0] is None:
            raise RuntimeError("order id allocation row is missing; run `cdcfeed init-db`")
        first: int = record[0]
        if not changes:
            return [
                Allocation(batch_id=batch_id, first_order_id=first + index * rows)
                for index, batch_id in enumerate(record[1])
            ]
        cursor: int = record[2]
        allocations = []
        for index, batch_id in enumerate(record[1]):
            # Never past the inserts made before this reservation (`first`).
            start = min(cursor + index * changes, first)
            end = min(cursor + (index + 1) * changes, first)
            allocations.append(Allocation(batch_id, first + index * rows, start, end - start))
        return allocations

    async def open_batch(
        self,
        allocation: Allocation,
        instance: str,
        rows: int,
        feed_file: str,
        generate_seconds: float,
        write_seconds: float,
    ) -> str:
        """Inserts the IN_PROGRESS row (committed on return) and returns its start LSN."""
        start_lsn: str = await self.conn.fetchval(
            self.q.open_batch,
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
        self, batch_id: int, rows: int, copy_seconds: float
    ) -> tuple[str, str, str] | None:
        """Marks the batch COMPLETED; its (start LSN, end LSN, xid), or None if it was settled
        already."""
        record = await self.conn.fetchrow(self.q.complete_batch, batch_id, rows, copy_seconds)
        return None if record is None else (record[0], record[1], record[2])

    async def fail_batch(self, batch_id: int, error: str, copy_seconds: float | None) -> None:
        await self.conn.execute(self.q.fail_batch, batch_id, error[:2000], copy_seconds)

    async def record_unstarted_failure(
        self, allocation: Allocation, instance: str, rows: int, error: str
    ) -> None:
        """A batch that failed before its COPY could start: FAILED, no rows, in one commit."""
        async with self.conn.transaction():
            await self.open_batch(allocation, instance, rows, "", 0.0, 0.0)
            await self.fail_batch(allocation.batch_id, error, None)

    async def decide(
        self,
        batch_id: int,
        first_order_id: int,
        row_count: int,
        xid: str | None,
        reason: str,
        updated: int = 0,
        deleted: int = 0,
    ) -> Settlement:
        """Settles an IN_PROGRESS batch whose row lock the caller holds, in its transaction.

        Under the lock no transaction of the batch is running and none will start. Its
        transaction wrote its xid (and what it updated and deleted) into the row by its
        claim, so an xid says it committed, with the counts as recorded. Counting the block's
        orders would not do: later batches may have deleted some. A row without an xid either
        rolled back (no order of its block exists) or was written by an older cdcfeed, which
        did not record one and only inserted: any order of its block left says it committed,
        and then all of the block did (a COPY commits all of its rows or none), whatever later
        batches deleted since. Its xid is the xmin of an order nobody updated since (an
        update's xmin is the updater's); none left, the row keeps no xid, as older ones have.
        """
        q = self.q
        if xid is not None:
            end_lsn = await self.conn.fetchval(q.recover_batch, batch_id, row_count, xid)
            return Settlement("COMPLETED", end_lsn, row_count, updated, deleted)
        present = await self.conn.fetchval(q.count_block, first_order_id, row_count, batch_id)
        if not present:
            await self.fail_batch(batch_id, reason, None)
            return Settlement("FAILED")
        xid = await self.conn.fetchval(q.block_xid, first_order_id, row_count, batch_id)
        end_lsn = await self.conn.fetchval(q.recover_batch, batch_id, row_count, xid)
        return Settlement("COMPLETED", end_lsn, row_count)

    async def settle(self, batch_id: int, reason: str) -> Settlement:
        """Decides a batch of this process whose COPY outcome was not recorded (connection
        lost, shutdown), from what the database holds: under its row lock, as reconciliation
        does."""
        async with self.conn.transaction():
            try:
                row = await self.conn.fetchrow(self.q.lock_batch, batch_id)
            except asyncpg.LockNotAvailableError:
                return Settlement("IN_PROGRESS")
            if row is None:
                return Settlement("NOT_STARTED")
            status, first_order_id, row_count, xid, end_lsn, updated, deleted = row
            if status != "IN_PROGRESS":
                return Settlement(status, end_lsn, row_count, updated, deleted)
            return await self.decide(
                batch_id, first_order_id, row_count, xid, reason, updated, deleted
            )

    async def settle_abandoned(
        self, instance: str, run_started: datetime, *, own: bool = False
    ) -> list[Settled]:
        """Settles one slice of abandoned batches in one transaction; returns what it decided.

        `own`: only this instance's earlier runs' batches, waiting for the locks of any COPY
        still running (see `claim_earlier_runs`); otherwise every abandoned batch, skipping
        locked ones.
        """
        settled: list[Settled] = []
        claim = self.q.claim_earlier_runs if own else self.q.claim_abandoned
        async with self.conn.transaction():
            claimed = await self.conn.fetch(claim, instance, run_started, SETTLE_SLICE)
            for batch_id, first_order_id, row_count, xid, owner, updated, deleted in claimed:
                decided = await self.decide(
                    batch_id, first_order_id, row_count, xid, INTERRUPTED, updated, deleted
                )
                settled.append(
                    Settled(
                        batch_id,
                        owner,
                        decided.status,
                        decided.row_count,
                        decided.end_lsn,
                        decided.updated,
                        decided.deleted,
                    )
                )
        return settled

    async def recent_batches(self, limit: int) -> list[dict[str, Any]]:
        records = await self.conn.fetch(self.q.recent_batches, limit)
        return [dict(record) for record in records]

    # --- leases (leases.py) -----------------------------------------------------------------

    async def register_lease(self, instance: str, duration: float) -> tuple[datetime, bool]:
        """Takes the lease; (this run's start, whether a live lease of the name was there)."""
        record = await self.conn.fetchrow(self.q.register_instance, instance, duration)
        assert record is not None
        return record[0], record[1]

    async def renew_lease(self, instance: str, duration: float, started_at: datetime) -> datetime:
        """Renews the lease; the start of the run that holds it now."""
        started: datetime = await self.conn.fetchval(
            self.q.renew_lease, instance, duration, started_at
        )
        return started

    async def release_lease(self, instance: str, started_at: datetime) -> None:
        await self.conn.execute(self.q.release_lease, instance, started_at)
