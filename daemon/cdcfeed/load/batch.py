"""The batch protocol, top to bottom (README: "The ledger and its invariant").

1. Take a batch id and a block of order ids (reserved a few batches ahead, `ids.py`);
   generate the rows.
2. Write the feed file (temporary name, then rename).
3. Insert the IN_PROGRESS row, reading start_lsn in the same statement; it commits.
4. One transaction: record pg_current_xact_id() in the batch row, COPY the file with
   copy_to_table; commit. A batch of the change mix that updates or deletes COPies into a
   staging table and applies it in one more statement, which also records what it changed
   in the batch row (`changes.py`, `BatchSession.apply`).
5. Mark COMPLETED with end_lsn = pg_current_wal_insert_lsn(), read after the commit.
6. A COPY that failed on the server rolled back: FAILED with the error. When the outcome is
   unknown (the connection dropped, or shutdown cut the batch off) the batch is *settled*
   from what the database holds, once it answers again. Which of these applies is decided
   in one place, `outcome.decide`.

Steps 3 to 5 run on one pooled connection, four round trips in all (step 3 and the claim
that opens step 4 share one): at 100 rows a batch, round trips are most of what a batch
costs, on the client and on the server alike.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from cdcfeed.database import Allocation, Changes, Database, Settlement
from cdcfeed.database.names import NOTED_ORDER_COLUMNS
from cdcfeed.endpoint import Readiness
from cdcfeed.errors import DatabaseRefused, DatabaseUnavailable, FeedError
from cdcfeed.lifecycle import Mix, changed
from cdcfeed.load.changes import Plan, plan_batch, render_batch
from cdcfeed.load.feed import FeedDirectory
from cdcfeed.load.generate import batch_rng
from cdcfeed.load.ids import IdReservations
from cdcfeed.load.outcome import Action, Outcome, Reached, decide
from cdcfeed.lsn import lsn_to_int
from cdcfeed.metrics import Metrics
from cdcfeed.retry import Backoff, retry
from cdcfeed.throttle import Throttle

SETTLE_BACKOFF = Backoff(initial=0.05, maximum=10.0)
# Marking a refused batch FAILED, when even that is refused: until the grant returns.
MARK_BACKOFF = Backoff(initial=0.5, maximum=5.0)


@dataclass(frozen=True)
class BatchEnvironment:
    """What every batch shares for the life of the daemon."""

    database: Database
    ids: IdReservations
    feed: FeedDirectory
    metrics: Metrics
    instance: str
    batch_size: int
    seed: int | None
    stopping: asyncio.Event
    on_database_down: asyncio.Event
    # How long settling a batch that shutdown cut off may take (part of the grace period).
    settle_seconds: float
    # Client-side bound on the COPY: statement_timeout is enforced by the server, so a hung
    # backend would never answer it. None when no statement timeout is configured.
    copy_timeout: float | None = None
    # Batches refused in a row make the daemon not ready (see Readiness).
    readiness: Readiness = field(default_factory=Readiness)
    # Refusals hit every batch alike: one line per kind per interval.
    throttle: Throttle = field(default_factory=Throttle)
    # The change mix and the size of each insert's note (0: none).
    mix: Mix = field(default_factory=Mix)
    toast_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Timings:
    started: float
    generated: float
    written: float


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


async def run_batch(env: BatchEnvironment, sequence: int) -> None:
    """Runs one batch through the protocol; never raises except on cancellation (or a bug)."""
    started = time.perf_counter()

    # 1. Ids, then the rows.
    try:
        allocation = await env.ids.take()
    except DatabaseUnavailable as exc:
        # Nothing was written: the run simply could not start.
        _skip_database_down(env, str(exc))
        return
    except DatabaseRefused as exc:
        # No batch id to record it under: the run could not start, and says why.
        _skip_refused(env, "batch ids refused", str(exc), exc.sqlstate)
        return
    batch_id = allocation.batch_id
    rng = batch_rng(env.seed, sequence)
    plan = plan_batch(env.mix, env.batch_size, allocation, rng)
    rows = plan.inserts
    data = await render_batch(batch_id, allocation, plan, env.toast_bytes, rng)
    generated = time.perf_counter()
    env.metrics.phase["generate"].observe(generated - started)

    # 2. The feed file.
    try:
        path = await env.feed.write(batch_id, data)
    except FeedError as exc:
        await _record_unstarted_failure(env, allocation, rows, str(exc))
        return
    written = time.perf_counter()
    env.metrics.phase["write"].observe(written - generated)

    try:
        await _load(env, allocation, plan, path, data, Timings(started, generated, written))
    finally:
        env.feed.release(path, len(data))


def _skip_refused(env: BatchEnvironment, what: str, reason: str, sqlstate: str) -> None:
    """A run the server refused before it started: counted, and logged once in a while."""
    env.readiness.batch_refused()
    env.metrics.skipped_reason["database_refused"].inc()
    held_back = env.throttle.due(f"{what}:{sqlstate}")
    if held_back is not None:
        logger.error(f"batch run skipped: {what} ({reason}){env.throttle.suffix(held_back)}")


def _skip_database_down(env: BatchEnvironment, reason: str) -> None:
    env.on_database_down.set()
    env.metrics.skipped_reason["database_down"].inc()
    logger.warning(f"batch run skipped: database unavailable ({reason})")


async def _load(
    env: BatchEnvironment,
    allocation: Allocation,
    plan: Plan,
    path: Path,
    data: bytes,
    timings: Timings,
) -> None:
    batch_id = allocation.batch_id
    rows = plan.inserts
    changes = Changes(rows)
    reached = Reached.NOTHING
    copy_started: float | None = None
    try:
        async with env.database.batch_session() as session:
            reached = Reached.SERVER
            # 3. IN_PROGRESS, committed before the COPY, with the WAL position before it; and
            # the transaction of step 4, which records its xid in the batch row first.
            await session.open_batch(
                allocation,
                env.instance,
                rows,
                path.name,
                timings.generated - timings.started,
                timings.written - timings.generated,
                staged=bool(plan.changes),
            )

            # 4. The COPY (or the staged changes), and the commit.
            copy_started = time.perf_counter()
            if plan.changes:
                changes = await session.apply(batch_id, data, env.copy_timeout)
            elif env.toast_bytes:
                await session.copy(batch_id, data, env.copy_timeout, NOTED_ORDER_COLUMNS)
            else:
                await session.copy(batch_id, data, env.copy_timeout)
            reached = Reached.COMMIT
            copied = time.perf_counter()

            # 5. COMPLETED, with end_lsn read after the commit.
            marked = await session.complete(batch_id, rows, copied - copy_started)
    except (asyncio.CancelledError, Exception) as exc:
        outcome = decide(reached, exc, env.copy_timeout)
        if outcome is None:
            raise  # a bug: let it be seen
        elapsed = time.perf_counter() - copy_started if copy_started else None
        await _conclude(env, batch_id, rows, outcome, elapsed)
        if isinstance(exc, asyncio.CancelledError):
            raise  # the cancellation goes on once the batch is concluded
        return

    finished = time.perf_counter()
    copy_seconds = copied - copy_started
    total = finished - timings.started
    env.metrics.phase["copy"].observe(copy_seconds)
    env.metrics.phase["total"].observe(total)
    if marked is None:
        logger.bind(batch_id=batch_id).warning(
            f"batch {batch_id} was settled by another process before it was marked"
        )
        return
    start_lsn, end_lsn, xid = marked
    env.readiness.batch_completed()
    env.metrics.batch_status["completed"].inc()
    env.metrics.rows.inc(rows)
    env.metrics.count_changes(rows, changes.updated, changes.deleted)
    env.metrics.batch_rows.observe(rows)
    env.metrics.last_end_lsn.set(lsn_to_int(end_lsn))
    logger.bind(
        batch_id=batch_id,
        rows=rows,
        updated=changes.updated,
        deleted=changes.deleted,
        start_lsn=start_lsn,
        end_lsn=end_lsn,
        xid=xid,
    ).info(
        f"batch {batch_id} COMPLETED rows={rows}{changed(changes.updated, changes.deleted)} "
        f"start_lsn={start_lsn} end_lsn={end_lsn} "
        f"xid={xid} generate={_ms(timings.generated - timings.started)} "
        f"write={_ms(timings.written - timings.generated)} copy={_ms(copy_seconds)} "
        f"total={_ms(total)}"
    )


async def _conclude(
    env: BatchEnvironment, batch_id: int, rows: int, outcome: Outcome, elapsed: float | None
) -> None:
    """Carries out the outcome `decide` gave a batch whose load did not finish."""
    log = logger.bind(batch_id=batch_id)
    if outcome.action is Action.SKIP:
        # Nothing was sent: the batch never started, and the ledger holds nothing of it.
        if outcome.database_down:
            _skip_database_down(env, outcome.reason)
        elif outcome.refused:
            _skip_refused(env, "connection refused", outcome.reason, outcome.sqlstate)
        return
    if outcome.action is Action.SETTLE:
        if outcome.shutdown:
            # Shielded: whether its COPY committed is for the database to say, even while
            # shutdown cancels the batch.
            settle = asyncio.ensure_future(
                _settle_until_known(env, batch_id, rows, outcome.reason, deadline=True)
            )
            await asyncio.shield(settle)
            return
        if outcome.database_down:
            env.on_database_down.set()
        log.warning(f"batch {batch_id}: {outcome.reason}; settling from the database")
        await _settle_until_known(env, batch_id, rows, outcome.reason, deadline=False)
        return
    # The server refused a statement before the COPY committed: it rolled back whole.
    env.readiness.batch_refused()
    try:
        await _mark_failed(env, batch_id, outcome.reason, elapsed)
    except DatabaseUnavailable:
        await _settle_until_known(env, batch_id, rows, outcome.reason, deadline=False)
        return
    except DatabaseRefused as exc:
        log.warning(
            f"batch {batch_id} left IN_PROGRESS: its COPY rolled back, but marking it FAILED "
            f"was refused until the stop ({exc}); this instance's next start, or another "
            "instance once this one's lease lapses, marks it FAILED"
        )
        return
    env.metrics.batch_status["failed"].inc()
    held_back = env.throttle.due(f"failed:{outcome.sqlstate}")
    if held_back is not None:
        log.error(
            f"batch {batch_id} FAILED rows=0 error={outcome.reason}{env.throttle.suffix(held_back)}"
        )


async def _mark_failed(
    env: BatchEnvironment, batch_id: int, reason: str, elapsed: float | None
) -> None:
    """Marks a refused batch FAILED; while that is refused too (a privilege revoked from
    the ledger), retries with backoff until the grant returns or the daemon stops.

    The batch keeps its concurrency slot meanwhile: new batches would only be refused the
    same way, so the scheduler counts the runs it cannot start as busy instead.
    """

    def held(attempt: int, exc: BaseException, pause: float) -> None:
        env.readiness.batch_refused()  # each refused attempt counts: nothing else can run
        held_back = env.throttle.due("mark-refused")
        if held_back is not None:
            logger.bind(batch_id=batch_id).error(
                f"batch {batch_id}: marking it FAILED was refused ({exc}); retrying until "
                f"the grant returns{env.throttle.suffix(held_back)}"
            )

    await retry(
        lambda: env.database.fail_batch(batch_id, reason, elapsed),
        what=f"marking batch {batch_id} FAILED",
        backoff=MARK_BACKOFF,
        stop=env.stopping,
        retry_on=(DatabaseRefused,),
        log=held,
    )


async def _record_unstarted_failure(
    env: BatchEnvironment, allocation: Allocation, rows: int, error: str
) -> None:
    """A batch that failed before its COPY could start: in the ledger as FAILED, no rows."""
    batch_id = allocation.batch_id
    try:
        await env.database.record_unstarted_failure(allocation, env.instance, rows, error)
    except DatabaseUnavailable:
        env.on_database_down.set()
    except DatabaseRefused as exc:
        # Nothing of it was loaded and its ids are never used again: only the row is missing.
        error = f"{error}; its ledger row was refused ({exc})"
    env.metrics.batch_status["failed"].inc()
    logger.bind(batch_id=batch_id).error(f"batch {batch_id} FAILED rows=0 error={error}")


class _StillRunning(Exception):
    """The batch's row is locked: its COPY's transaction (or a settler) is still at it."""


class _GiveUp(Exception):
    """The daemon is stopping and the database is away: reconciliation settles it later."""


async def _settle_until_known(
    env: BatchEnvironment, batch_id: int, rows: int, reason: str, deadline: bool
) -> None:
    """Settles a batch whose outcome is unknown, retrying while the database is away.

    With `deadline`, gives up after a few seconds (shutdown); the batch then stays
    IN_PROGRESS for reconciliation at the next start. Otherwise retries until settled or the
    daemon stops.
    """
    log = logger.bind(batch_id=batch_id)

    async def attempt() -> Settlement:
        try:
            settlement = await env.database.settle(batch_id, reason)
        except (DatabaseUnavailable, DatabaseRefused):
            # Refused: settling reads the batch row FOR UPDATE, which a revoke can forbid.
            if not deadline and env.stopping.is_set():
                raise _GiveUp from None
            raise
        if settlement.status == "IN_PROGRESS":
            raise _StillRunning
        return settlement

    try:
        settlement = await retry(
            attempt,
            what=f"settling batch {batch_id}",
            backoff=SETTLE_BACKOFF,
            deadline=time.monotonic() + env.settle_seconds if deadline else None,
            retry_on=(DatabaseUnavailable, DatabaseRefused, _StillRunning),
            log=lambda attempt, exc, pause: None,  # the batch's own lines say enough
        )
    except (DatabaseUnavailable, DatabaseRefused, _StillRunning, _GiveUp):
        log.warning(f"batch {batch_id} left IN_PROGRESS for reconciliation ({reason})")
        return
    if settlement.status == "NOT_STARTED":
        # Its IN_PROGRESS row never reached the ledger: nothing of it was loaded.
        if deadline:
            log.info(f"batch {batch_id} cut off by shutdown before its ledger row: not run")
        else:
            _skip_database_down(env, reason)
        return
    if settlement.status == "COMPLETED":
        env.metrics.batch_status["completed"].inc()
        env.metrics.rows.inc(settlement.row_count)
        env.metrics.count_changes(settlement.row_count, settlement.updated, settlement.deleted)
        changes = changed(settlement.updated, settlement.deleted)
        log.warning(
            f"batch {batch_id} COMPLETED (recovered) rows={settlement.row_count}{changes} "
            f"end_lsn={settlement.end_lsn}"
        )
    else:
        env.metrics.batch_status["failed"].inc()
        log.error(f"batch {batch_id} FAILED rows=0 error={reason}")
