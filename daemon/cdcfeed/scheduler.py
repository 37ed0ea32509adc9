"""Firing batches at the configured rate with APScheduler, up to `concurrency` at once.

The APScheduler job only *starts* a batch (or counts why it could not): batches run as tasks
of their own, so a slow batch never delays the next arrival, and a run that finds every slot
busy — or the database down — is counted as skipped, never queued without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_SUBMITTED, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from loguru import logger

from cdcfeed.batch import settle_reserve
from cdcfeed.endpoint import Readiness
from cdcfeed.metrics import Metrics

SKIP_SUMMARY_SECONDS = 10.0

RateFunction = Callable[[float], float]
BatchFactory = Callable[[int], Coroutine[Any, Any, None]]


class RateTrigger(BaseTrigger):  # type: ignore[misc]
    """Arrivals at `rate(elapsed)` batches per second, evenly spaced.

    Times are kept as float seconds since the start and only turned into datetimes at the
    edge, so microsecond rounding never accumulates into rate drift.
    """

    def __init__(self, rate: RateFunction, start: datetime) -> None:
        self.rate = rate
        self.start = start
        self._elapsed: dict[datetime, float] = {}

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        if previous_fire_time is None:
            elapsed = 0.0
        else:
            previous = self._elapsed.get(previous_fire_time)
            if previous is None:
                previous = (previous_fire_time - self.start).total_seconds()
            elapsed = previous + 1.0 / self.rate(previous)
        fire_time = self.start + timedelta(seconds=elapsed)
        self._elapsed[fire_time] = elapsed
        if len(self._elapsed) > 1024:  # only the last few are ever asked about again
            for key in list(self._elapsed)[:512]:
                del self._elapsed[key]
        return fire_time

    def __str__(self) -> str:
        return "cdcfeed rate"


class SkipLog:
    """Counts skipped runs by reason; logs the first at once, then a summary per interval."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._pending: Counter[str] = Counter()
        self._last_log = float("-inf")

    def skipped(self, reason: str) -> None:
        self._metrics.skipped.labels(reason).inc()
        self._pending[reason] += 1
        now = time.monotonic()
        if now - self._last_log >= SKIP_SUMMARY_SECONDS:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        if self._pending:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self._pending.items()))
            logger.warning(f"skipped scheduled runs ({counts}): the daemon is behind its rate")
            self._pending.clear()
        self._last_log = time.monotonic() if now is None else now


class LoadScheduler:
    def __init__(
        self,
        *,
        rate: RateFunction,
        concurrency: int,
        max_batches: int,
        duration: float,
        grace_period: float,
        metrics: Metrics,
        start_batch: BatchFactory,
        blocked: Callable[[], str | None],
        stop: asyncio.Event,
        readiness: Readiness,
    ) -> None:
        self._rate = rate
        self._concurrency = concurrency
        self._max_batches = max_batches
        self._duration = duration
        self._grace = grace_period
        self._metrics = metrics
        self._start_batch = start_batch
        self._blocked = blocked
        self._stop = stop
        self._enough = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._started = 0
        self._skips = SkipLog(metrics)
        self._job_failure: BaseException | None = None
        self._readiness = readiness

    @property
    def started(self) -> int:
        return self._started

    async def _fire(self) -> None:
        if self._enough.is_set() or self._stop.is_set():
            return
        if len(self._in_flight) >= self._concurrency:
            self._skips.skipped("busy")
            return
        reason = self._blocked()
        if reason is not None:
            self._skips.skipped(reason)
            return
        sequence = self._started
        self._started += 1
        task = asyncio.create_task(self._start_batch(sequence), name=f"batch-{sequence}")
        self._in_flight.add(task)
        self._metrics.in_flight.set(len(self._in_flight))
        self._metrics.batch_started()
        task.add_done_callback(self._batch_done)
        if self._max_batches and self._started >= self._max_batches:
            self._enough.set()

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._metrics.in_flight.set(len(self._in_flight))
        if not task.cancelled() and task.exception() is not None:
            # run_batch handles every failure itself: an escape here is a bug, so stop loudly.
            self._job_failure = task.exception()
            logger.opt(exception=task.exception()).error(f"{task.get_name()} crashed")
            self._stop.set()

    def _on_submitted(self, event: Any) -> None:
        now = datetime.now(UTC)
        for run_time in event.scheduled_run_times:
            self._metrics.schedule_lag.observe(max(0.0, (now - run_time).total_seconds()))
        self._metrics.target_rate.set(self._rate(self._elapsed()))

    def _on_error(self, event: JobExecutionEvent) -> None:
        self._job_failure = event.exception
        logger.error(f"the batch scheduler failed: {event.exception!r}")
        self._stop.set()

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    async def run(self) -> None:
        """Fires batches until stopped, max_batches started, or duration over; then drains."""
        self._t0 = time.monotonic()
        start = datetime.now(UTC) + timedelta(milliseconds=5)
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        scheduler.add_job(
            self._fire,
            RateTrigger(self._rate, start),
            id="cdcfeed-batches",
            max_instances=1_000_000,  # the job only starts a task; concurrency is ours
            coalesce=False,  # a late run still fires, and is counted if it cannot start
            misfire_grace_time=None,
        )
        self._metrics.target_rate.set(self._rate(0.0))
        scheduler.start()
        self._readiness.scheduler_running = True
        try:
            waits = [
                asyncio.ensure_future(self._stop.wait()),
                asyncio.ensure_future(self._enough.wait()),
            ]
            timeout = self._duration or None
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waits:
                waiter.cancel()
        finally:
            scheduler.shutdown(wait=False)
            self._readiness.scheduler_running = False
            self._skips.flush()
            await self._drain()
        if self._job_failure is not None:
            raise RuntimeError("batch scheduling failed") from self._job_failure

    async def _drain(self) -> None:
        """Lets in-flight batches finish; after a stop signal, only within the grace period.

        Batches get the grace period less the time reserved for settling those cut off, so
        that the whole shutdown stays inside the grace period.
        """
        pending = {task for task in self._in_flight if not task.done()}
        if pending and not self._stop.is_set():
            # A natural end (max_batches, duration): wait for them, unless a signal comes.
            stop_wait = asyncio.ensure_future(self._stop.wait())
            while pending and not stop_wait.done():
                await asyncio.wait({*pending, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                pending = {task for task in pending if not task.done()}
            stop_wait.cancel()
        if not pending:
            return
        budget = max(0.0, self._grace - settle_reserve(self._grace))
        logger.info(f"stopping: {len(pending)} batch(es) in flight get {budget:.1f}s to finish")
        _, pending = await asyncio.wait(pending, timeout=budget)
        if pending:
            logger.warning(f"grace period over: cutting off {len(pending)} batch(es)")
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
