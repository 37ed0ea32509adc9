"""The daemon's life: resolve the database, open the pool, settle old batches, load, stop.

Background tasks are named and supervised: if one dies the daemon says so and stops rather
than running half-alive. Everything opened here is closed in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

from loguru import logger
from pydantic import SecretStr

from cdcfeed import __version__
from cdcfeed.config import DatabaseSettings, Settings
from cdcfeed.database import CHECKED_SETTINGS, Database, ensure_database, names_of
from cdcfeed.dsn import redact_dsn, uses_libpq_environment
from cdcfeed.embedded import PostgresCluster, default_data_dir, wheel_bin_dir
from cdcfeed.endpoint import Endpoint, Readiness
from cdcfeed.errors import CdcfeedError, DatabaseRefused, SchemaMissing, UserError
from cdcfeed.load.batch import BatchEnvironment, run_batch
from cdcfeed.load.feed import FeedDirectory
from cdcfeed.load.ids import IdReservations
from cdcfeed.load.leases import InstanceLease
from cdcfeed.load.profiles import arrivals_of, describe_load
from cdcfeed.load.scheduler import LoadScheduler, settle_reserve
from cdcfeed.metrics import Metrics
from cdcfeed.proof.tasks import start_cdc_tasks
from cdcfeed.retry import Backoff, retry

EMBEDDED_DATABASE = "cdcfeed"
HEALTHY_POLL_SECONDS = 1.0
# Batches whose ids one reservation takes, at most (see ids.py).
MAX_RESERVATION = 32


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
        await ensure_database(cluster.dsn(), EMBEDDED_DATABASE)
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


async def check_server(db: Database, metrics: Metrics | None = None) -> list[str]:
    """Warns when the server keeps CDC consumers out (wal_level, slots, WAL senders), and
    sets the gauge; returns the warnings."""
    problems = (await db.server_settings()).problems()
    if metrics is not None:
        for setting in CHECKED_SETTINGS:
            metrics.server_setting_ok.labels(setting).set(0 if setting in problems else 1)
    for message in problems.values():
        logger.warning(f"server: {message}")
    return list(problems.values())


@contextlib.contextmanager
def refusals_are_mistakes() -> Iterator[None]:
    """At start-up a refusal is a mistake to fix, not a batch's trouble: one line (exit 2)."""
    try:
        yield
    except SchemaMissing as exc:
        raise UserError("database.schema_name", str(exc)) from None
    except DatabaseRefused as exc:
        raise UserError("database.dsn", str(exc)) from None


async def start_loading(db: Database, settings: Settings, metrics: Metrics) -> InstanceLease:
    """Before the first batch: the schema (DDL only when it is not current), the role's
    privileges, the server's settings, then the lease and what earlier runs left behind."""
    with refusals_are_mistakes():
        await db.prepare(
            "load",
            create=settings.database.init_schema,
            changes=settings.load.change_mix.changes,
        )
        await check_server(db, metrics)
        lease = InstanceLease(db, settings.instance_name, settings.daemon)
        await lease.acquire()
    return lease


async def watch_database(
    database: Database,
    metrics: Metrics,
    readiness: Readiness,
    suspect: asyncio.Event,
    timeout: float,
) -> None:
    """Keeps `database_up` true to the server: a ping a second, backoff while it is away.

    A batch that finds the database away sets `suspect`, which wakes the monitor early.
    """
    backoff = Backoff(initial=0.5, maximum=10.0)
    down = False

    def report(up: bool) -> None:
        metrics.database_up.set(1 if up else 0)
        readiness.database_up = up
        suspect.clear()

    def failed(attempt: int, exc: BaseException, pause: float) -> None:
        nonlocal down
        if not down:
            logger.warning(f"database unreachable ({exc}); load paused")
        down = True
        report(False)

    async def pause_or_wake(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(suspect.wait(), timeout=seconds)

    while True:
        await retry(
            lambda: database.ping(timeout),
            what="database monitor",
            backoff=backoff,
            log=failed,
            sleep=pause_or_wake,
        )
        if down:
            logger.info("database reachable again; load resumes")
            # Idle connections opened before the outage may point at a server that is
            # gone without having said so (failover, partition): replace them all now
            # rather than fail one batch per stale connection.
            await database.expire_connections()
            down = False
            # A restart is when wal_level and the slot limits change.
            with contextlib.suppress(CdcfeedError):
                await check_server(database, metrics)
        report(True)
        await pause_or_wake(HEALTHY_POLL_SECONDS)


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
            names = names_of(settings)
            async with Database.open(database, names, load.concurrency + 3, "cdcfeed") as db:
                # The lease first, and with it the batches earlier runs left IN_PROGRESS.
                lease = await start_loading(db, settings, metrics)
                readiness.database_up = True
                metrics.database_up.set(1)
                suspect = asyncio.Event()
                monitor = asyncio.create_task(
                    watch_database(
                        db, metrics, readiness, suspect, settings.database.connect_timeout
                    ),
                    name="database-monitor",
                )
                supervise(monitor, stop, failures)
                heartbeat = asyncio.create_task(lease.keep(), name="lease-heartbeat")
                supervise(heartbeat, stop, failures)
                cdc_tasks = start_cdc_tasks(
                    db, database, names, settings.cdc, settings.kafka, metrics
                )
                for task in cdc_tasks:
                    supervise(task, stop, failures)
                inserts, updates, deletes = load.change_mix.split(load.batch_size)
                environment = BatchEnvironment(
                    database=db,
                    # Ids for as many batches as may run at once: about one reservation per
                    # `concurrency` batches, and at most that many ids unused at a stop.
                    ids=IdReservations(
                        db,
                        inserts,
                        min(load.concurrency, MAX_RESERVATION),
                        changes=updates + deletes,
                    ),
                    feed=feed,
                    metrics=metrics,
                    instance=settings.instance_name,
                    batch_size=load.batch_size,
                    seed=load.seed,
                    stopping=stop,
                    on_database_down=suspect,
                    settle_seconds=settle_reserve(settings.daemon.grace_period),
                    copy_timeout=copy_timeout(settings.database.statement_timeout),
                    readiness=readiness,
                    mix=load.change_mix,
                    toast_bytes=load.toast_bytes,
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
