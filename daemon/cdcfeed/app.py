"""The daemon's life: resolve the database, open the pool, settle old batches, load, stop.

Background tasks are named and supervised: if one dies the daemon says so and stops rather
than running half-alive. Everything opened here is closed in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
from loguru import logger
from pydantic import SecretStr

from cdcfeed import __version__, ledger
from cdcfeed.batch import BatchEnvironment, run_batch
from cdcfeed.cdc import start_cdc_tasks
from cdcfeed.config import DatabaseSettings, Settings, redact_dsn, uses_libpq_environment
from cdcfeed.db import RetryPolicy, describe_error, is_unavailable, open_pool
from cdcfeed.embedded import PostgresCluster, default_data_dir, wheel_bin_dir
from cdcfeed.endpoint import Endpoint, Readiness
from cdcfeed.feed import FeedDirectory
from cdcfeed.ids import IdReservations
from cdcfeed.metrics import Metrics
from cdcfeed.profiles import arrivals_of, describe_load
from cdcfeed.reconcile import Lease
from cdcfeed.scheduler import LoadScheduler
from cdcfeed.sql import Names, quote_ident

EMBEDDED_DATABASE = "cdcfeed"
HEALTHY_POLL_SECONDS = 1.0
# Batches whose ids one reservation takes, at most (see ids.py).
MAX_RESERVATION = 32


def names_of(settings: Settings) -> Names:
    return Names(
        schema=settings.database.schema_name,
        orders=settings.database.orders_table,
        batches=settings.database.batch_table,
    )


@asynccontextmanager
async def resolved_database(
    settings: Settings, environ: dict[str, str]
) -> AsyncIterator[DatabaseSettings]:
    """The configured database, or an embedded server started for the life of the block."""
    if settings.database.dsn.get_secret_value() or uses_libpq_environment(environ):
        yield settings.database
        return
    data_dir = Path(settings.embedded.data_dir or default_data_dir(environ))
    cluster = PostgresCluster(wheel_bin_dir(), data_dir)
    await asyncio.to_thread(cluster.start)
    try:
        conn = await asyncpg.connect(cluster.dsn(), timeout=30)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", EMBEDDED_DATABASE
            )
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f"CREATE DATABASE {quote_ident(EMBEDDED_DATABASE)}")
        finally:
            await conn.close()
        dsn = cluster.dsn(EMBEDDED_DATABASE)
        state = "started" if cluster.owned else "already running"
        logger.info(
            f"no database configured: embedded PostgreSQL {state} in {cluster.data_dir} "
            f"(wal_level=logical); look inside with: psql {dsn}"
        )
        yield settings.database.model_copy(update={"dsn": SecretStr(dsn)})
    finally:
        if cluster.owned:
            await asyncio.to_thread(cluster.stop)
            logger.info("embedded PostgreSQL stopped")


async def watch_database(
    pool: asyncpg.Pool,
    metrics: Metrics,
    readiness: Readiness,
    suspect: asyncio.Event,
    timeout: float,
) -> None:
    """Keeps `database_up` true to the server: a ping a second, backoff while it is away."""
    policy = RetryPolicy(initial_delay=0.5, max_delay=10.0)
    failures = 0
    while True:
        try:
            async with pool.acquire(timeout=timeout) as conn:
                await conn.fetchval("SELECT 1", timeout=timeout)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            failures += 1
            if failures == 1:
                logger.warning(f"database unreachable ({describe_error(exc)}); load paused")
        else:
            if failures:
                logger.info("database reachable again; load resumes")
                # Idle connections opened before the outage may point at a server that is
                # gone without having said so (failover, partition): replace them all now
                # rather than fail one batch per stale connection.
                await pool.expire_connections()
            failures = 0
        up = failures == 0
        metrics.database_up.set(1 if up else 0)
        readiness.database_up = up
        suspect.clear()
        pause = HEALTHY_POLL_SECONDS if up else policy.delay(min(failures, 10))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(suspect.wait(), timeout=pause)


def copy_timeout(statement_timeout: float) -> float | None:
    """The client's bound on a COPY: a little past the server's own, so that the server's
    cancel (a clean FAILED) wins whenever the server is alive to send it."""
    return statement_timeout + 5.0 if statement_timeout else None


def blocked_reason(readiness: Readiness, feed: FeedDirectory) -> str | None:
    """Why a batch must not start now, as a skip reason; None when it may."""
    if not readiness.database_up:
        return "database_down"
    if not feed.has_room():
        return "disk_full"
    return None


def supervise(task: asyncio.Task[None], stop: asyncio.Event, failures: list[str]) -> None:
    def on_done(done: asyncio.Task[None]) -> None:
        if done.cancelled() or done.exception() is None:
            return
        failures.append(done.get_name())
        logger.opt(exception=done.exception()).error(
            f"background task {done.get_name()} died; stopping"
        )
        stop.set()

    task.add_done_callback(on_done)


async def run_daemon(
    settings: Settings,
    stop: asyncio.Event,
    environ: dict[str, str],
    on_endpoint: Callable[[Endpoint], None] | None = None,
) -> int:
    """Runs the load until stopped or done; returns the exit code."""
    metrics = Metrics()
    readiness = Readiness()
    feed = FeedDirectory(settings.feed)
    feed.prepare()
    endpoint = Endpoint(settings.metrics.address, metrics, readiness)
    endpoint.start()
    logger.info(
        f"cdcfeed {__version__} instance={settings.instance_name}: metrics on "
        f"{endpoint.url}/metrics (port {endpoint.port})"
    )
    if on_endpoint is not None:
        on_endpoint(endpoint)
    load = settings.load
    failures: list[str] = []
    try:
        async with resolved_database(settings, environ) as database:
            logger.info(
                f"loading into {redact_dsn(database.dsn.get_secret_value()) or 'PG… env'}: "
                f"{describe_load(load)}"
            )
            # Batches plus one connection each for the monitor, the slot monitor and settling.
            async with open_pool(database, load.concurrency + 3, "cdcfeed") as pool:
                names = names_of(settings)
                if settings.database.init_schema:
                    async with pool.acquire() as conn:
                        await ledger.init_schema(conn, names)
                # The lease first, and with it the batches earlier runs left IN_PROGRESS.
                lease = Lease(pool, names, settings.instance_name, settings.daemon)
                await lease.acquire()
                readiness.database_up = True
                metrics.database_up.set(1)
                suspect = asyncio.Event()
                monitor = asyncio.create_task(
                    watch_database(
                        pool, metrics, readiness, suspect, settings.database.connect_timeout
                    ),
                    name="database-monitor",
                )
                supervise(monitor, stop, failures)
                heartbeat = asyncio.create_task(lease.keep(), name="lease-heartbeat")
                supervise(heartbeat, stop, failures)
                cdc_tasks = start_cdc_tasks(pool, database, names, settings.cdc, metrics)
                for task in cdc_tasks:
                    supervise(task, stop, failures)
                environment = BatchEnvironment(
                    pool=pool,
                    names=names,
                    # Ids for as many batches as may run at once: about one reservation per
                    # `concurrency` batches, and at most that many ids unused at a stop.
                    ids=IdReservations(
                        pool, names, load.batch_size, min(load.concurrency, MAX_RESERVATION)
                    ),
                    feed=feed,
                    metrics=metrics,
                    instance=settings.instance_name,
                    batch_size=load.batch_size,
                    seed=load.seed,
                    stopping=stop,
                    on_database_down=suspect,
                    grace_period=settings.daemon.grace_period,
                    copy_timeout=copy_timeout(settings.database.statement_timeout),
                )
                scheduler = LoadScheduler(
                    arrivals=arrivals_of(load),
                    concurrency=load.concurrency,
                    max_batches=load.max_batches,
                    duration=load.duration,
                    grace_period=settings.daemon.grace_period,
                    metrics=metrics,
                    start_batch=lambda sequence: run_batch(environment, sequence),
                    blocked=lambda: blocked_reason(readiness, feed),
                    stop=stop,
                    readiness=readiness,
                )
                try:
                    await scheduler.run()
                finally:
                    for task in (monitor, heartbeat, *cdc_tasks):
                        task.cancel()
                        # A task that died was reported by `supervise` already.
                        with contextlib.suppress(asyncio.CancelledError, Exception):
                            await task
                    await lease.release()
                logger.info(f"stopped after {scheduler.started} batch(es)")
    finally:
        endpoint.stop()
    return 1 if failures else 0
