"""The batch protocol, top to bottom (README: "The ledger and its invariant").

1. Take a batch id and a block of order ids (reserved a few batches ahead, `ids.py`);
   generate the rows.
2. Write the feed file (temporary name, then rename).
3. Insert the IN_PROGRESS row, reading start_lsn in the same statement; it commits.
4. One transaction: record pg_current_xact_id() in the batch row, COPY the file with
   copy_to_table; commit.
5. Mark COMPLETED with end_lsn = pg_current_wal_insert_lsn(), read after the commit.
6. A COPY that failed on the server rolled back: FAILED with the error. When the outcome is
   unknown (the connection dropped, or shutdown cut the batch off) the batch is *settled*
   from what the database holds, once it answers again (`ledger.settle`).

Steps 3 to 5 run on one pooled connection, four round trips in all: at 100 rows a batch,
round trips are most of what a batch costs, on the client and on the server alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from loguru import logger

from cdcfeed import ledger
from cdcfeed.db import Connection, RetryPolicy, describe_error, is_unavailable, with_connection
from cdcfeed.errors import BatchAborted, DatabaseUnavailable, FeedError
from cdcfeed.feed import FeedDirectory
from cdcfeed.generate import batch_rng, render_orders
from cdcfeed.ids import IdReservations
from cdcfeed.metrics import Metrics
from cdcfeed.sql import ORDER_COLUMNS, Names

# How long the ROLLBACK after a failed or cancelled COPY may take before the connection is
# closed instead.
ROLLBACK_WAIT_SECONDS = 1.0


def settle_reserve(grace_period: float) -> float:
    """The part of the grace period kept for settling batches that shutdown cut off."""
    return min(2.0, grace_period / 2)


@dataclass(frozen=True)
class BatchEnvironment:
    """What every batch shares for the life of the daemon."""

    pool: asyncpg.Pool
    names: Names
    ids: IdReservations
    feed: FeedDirectory
    metrics: Metrics
    instance: str
    batch_size: int
    seed: int | None
    stopping: asyncio.Event
    on_database_down: asyncio.Event
    grace_period: float
    # Client-side bound on the COPY: statement_timeout is enforced by the server, so a hung
    # backend would never answer it. None when no statement timeout is configured.
    copy_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Timings:
    started: float
    generated: float
    written: float


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms"


async def run_batch(env: BatchEnvironment, sequence: int) -> None:
    """Runs one batch through the protocol; never raises except on cancellation."""
    rows = env.batch_size
    started = time.perf_counter()

    # 1. Ids, then the rows.
    try:
        allocation = await env.ids.take()
    except DatabaseUnavailable as exc:
        # Nothing was written: the run simply could not start.
        _skip_database_down(env, str(exc))
        return
    batch_id = allocation.batch_id
    data = await render_orders(
        batch_id, allocation.first_order_id, rows, batch_rng(env.seed, sequence)
    )
    generated = time.perf_counter()
    env.metrics.duration.labels("generate").observe(generated - started)

    # 2. The feed file.
    try:
        path = await env.feed.write(batch_id, data)
    except FeedError as exc:
        await _record_unstarted_failure(env, allocation, rows, str(exc))
        return
    written = time.perf_counter()
    env.metrics.duration.labels("write").observe(written - generated)

    try:
        await _load(env, allocation, path, data, Timings(started, generated, written))
    finally:
        env.feed.release(path, len(data))


def _skip_database_down(env: BatchEnvironment, reason: str) -> None:
    env.on_database_down.set()
    env.metrics.skipped.labels("database_down").inc()
    logger.warning(f"batch run skipped: database unavailable ({reason})")


async def _load(
    env: BatchEnvironment,
    allocation: ledger.Allocation,
    path: Path,
    data: bytes,
    timings: Timings,
) -> None:
    names = env.names
    batch_id = allocation.batch_id
    rows = env.batch_size
    log = logger.bind(batch_id=batch_id)
    acquired = False
    copy_started: float | None = None
    committed = False
    try:
        async with env.pool.acquire() as conn:
            acquired = True
            # 3. IN_PROGRESS, committed before the COPY, with the WAL position before it.
            start_lsn = await ledger.open_batch(
                conn,
                names,
                allocation,
                env.instance,
                rows,
                path.name,
                timings.generated - timings.started,
                timings.written - timings.generated,
            )

            # 4. The COPY, in the transaction that records its xid in the batch row.
            copy_started = time.perf_counter()
            await _copy(env, conn, batch_id, data)
            committed = True
            copied = time.perf_counter()

            # 5. COMPLETED, with end_lsn read after the commit.
            marked = await ledger.complete_batch(conn, names, batch_id, rows, copied - copy_started)
    except asyncio.CancelledError:
        if not acquired:
            raise  # cut off before it had a connection: nothing was sent
        # Shutdown cut the batch off; whether its COPY committed is for the database to say.
        settle = asyncio.ensure_future(
            _settle_until_known(env, batch_id, rows, "cut off by shutdown", deadline=True)
        )
        try:
            await asyncio.shield(settle)
        finally:
            raise
    except Exception as exc:
        if not acquired and is_unavailable(exc):
            # No connection to be had: nothing was sent, the batch never started.
            _skip_database_down(env, describe_error(exc))
            return
        if is_unavailable(exc) or isinstance(exc, DatabaseUnavailable) or committed:
            # The outcome is not known here (connection lost), or the COPY committed and only
            # the mark failed: either way the database decides, never a guess.
            if not committed:
                env.on_database_down.set()
            reason = describe_error(exc)
            if isinstance(exc, TimeoutError) and not committed:
                reason = f"COPY got no answer within {env.copy_timeout:g}s (hung server?)"
            elif is_unavailable(exc) or isinstance(exc, DatabaseUnavailable):
                reason = f"database unavailable: {reason}"
            log.warning(f"batch {batch_id}: {reason}; settling from the database")
            await _settle_until_known(env, batch_id, rows, reason, deadline=False)
            return
        # The server refused the COPY (or timed out): the transaction rolled back whole.
        elapsed = time.perf_counter() - copy_started if copy_started else None
        error = describe_error(exc)
        try:
            await with_connection(
                env.pool, lambda conn: ledger.fail_batch(conn, names, batch_id, error, elapsed)
            )
        except DatabaseUnavailable:
            await _settle_until_known(env, batch_id, rows, error, deadline=False)
            return
        env.metrics.batches.labels("failed").inc()
        log.error(f"batch {batch_id} FAILED rows=0 error={error}")
        return

    finished = time.perf_counter()
    copy_seconds = copied - copy_started
    total = finished - timings.started
    env.metrics.duration.labels("copy").observe(copy_seconds)
    env.metrics.duration.labels("total").observe(total)
    if marked is None:
        log.warning(f"batch {batch_id} was settled by another process before it was marked")
        return
    end_lsn, xid = marked
    env.metrics.batches.labels("completed").inc()
    env.metrics.rows.inc(rows)
    env.metrics.batch_rows.observe(rows)
    env.metrics.last_end_lsn.set(ledger.lsn_to_int(end_lsn))
    log.bind(rows=rows, start_lsn=start_lsn, end_lsn=end_lsn, xid=xid).info(
        f"batch {batch_id} COMPLETED rows={rows} start_lsn={start_lsn} end_lsn={end_lsn} "
        f"xid={xid} generate={_ms(timings.generated - timings.started)} "
        f"write={_ms(timings.written - timings.generated)} copy={_ms(copy_seconds)} "
        f"total={_ms(total)}"
    )


async def _copy(env: BatchEnvironment, conn: Connection, batch_id: int, data: bytes) -> None:
    """Step 4: claim the batch row, COPY, commit; rolled back whole on any failure."""
    names = env.names
    try:
        claimed = await conn.execute(names.q.claim_batch(batch_id))
        if claimed != "UPDATE 1":
            raise BatchAborted(
                "settled by another instance before its COPY (was this instance's lease lapsing?)"
            )
        await conn.copy_to_table(
            names.orders,
            # The bytes just written whole to the feed file: the COPY loads the file's
            # content without reading it back through a thread hop per call. A memoryview,
            # because asyncpg takes plain bytes for a file name (buffers are documented
            # sources; the stubs only list paths, files and iterables).
            source=memoryview(data),  # type: ignore[arg-type]
            schema_name=names.schema,
            columns=ORDER_COLUMNS,
            format="csv",
            header=True,
            timeout=env.copy_timeout,
        )
        await conn.execute(names.q.commit)
    except BaseException:
        # Shielded: shutdown cancels batches, and the transaction must end all the same.
        await asyncio.shield(_end_transaction(conn, names))
        raise


async def _end_transaction(conn: Connection, names: Names) -> None:
    """Rolls back step 4's transaction after a failure, or closes the connection; never raises.

    After a cancelled or timed-out COPY, asyncpg first waits for the server to acknowledge the
    cancel (CopyFail and a cancel request), then sends the ROLLBACK. A server that does not
    answer in time (a hung backend) or a lost connection gets the connection closed instead,
    which ends the transaction as surely; the pool replaces it.
    """
    try:
        await conn.execute(names.q.rollback, timeout=ROLLBACK_WAIT_SECONDS)
        return
    except Exception:
        pass
    # A connection asyncpg already closed itself is back in the pool; its handle then
    # refuses even this, and there is nothing left to end.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


async def _record_unstarted_failure(
    env: BatchEnvironment, allocation: ledger.Allocation, rows: int, error: str
) -> None:
    """A batch that failed before its COPY could start: in the ledger as FAILED, no rows."""
    names = env.names
    batch_id = allocation.batch_id

    async def record(conn: Connection) -> None:
        async with conn.transaction():
            await ledger.open_batch(conn, names, allocation, env.instance, rows, "", 0.0, 0.0)
            await ledger.fail_batch(conn, names, batch_id, error, None)

    try:
        await with_connection(env.pool, record)
    except DatabaseUnavailable:
        env.on_database_down.set()
    env.metrics.batches.labels("failed").inc()
    logger.bind(batch_id=batch_id).error(f"batch {batch_id} FAILED rows=0 error={error}")


async def _settle_until_known(
    env: BatchEnvironment, batch_id: int, rows: int, reason: str, deadline: bool
) -> None:
    """Settles a batch whose outcome is unknown, retrying while the database is away.

    With `deadline`, gives up after a few seconds (shutdown); the batch then stays
    IN_PROGRESS for reconciliation at the next start. Otherwise retries until settled or the
    daemon stops.
    """
    policy = RetryPolicy(initial_delay=0.05, max_delay=10.0)
    give_up = time.monotonic() + settle_reserve(env.grace_period) if deadline else None
    log = logger.bind(batch_id=batch_id)
    attempt = 0
    while True:
        attempt += 1
        try:
            settlement = await with_connection(
                env.pool, lambda conn: ledger.settle(conn, env.names, batch_id, reason)
            )
        except DatabaseUnavailable:
            settlement = None
        if settlement is not None and settlement.status == "NOT_STARTED":
            # Its IN_PROGRESS row never reached the ledger: nothing of it was loaded.
            if deadline:
                log.info(f"batch {batch_id} cut off by shutdown before its ledger row: not run")
            else:
                _skip_database_down(env, reason)
            return
        if settlement is not None and settlement.status != "IN_PROGRESS":
            if settlement.status == "COMPLETED":
                env.metrics.batches.labels("completed").inc()
                env.metrics.rows.inc(settlement.row_count)
                log.warning(
                    f"batch {batch_id} COMPLETED (recovered) rows={settlement.row_count} "
                    f"end_lsn={settlement.end_lsn}"
                )
            else:
                env.metrics.batches.labels("failed").inc()
                log.error(f"batch {batch_id} FAILED rows=0 error={reason}")
            return
        if give_up is not None and time.monotonic() >= give_up:
            log.warning(f"batch {batch_id} left IN_PROGRESS for reconciliation ({reason})")
            return
        if give_up is None and env.stopping.is_set() and settlement is None:
            log.warning(f"batch {batch_id} left IN_PROGRESS for reconciliation ({reason})")
            return
        pause = policy.delay(min(attempt, 10))
        if give_up is not None:
            pause = min(pause, max(0.0, give_up - time.monotonic()))
        await asyncio.sleep(pause)
