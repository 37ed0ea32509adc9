"""Settling batches a dead run left IN_PROGRESS, so that none stays there; guarded by leases.

Every instance keeps a lease row in `cdcfeed_instances`, renewed each heartbeat. At start, before
its first batch, an instance settles what its own earlier run left IN_PROGRESS; on every
heartbeat after that it also settles the batches of instances whose lease lapsed. Settling
looks at the order-id block: rows present → COMPLETED (recovered, `row_count` counted, `end_lsn`
from then); absent → FAILED, `interrupted`.

Why this is safe with any number of settlers, and even when a "dead" owner is only slow: the
loader holds its batch row locked for the whole COPY transaction (`claim_batch`, step 4 in
`batch.py`), and settlers take rows `FOR UPDATE SKIP LOCKED` and decide them while holding the
lock. A running COPY is therefore never decided; two settlers never decide the same batch; and
a loader that reaches its COPY after a settler failed the batch finds no IN_PROGRESS row and
loads nothing. The lease only keeps settlers away from live instances' batches, so that a
healthy instance's batch between its IN_PROGRESS mark and its COPY is not failed needlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from loguru import logger

from cdcfeed.config import DaemonSettings
from cdcfeed.db import Connection, describe_error, with_connection
from cdcfeed.errors import DatabaseUnavailable
from cdcfeed.ledger import decide
from cdcfeed.sql import Names

# Batches settled per transaction: bounds how long a settler holds row locks after a crash
# that left many batches behind; the next heartbeat takes the next slice.
SETTLE_SLICE = 100
INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class Settled:
    batch_id: int
    instance: str
    status: str  # COMPLETED or FAILED
    row_count: int
    end_lsn: str | None


async def settle_abandoned(
    conn: Connection, names: Names, instance: str, run_started: datetime, *, own: bool = False
) -> list[Settled]:
    """Settles one slice of abandoned batches in one transaction; returns what it decided.

    `own`: only this instance's earlier runs' batches, waiting for the locks of any COPY still
    running (see `claim_earlier_runs`); otherwise every abandoned batch, skipping locked ones.
    """
    settled: list[Settled] = []
    claim = names.q.claim_earlier_runs if own else names.q.claim_abandoned
    async with conn.transaction():
        claimed = await conn.fetch(claim, instance, run_started, SETTLE_SLICE)
        for batch_id, first_order_id, row_count, xid, owner in claimed:
            decided = await decide(
                conn, names, batch_id, first_order_id, row_count, xid, INTERRUPTED
            )
            settled.append(
                Settled(batch_id, owner, decided.status, decided.row_count, decided.end_lsn)
            )
    return settled


def _log(batch: Settled, instance: str) -> None:
    whose = "an earlier run" if batch.instance == instance else f"instance {batch.instance}"
    log = logger.bind(batch_id=batch.batch_id)
    if batch.status == "COMPLETED":
        log.warning(
            f"batch {batch.batch_id} left IN_PROGRESS by {whose}: COMPLETED (recovered) "
            f"rows={batch.row_count} end_lsn={batch.end_lsn}"
        )
    else:
        log.warning(f"batch {batch.batch_id} left IN_PROGRESS by {whose}: FAILED ({INTERRUPTED})")


class Lease:
    """This instance's lease, and the reconciliation that runs on its heartbeat."""

    def __init__(
        self, pool: asyncpg.Pool, names: Names, instance: str, settings: DaemonSettings
    ) -> None:
        self._pool = pool
        self._names = names
        self.instance = instance
        self.heartbeat_interval = settings.heartbeat_interval
        self.lease_duration = settings.lease_duration
        self.started_at: datetime | None = None
        self._warned_duplicate = False

    async def acquire(self) -> None:
        """Takes the lease (before the first batch) and settles what was left behind."""
        record = await with_connection(
            self._pool,
            lambda conn: conn.fetchrow(
                self._names.q.register_instance, self.instance, self.lease_duration
            ),
        )
        assert record is not None
        self.started_at, was_live = record[0], record[1]
        if was_live:
            # A restart after a crash looks the same; but two processes under one name would
            # settle each other's batches (safely, yet needlessly), so say so.
            logger.warning(
                f"instance name {self.instance!r} still held a live lease: if another cdcfeed "
                "runs under this name, give each its own [daemon] instance"
            )
        try:
            await self.reconcile(own=True)
        except asyncpg.QueryCanceledError:
            # A lock held past the statement timeout: the heartbeat's passes retry it.
            logger.warning("an earlier run's batch is still locked; settling it later")
        await self.reconcile()

    async def reconcile(self, own: bool = False) -> int:
        """Settles abandoned batches, a slice per transaction, until none is left to claim."""
        assert self.started_at is not None
        started = self.started_at
        total = 0
        while True:
            settled = await with_connection(
                self._pool,
                lambda conn: settle_abandoned(conn, self._names, self.instance, started, own=own),
            )
            for batch in settled:
                _log(batch, self.instance)
            total += len(settled)
            if len(settled) < SETTLE_SLICE:
                return total

    async def renew(self) -> None:
        started = await with_connection(
            self._pool,
            lambda conn: conn.fetchval(
                self._names.q.renew_lease, self.instance, self.lease_duration, self.started_at
            ),
        )
        if started != self.started_at and not self._warned_duplicate:
            self._warned_duplicate = True
            logger.warning(
                f"another process registered as instance {self.instance!r}: give each "
                "cdcfeed its own [daemon] instance"
            )

    async def keep(self) -> None:
        """The supervised heartbeat: renew, then reconcile, every interval, until cancelled.

        An unreachable database only pauses it (the lease may lapse meanwhile, which is
        safe: see the module docstring); any other error ends it, and so the daemon.
        """
        unreachable = False
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.renew()
                await self.reconcile()
            except DatabaseUnavailable as exc:
                if not unreachable:
                    logger.warning(f"lease not renewed: database unavailable ({exc})")
                unreachable = True
                continue
            except asyncpg.PostgresError as exc:
                # A statement timeout or a serialization hiccup is worth a retry next beat;
                # anything else (a dropped table, say) is not something to run on with.
                if not isinstance(
                    exc,
                    asyncpg.QueryCanceledError
                    | asyncpg.LockNotAvailableError
                    | asyncpg.TransactionRollbackError,
                ):
                    raise
                logger.warning(f"lease heartbeat: {describe_error(exc)}; retrying")
                continue
            if unreachable:
                logger.info("lease renewed")
            unreachable = False

    async def release(self) -> None:
        """Ends the lease at a clean stop, so others may settle what shutdown left at once."""
        if self.started_at is None:
            return
        started = self.started_at
        with contextlib.suppress(DatabaseUnavailable):
            await with_connection(
                self._pool,
                lambda conn: conn.execute(self._names.q.release_lease, self.instance, started),
            )
