"""Firing batches along the load profile with APScheduler, up to `concurrency` at once.

The APScheduler job only *starts* a batch (or counts why it could not): batches run as tasks
of their own, so a slow batch never delays the next arrival, and a run that finds every slot
busy — or the database down — is counted as skipped, never queued without bound.

Above capacity the arrivals are not handled one by one: that costs the event loop a wake-up
per arrival, and at ten or a hundred times capacity the loop would spend itself on runs it
can only skip while batches, heartbeats and shutdown wait. Instead, when every slot is taken
(or a batch may not start), the job is *held*: paused until a slot frees (or, when blocked,
until a short recheck), then the arrivals missed meanwhile are counted as skipped in one step
from the arrival schedule (`Arrivals.skip_until`), and the latest of them runs at once —
coalesced, as APScheduler's `coalesce` would, but without stepping through every missed run.
That run starts straight from the hold, and the job stays paused while runs started that way
keep every slot busy: flat out, a batch costs no APScheduler wake-up of its own.

Schedule lag is measured when a run really starts, against its planned time: it includes
APScheduler's own wake-up delay (for the runs it fires) and any time the event loop was busy,
which is what a soak test needs to know. Runs that start late, and skipped runs, are logged
as a warning summary.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_SUBMITTED, JobExecutionEvent
from apscheduler.job import Job
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from loguru import logger

from cdcfeed.endpoint import Readiness
from cdcfeed.load.profiles import Arrivals
from cdcfeed.metrics import Metrics

SKIP_SUMMARY_SECONDS = 10.0
# A run this late means the daemon is not keeping up (a GC pause or a busy loop stays below).
LATE_SECONDS = 0.25
# The first arrival is planned this far ahead, so that it is not late before it is due.
START_DELAY_SECONDS = 0.005
# After a long gap a run starts late: epoll waits whole milliseconds, an idle virtual CPU
# takes a millisecond or two to wake, and APScheduler's wake-up path, run with cold caches
# after a second of idleness, takes ~4 ms (py-spy at 1 run/s; ~0.1 ms when warm). So after a
# gap this long the job is fired EARLY_SECONDS ahead and waits out the rest itself: only that
# last short wait stands between the arrival and the run. At higher rates the loop never idles
# long enough to need it, and one timer per arrival is enough.
EARLY_SECONDS = 0.02
EARLY_AFTER_GAP_SECONDS = 0.05

# While a batch may not start (database down, disk full), how often to look again.
BLOCKED_RECHECK_SECONDS = 0.1

BatchFactory = Callable[[int], Coroutine[Any, Any, None]]


def settle_reserve(grace_period: float) -> float:
    """The part of the grace period kept for settling batches that shutdown cut off."""
    return min(2.0, grace_period / 2)


class ArrivalTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at the planned times of `arrivals`, seconds after `start`.

    APScheduler asks for the time after a given fire time more than once (while collecting
    missed runs, then again to store the next), so each answer is remembered: a Poisson gap
    is drawn once. Times are float seconds since the start, turned into datetimes only at
    the edge, so microsecond rounding never accumulates into rate drift. Two arrivals inside
    one microsecond are kept a microsecond apart: APScheduler tells runs apart by their time.
    After a long gap a run fires EARLY_SECONDS ahead; `planned` maps it to its arrival time.
    """

    def __init__(self, arrivals: Arrivals, start: datetime) -> None:
        self.arrivals = arrivals
        self.start = start
        self.exhausted = False  # the profile has no more arrivals
        self.planned: dict[datetime, datetime] = {}  # fire time -> arrival time, until taken
        self._following: dict[datetime | None, datetime | None] = {}
        self._last_arrival = 0.0

    def get_next_fire_time(
        self, previous_fire_time: datetime | None, now: datetime
    ) -> datetime | None:
        if previous_fire_time in self._following:
            return self._following[previous_fire_time]
        elapsed = self.arrivals.next()
        fire_time = None
        if elapsed is None:
            self.exhausted = True
        else:
            arrival = self.start + timedelta(seconds=elapsed)
            early = EARLY_SECONDS if elapsed - self._last_arrival >= EARLY_AFTER_GAP_SECONDS else 0
            self._last_arrival = elapsed
            fire_time = arrival - timedelta(seconds=early)
            if previous_fire_time is not None and fire_time <= previous_fire_time:
                fire_time = previous_fire_time + timedelta(microseconds=1)
            self.planned[fire_time] = max(arrival, fire_time)
        self._following[previous_fire_time] = fire_time
        if len(self._following) > 64:  # only the last one or two are ever asked about again
            for key in list(self._following)[:32]:
                del self._following[key]
        return fire_time

    def catch_up(self, now: datetime, keep_latest: bool) -> tuple[int, datetime | None]:
        """After a hold: drops the arrivals due by `now` in one step, however many there are.

        Returns (how many were dropped, the job's next fire time, None when the profile has
        no more arrivals). With `keep_latest` the latest arrival due is kept, its fire time in
        the past, so that it runs at once for all of them; otherwise the next fire time is the
        next arrival after `now`.
        """
        # The arrivals drawn for fire times the hold took from the job: never submitted.
        taken = sorted(self.planned.items(), key=lambda item: item[1])
        self.planned.clear()
        self._following.clear()  # APScheduler will ask about the fire time returned here only
        due = [item for item in taken if item[1] <= now]
        ahead = [item for item in taken if item[1] > now]
        dropped = len(due)
        kept = due[-1] if due else None
        if not ahead:  # the arrivals not drawn yet may be due too
            count, last = self.arrivals.skip_until((now - self.start).total_seconds())
            dropped += count
            if last is not None:
                arrival = self.start + timedelta(seconds=last)
                kept = (arrival, arrival)
                self._last_arrival = last  # no gap before the next: it is not fired early
        if keep_latest and kept is not None:
            fire_time, arrival = kept
            self.planned[fire_time] = arrival
            return dropped - 1, fire_time
        if ahead:
            self.planned.update(ahead)
            return dropped, ahead[0][0]
        return dropped, self.get_next_fire_time(None, now)

    def take_due(self, fire_time: datetime, now: datetime) -> datetime | None:
        """The arrival planned for `fire_time`, taken from the plan when it is due by `now`
        (the caller runs it without the job); None when it is still ahead."""
        arrival = self.planned.get(fire_time, fire_time)
        if arrival > now:
            return None
        self.planned.pop(fire_time, None)
        return arrival

    def __str__(self) -> str:
        return "cdcfeed arrivals"


class SkipLog:
    """Counts skipped and late runs; logs the first at once, then a summary per interval."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._pending: Counter[str] = Counter()
        self._late = 0
        self._worst_lag = 0.0
        self._last_log = float("-inf")

    def skipped(self, reason: str, count: int = 1) -> None:
        self._metrics.skipped_reason[reason].inc(count)
        self._pending[reason] += count
        self.tick()

    def started(self, lag: float) -> None:
        if lag > LATE_SECONDS:
            self._late += 1
            self._worst_lag = max(self._worst_lag, lag)
        self.tick()

    def tick(self) -> None:
        """Called on every run: a summary is due once per interval while anything is pending."""
        now = time.monotonic()
        if (self._pending or self._late) and now - self._last_log >= SKIP_SUMMARY_SECONDS:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        parts = []
        if self._pending:
            counts = ", ".join(f"{reason}={n}" for reason, n in sorted(self._pending.items()))
            parts.append(f"skipped scheduled runs ({counts})")
            self._pending.clear()
        if self._late:
            parts.append(
                f"{self._late} run(s) started over {LATE_SECONDS * 1000:.0f}ms late "
                f"(worst {self._worst_lag:.3f}s)"
            )
            self._late, self._worst_lag = 0, 0.0
        if parts:
            logger.warning(f"{'; '.join(parts)}: the daemon is behind its rate")
            self._last_log = time.monotonic() if now is None else now


class LoadScheduler:
    def __init__(
        self,
        *,
        arrivals: Arrivals,
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
        self._arrivals = arrivals
        self._trigger: ArrivalTrigger | None = None
        self._planned: deque[datetime] = deque()  # of runs submitted, not yet started
        self._waiting = 0  # runs fired early, waiting for their arrival time
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
        self._job: Job | None = None
        self._held: str | None = None  # why no run may start now: a skip reason
        self._paused = False  # the APScheduler job; it stays paused across direct runs
        self._recheck: asyncio.TimerHandle | None = None

    @property
    def started(self) -> int:
        return self._started

    async def _fire(self) -> None:
        planned = self._planned.popleft() if self._planned else None
        if planned is not None:
            ahead = (planned - datetime.now(UTC)).total_seconds()
            if ahead > 0:  # fired early on purpose (EARLY_SECONDS)
                self._waiting += 1
                try:
                    await asyncio.sleep(ahead)
                finally:
                    self._waiting -= 1
        self._run(planned)

    def _run(self, planned: datetime | None) -> None:
        """Starts a batch for the arrival planned at `planned`, or counts why it cannot."""
        if self._enough.is_set() or self._stop.is_set():
            return
        if planned is not None:
            lag = max(0.0, (datetime.now(UTC) - planned).total_seconds())
            self._metrics.schedule_lag.observe(lag)
            self._skips.started(lag)
        if self._trigger is not None and self._trigger.exhausted and not self._planned:
            self._enough.set()  # the profile's last arrival: this run is the last
        if len(self._in_flight) >= self._concurrency:
            self._skip("busy")  # a run submitted before the hold
            return
        reason = self._blocked()
        if reason is not None:
            self._skip(reason)
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
        elif len(self._in_flight) >= self._concurrency:
            self._hold("busy")

    def _skip(self, reason: str) -> None:
        self._skips.skipped(reason)
        self._hold(reason)

    def _hold(self, reason: str) -> None:
        """Pauses the job: no wake-up per arrival while no batch could start."""
        if self._held is not None or self._job is None:
            return
        if not self._paused:
            try:
                self._job.pause()
            except JobLookupError:
                return  # the profile's last arrival was submitted: nothing left to hold
            self._paused = True
        self._held = reason
        if reason != "busy":
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(BLOCKED_RECHECK_SECONDS, self._release)

    def _release(self) -> None:
        """Ends a hold (a slot is free, or time to look again): the arrivals missed meanwhile
        are counted in one step, and the latest of them runs now if a batch may start."""
        try:
            self._release_hold()
        except Exception as exc:
            # Called back by the loop, where an error would only be logged, leaving the job
            # held for good: a bug here stops the daemon loudly instead.
            self._on_error(JobExecutionEvent(EVENT_JOB_ERROR, "cdcfeed-batches", None, None, exc))

    def _release_hold(self) -> None:
        self._recheck = None
        reason = self._held
        if reason is None or self._trigger is None or self._job is None:
            return
        if self._enough.is_set() or self._stop.is_set():
            return
        blocked = None if reason == "busy" else self._blocked()
        now = datetime.now(UTC)
        dropped, fire_time = self._trigger.catch_up(now, blocked is None)
        if dropped:
            self._skips.skipped(reason, dropped)
        if fire_time is None:  # the profile has no more arrivals
            self._enough.set()
            return
        if blocked is not None:
            self._held = blocked
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(BLOCKED_RECHECK_SECONDS, self._release)
            return
        self._held = None
        if arrival := self._trigger.take_due(fire_time, now):
            # Already due: it runs here, and the job stays paused while that fills the slot
            # again. Saturated, a batch a slot is the whole of the scheduling: resuming the
            # job only to run this arrival and pause it again cost a third of the daemon's
            # CPU per batch (py-spy at 100-row batches flat out).
            self._run(arrival)
            if self._held is not None or self._enough.is_set() or self._stop.is_set():
                return
            fire_time = self._trigger.get_next_fire_time(fire_time, now)
            if fire_time is None:
                self._enough.set()
                return
        self._paused = False
        self._job.modify(next_run_time=fire_time)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._metrics.in_flight.set(len(self._in_flight))
        if not task.cancelled() and task.exception() is not None:
            # run_batch handles every failure itself: an escape here is a bug, so stop loudly,
            # before the freed slot could start another batch.
            self._job_failure = task.exception()
            logger.opt(exception=task.exception()).error(f"{task.get_name()} crashed")
            self._stop.set()
        elif self._held == "busy":
            self._release()

    def _on_submitted(self, event: Any) -> None:
        # Runs execute in the order submitted, each taking its arrival time in `_fire`.
        planned = self._trigger.planned if self._trigger is not None else {}
        self._planned.extend(planned.pop(run, run) for run in event.scheduled_run_times)

    def _on_error(self, event: JobExecutionEvent) -> None:
        self._job_failure = event.exception
        logger.error(f"the batch scheduler failed: {event.exception!r}")
        self._stop.set()

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _target(self) -> float:
        return self._arrivals.profile.rate(max(0.0, self._elapsed()))

    async def run(self) -> None:
        """Fires batches until stopped, max_batches started, duration over, or the profile
        ends; then drains."""
        self._t0 = time.monotonic() + START_DELAY_SECONDS
        start = datetime.now(UTC) + timedelta(seconds=START_DELAY_SECONDS)
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_listener(self._on_submitted, EVENT_JOB_SUBMITTED)
        scheduler.add_listener(self._on_error, EVENT_JOB_ERROR)
        self._trigger = ArrivalTrigger(self._arrivals, start)
        self._job = scheduler.add_job(
            self._fire,
            self._trigger,
            id="cdcfeed-batches",
            max_instances=1_000_000,  # the job only starts a task; concurrency is ours
            # A late run still fires, and is counted if it cannot start. Runs missed while the
            # job is held are coalesced by `_release`, which counts them without a run each.
            coalesce=False,
            misfire_grace_time=None,
        )
        # Read at scrape time, so the target follows the profile between arrivals too.
        self._metrics.target_rate.set_function(self._target)
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
            self._enough.set()  # runs already submitted start nothing more
            await self._stop_scheduler(scheduler)
            self._metrics.target_rate.set_function(lambda: 0.0)
            self._readiness.scheduler_running = False
            self._skips.flush()
            await self._drain()
        if self._job_failure is not None:
            raise RuntimeError("batch scheduling failed") from self._job_failure

    async def _stop_scheduler(self, scheduler: AsyncIOScheduler) -> None:
        """Stops firing, letting runs already submitted return first (at once, or once a run
        fired early has waited out its few milliseconds).

        APScheduler's shutdown cancels the job tasks still pending and logs each one as a
        failed job; waiting for them keeps a normal end free of error lines.
        """
        scheduler.pause()
        if self._recheck is not None:
            self._recheck.cancel()
        for _ in range(1000):
            if not self._planned and not self._waiting:
                break
            await asyncio.sleep(0.001 if self._waiting else 0)
        scheduler.shutdown(wait=False)

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
