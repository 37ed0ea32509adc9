"""Replication slots as a CDC pipeline's progress: lag in bytes, batches and seconds.

The monitor reads `pg_replication_slots` every poll and exports, per watched slot, how far
the slot trails the WAL, how much WAL it pins, whether a consumer is attached, how many
COMPLETED batches it has not confirmed, and how long each batch took from completion to
confirmation. It keeps reporting while no consumer is attached, which is exactly when the
numbers matter (postgres_exporter stops reporting `confirmed_flush_lsn` for inactive slots).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client import Gauge
from prometheus_client.metrics import MetricWrapperBase

from cdcfeed.database import Database, SlotSnapshot, SlotState
from cdcfeed.errors import DatabaseRefused, DatabaseUnavailable
from cdcfeed.metrics import Metrics
from cdcfeed.retry import Backoff, first_failure, retry
from cdcfeed.throttle import Throttle


@dataclass
class _Confirmations:
    """What the last poll saw of one slot, to time the batches it confirms next."""

    confirmed: int
    waiting: list[int] = field(default_factory=list)


class SlotMonitor:
    """Sets the per-slot metrics from one poll; keeps what it needs between polls."""

    def __init__(self, watched: Sequence[str], metrics: Metrics) -> None:
        self.watched = tuple(watched)
        self.metrics = metrics
        self._seen: dict[str, _Confirmations] = {}

    async def poll(self, database: Database) -> list[SlotState]:
        # One snapshot for the slots' positions and the ledger, so a batch is either
        # IN_PROGRESS (and looked at again next poll) or visible with its end_lsn.
        async with database.slot_snapshot() as snapshot:
            slots = await snapshot.slots(self.watched)
            in_progress = await snapshot.in_progress_ids()
            for slot in slots:
                await self._export(snapshot, slot, in_progress)
        present = {slot.name for slot in slots}
        for gone in set(self._seen) - present:
            self._forget(gone)
        return slots

    async def _export(
        self, snapshot: SlotSnapshot, slot: SlotState, in_progress: list[int]
    ) -> None:
        name = slot.name
        confirmed = slot.confirmed_flush_lsn
        unconfirmed: int | None = None
        seconds: list[float] = []
        seen = self._seen.get(name)
        if confirmed is not None:
            unconfirmed = await snapshot.unconfirmed(confirmed)
            if seen is None:
                # Batches confirmed before the first look cannot be timed: start from here.
                self._seen[name] = _Confirmations(confirmed, in_progress)
            else:
                if confirmed > seen.confirmed or seen.waiting:
                    seconds = await snapshot.newly_confirmed(
                        confirmed, seen.confirmed, seen.waiting
                    )
                # A slot restored to an older position by crash recovery confirms the same
                # batches again; they were timed the first time.
                seen.confirmed = max(seen.confirmed, confirmed)
                seen.waiting = in_progress
        # All of a slot's series change together, after the queries, so that a scrape never
        # sees the unconfirmed count drop before the confirmations it stands for.
        m = self.metrics
        m.slot_active.labels(name).set(1 if slot.active else 0)
        _set_or_clear(m.slot_retained, name, _behind(slot.insert_lsn, slot.restart_lsn))
        _set_or_clear(m.slot_safe_wal, name, slot.safe_wal_size)
        _set_or_clear(m.slot_lag, name, _behind(slot.insert_lsn, confirmed))
        _set_or_clear(m.unconfirmed, name, unconfirmed)
        histogram = m.confirm_seconds.labels(name)
        for value in seconds:
            histogram.observe(value)

    def _forget(self, name: str) -> None:
        m = self.metrics
        for metric in (
            m.slot_active,
            m.slot_lag,
            m.slot_retained,
            m.slot_safe_wal,
            m.unconfirmed,
            m.confirm_seconds,
        ):
            _remove(metric, name)
        self._seen.pop(name, None)
        logger.info(f"replication slot {name} is gone; its metrics are removed")


def _behind(insert_lsn: int, lsn: int | None) -> int | None:
    return None if lsn is None else max(0, insert_lsn - lsn)


def _set_or_clear(gauge: Gauge, slot: str, value: int | None) -> None:
    if value is None:
        # An unknown value must not show the last known one as current.
        _remove(gauge, slot)
    else:
        gauge.labels(slot).set(value)


def _remove(metric: MetricWrapperBase, slot: str) -> None:
    with contextlib.suppress(KeyError):  # never set, or already removed
        metric.remove(slot)


async def watch_slots(
    database: Database,
    watched: Sequence[str],
    poll_interval: float,
    metrics: Metrics,
) -> None:
    """The daemon's slot monitor: a poll per interval, forever; rides out database outages."""
    monitor = SlotMonitor(watched, metrics)
    backoff = Backoff(initial=poll_interval, maximum=max(poll_interval, 10.0))
    unreachable = first_failure(lambda exc: f"slot monitor: database unreachable ({exc})")
    throttle = Throttle()

    def log(attempt: int, exc: BaseException, pause: float) -> None:
        if not isinstance(exc, DatabaseRefused):
            unreachable(attempt, exc, pause)
            return
        held_back = throttle.due(exc.sqlstate)  # a privilege revoked, say: retried
        if held_back is not None:
            logger.warning(f"slot monitor: {exc}; retrying{throttle.suffix(held_back)}")

    while True:
        await retry(
            lambda: monitor.poll(database),
            what="slot monitor",
            backoff=backoff,
            retry_on=(DatabaseUnavailable, DatabaseRefused),
            log=log,
        )
        await asyncio.sleep(poll_interval)
