"""Settling batches a dead run left IN_PROGRESS, so that none stays there; guarded by leases.

Every instance keeps a lease row in `cdcfeed_instances`, renewed each heartbeat. At start, before
its first batch, an instance settles what its own earlier run left IN_PROGRESS; on every
heartbeat after that it also settles the batches of instances whose lease lapsed. Settling
looks at the xid the batch's transaction wrote into its row: there → COMPLETED (recovered,
its counts as recorded, `end_lsn` from then); absent → FAILED, `interrupted` (`Ledger.decide`;
rows of older versions without an xid are decided by their order-id block).

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
from datetime import datetime

from loguru import logger

from cdcfeed.config import DaemonSettings
from cdcfeed.database import Database, Settled
from cdcfeed.database.ledger import INTERRUPTED, SETTLE_SLICE
from cdcfeed.errors import DatabaseBusy, DatabaseRefused, DatabaseUnavailable
from cdcfeed.lifecycle import changed
from cdcfeed.retry import Backoff, retry
from cdcfeed.throttle import Throttle


def _log(batch: Settled, instance: str) -> None:
    whose = "an earlier run" if batch.instance == instance else f"instance {batch.instance}"
    log = logger.bind(batch_id=batch.batch_id)
    if batch.status == "COMPLETED":
        log.warning(
            f"batch {batch.batch_id} left IN_PROGRESS by {whose}: COMPLETED (recovered) "
            f"rows={batch.row_count}{changed(batch.updated, batch.deleted)} "
            f"end_lsn={batch.end_lsn}"
        )
    else:
        log.warning(f"batch {batch.batch_id} left IN_PROGRESS by {whose}: FAILED ({INTERRUPTED})")


class InstanceLease:
    """This instance's lease, and the reconciliation that runs on its heartbeat."""

    def __init__(self, database: Database, instance: str, settings: DaemonSettings) -> None:
        self._database = database
        self.instance = instance
        self.heartbeat_interval = settings.heartbeat_interval
        self.lease_duration = settings.lease_duration
        self.started_at: datetime | None = None
        self._warned_duplicate = False

    async def acquire(self) -> None:
        """Takes the lease (before the first batch) and settles what was left behind."""
        self.started_at, was_live = await self._database.register_lease(
            self.instance, self.lease_duration
        )
        if was_live:
            # A restart after a crash looks the same; but two processes under one name would
            # settle each other's batches (safely, yet needlessly), so say so.
            logger.warning(
                f"instance name {self.instance!r} still held a live lease: if another cdcfeed "
                "runs under this name, give each its own [daemon] instance"
            )
        try:
            await self.reconcile(own=True)
        except DatabaseBusy:
            # A lock held past the statement timeout: the heartbeat's passes retry it.
            logger.warning("an earlier run's batch is still locked; settling it later")
        await self.reconcile()

    async def reconcile(self, own: bool = False) -> int:
        """Settles abandoned batches, a slice per transaction, until none is left to claim."""
        assert self.started_at is not None
        total = 0
        while True:
            settled = await self._database.settle_abandoned(self.instance, self.started_at, own=own)
            for batch in settled:
                _log(batch, self.instance)
            total += len(settled)
            if len(settled) < SETTLE_SLICE:
                return total

    async def renew(self) -> None:
        assert self.started_at is not None
        started = await self._database.renew_lease(
            self.instance, self.lease_duration, self.started_at
        )
        if started != self.started_at and not self._warned_duplicate:
            self._warned_duplicate = True
            logger.warning(
                f"another process registered as instance {self.instance!r}: give each "
                "cdcfeed its own [daemon] instance"
            )

    async def _beat(self) -> None:
        await self.renew()
        await self.reconcile()

    async def keep(self) -> None:
        """The supervised heartbeat: renew, then reconcile, every interval, until cancelled.

        An unreachable database only pauses it (the lease may lapse meanwhile, which is
        safe: see the module docstring); a refusal (a statement timeout, a serialization
        hiccup, a privilege revoked) is retried next beat, logged once per interval; any
        other error ends it, and so the daemon.
        """
        every_beat = Backoff(self.heartbeat_interval, self.heartbeat_interval, jitter=False)
        unreachable = False
        throttle = Throttle()

        def log(attempt: int, exc: BaseException, pause: float) -> None:
            nonlocal unreachable
            if isinstance(exc, DatabaseRefused):
                held_back = throttle.due(exc.sqlstate)
                if held_back is not None:
                    logger.warning(f"lease heartbeat: {exc}; retrying{throttle.suffix(held_back)}")
                return
            if not unreachable:
                logger.warning(f"lease not renewed: database unavailable ({exc})")
            unreachable = True

        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await retry(
                self._beat,
                what="lease heartbeat",
                backoff=every_beat,
                retry_on=(DatabaseUnavailable, DatabaseRefused),
                log=log,
            )
            if unreachable:
                logger.info("lease renewed")
            unreachable = False

    async def release(self) -> None:
        """Ends the lease at a clean stop, so others may settle what shutdown left at once."""
        if self.started_at is None:
            return
        with contextlib.suppress(DatabaseUnavailable):
            await self._database.release_lease(self.instance, self.started_at)
