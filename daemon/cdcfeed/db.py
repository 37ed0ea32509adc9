"""The database boundary: connecting, the pool, retries, and which errors mean "unreachable"."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
from loguru import logger

from cdcfeed.config import DatabaseSettings, redact_dsn
from cdcfeed.errors import DatabaseUnavailable, UserError

T = TypeVar("T")

# A plain connection or one borrowed from the pool: the ledger works on either.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# SQLSTATE classes and codes that mean the server went away or is not accepting us yet.
# Matched by class, never by message text (which the server localises).
_UNAVAILABLE = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up / shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,  # e.g. "connection is closed"
    # A server shutting down sends FATAL to idle connections; one handed out before asyncpg
    # saw the socket close is still in the error state and refuses the next query with this.
    asyncpg.exceptions.InternalClientError,
)


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.filename is not None:
        return False  # a local file (the feed file a COPY reads), not the network
    return isinstance(exc, _UNAVAILABLE)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: one attempt per step, never a storm."""

    attempts: int = 5
    initial_delay: float = 0.5
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        ceiling = min(self.max_delay, self.initial_delay * (2 ** (attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)

    async def run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(1, self.attempts + 1):
            try:
                return await operation()
            except Exception as exc:
                if not is_unavailable(exc) or attempt == self.attempts:
                    raise
                pause = self.delay(attempt)
                logger.warning(
                    f"{what}: attempt {attempt}/{self.attempts} failed "
                    f"({describe_error(exc)}); retrying in {pause:.1f}s"
                )
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a driver error."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} [{exc.sqlstate}]: {exc.args[0] if exc.args else ''}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def connect_kwargs(settings: DatabaseSettings, application_name: str) -> dict[str, Any]:
    """Arguments for asyncpg.connect/create_pool; dsn None lets asyncpg read libpq's PG… vars."""
    server_settings = {"application_name": application_name}
    if settings.statement_timeout:
        server_settings["statement_timeout"] = str(int(settings.statement_timeout * 1000))
    kwargs: dict[str, Any] = {
        "dsn": settings.dsn.get_secret_value() or None,
        "timeout": settings.connect_timeout,
        "server_settings": server_settings,
    }
    if settings.sslmode:
        # The certificate files need a context of our own (asyncpg reads them only from the DSN
        # or PGSSL… variables); a context means TLS is required, so only for modes that do.
        files = settings.sslrootcert or settings.sslcert
        required = settings.sslmode in ("require", "verify-ca", "verify-full")
        kwargs["ssl"] = _ssl_context(settings) if files and required else settings.sslmode
    return kwargs


def _ssl_context(settings: DatabaseSettings) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=settings.sslrootcert)
    context.check_hostname = settings.sslmode == "verify-full"
    if settings.sslmode not in ("verify-ca", "verify-full"):
        context.verify_mode = ssl.CERT_NONE
    if settings.sslcert:
        context.load_cert_chain(settings.sslcert, settings.sslkey or None)
    return context


def unreachable(settings: DatabaseSettings, exc: BaseException) -> UserError:
    where = redact_dsn(settings.dsn.get_secret_value()) or "the server named by PG… variables"
    return UserError(
        "database.dsn",
        f"cannot connect to {where} after {settings.connect_attempts} attempts "
        f"({describe_error(exc)}); check that the server is up and the DSN is right",
    )


async def _with_retries(settings: DatabaseSettings, opener: Callable[[], Awaitable[T]]) -> T:
    """Opens a connection or pool with bounded retries; user-facing errors become UserError."""
    policy = RetryPolicy(attempts=settings.connect_attempts)
    try:
        return await policy.run("connect", opener)
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise UserError(
            "database.dsn", f"the server refused the login ({describe_error(exc)})"
        ) from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise UserError("database.dsn", f"no such database ({describe_error(exc)})") from None
    except Exception as exc:
        if is_unavailable(exc):
            raise unreachable(settings, exc) from None
        raise


async def connect(settings: DatabaseSettings, application_name: str) -> asyncpg.Connection:
    """One connection with bounded retries; a UserError when the database stays unreachable."""
    kwargs = connect_kwargs(settings, application_name)
    return await _with_retries(settings, lambda: asyncpg.connect(**kwargs))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces the pool's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL).

    That query is one more round trip on every release, four per batch: a large part of a
    small batch's cost. Pooled connections never carry session state (no SET, LISTEN,
    session advisory locks or cursors; code that needs one opens a connection of its own, as
    verify does), and asyncpg still rolls back a transaction left open before this is called.
    """


@asynccontextmanager
async def open_pool(
    settings: DatabaseSettings, size: int, application_name: str
) -> AsyncIterator[asyncpg.Pool]:
    """A pool opened with bounded retries, closed with a timeout and terminate() as fallback."""
    kwargs = connect_kwargs(settings, application_name)

    async def create() -> asyncpg.Pool:
        return await asyncpg.create_pool(min_size=1, max_size=size, reset=_keep_session, **kwargs)

    pool = await _with_retries(settings, create)
    try:
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except (TimeoutError, *_UNAVAILABLE):
            pool.terminate()


async def with_connection(pool: asyncpg.Pool, operation: Callable[[Connection], Awaitable[T]]) -> T:
    """Runs one operation on a pooled connection; unreachable errors become DatabaseUnavailable."""
    try:
        async with pool.acquire() as conn:
            return await operation(conn)
    except Exception as exc:
        if is_unavailable(exc):
            raise DatabaseUnavailable(describe_error(exc)) from exc
        raise
