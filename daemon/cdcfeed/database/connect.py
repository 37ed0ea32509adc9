"""Opening connections and pools: connection arguments, TLS, and bounded retries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from loguru import logger

from cdcfeed.config import DatabaseSettings
from cdcfeed.database.errors import describe_error, raise_translated
from cdcfeed.dsn import redact_dsn
from cdcfeed.errors import DatabaseUnavailable, UserError
from cdcfeed.retry import Backoff, retry

T = TypeVar("T")

CONNECT_BACKOFF = Backoff(initial=0.5, maximum=10.0)


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
        f"({exc}); check that the server is up and the DSN is right",
    )


async def _once(opener: Callable[[], Awaitable[T]]) -> T:
    """One attempt; the login refused and an unknown database are the user's to fix."""
    try:
        return await opener()
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise UserError(
            "database.dsn", f"the server refused the login ({describe_error(exc)})"
        ) from None
    except asyncpg.InvalidCatalogNameError as exc:
        raise UserError("database.dsn", f"no such database ({describe_error(exc)})") from None
    except Exception as exc:
        raise_translated(exc)


async def open_with_retries(
    settings: DatabaseSettings, opener: Callable[[], Awaitable[T]], *, patient: bool = True
) -> T:
    """Opens a connection or pool. `patient`: with bounded retries, and a UserError when the
    database stays unreachable; otherwise one attempt (the caller retries), which raises
    DatabaseUnavailable when the server is away."""
    if not patient:
        return await _once(opener)
    attempts = settings.connect_attempts

    def log(attempt: int, exc: BaseException, pause: float) -> None:
        logger.warning(
            f"connect: attempt {attempt}/{attempts} failed ({exc}); retrying in {pause:.1f}s"
        )

    try:
        return await retry(
            lambda: _once(opener),
            what="connect",
            backoff=CONNECT_BACKOFF,
            attempts=attempts,
            log=log,
        )
    except DatabaseUnavailable as exc:
        raise unreachable(settings, exc) from None


async def connect(
    settings: DatabaseSettings, application_name: str, *, patient: bool = True
) -> asyncpg.Connection:
    """One connection of its own (see `open_with_retries` for `patient`)."""
    kwargs = connect_kwargs(settings, application_name)
    return await open_with_retries(settings, lambda: asyncpg.connect(**kwargs), patient=patient)


async def close_connection(conn: asyncpg.Connection) -> None:
    """Closes a connection of its own; never raises."""
    try:
        await asyncio.wait_for(conn.close(), timeout=5)
    except Exception:
        conn.terminate()  # the server is gone or stuck: drop the socket


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Replaces the pool's reset query (advisory unlock, CLOSE ALL, UNLISTEN, RESET ALL).

    That query is one more round trip on every release, four per batch: a large part of a
    small batch's cost. Pooled connections never carry session state (no SET, LISTEN,
    session advisory locks or cursors; code that needs one opens a connection of its own, as
    verify does), and asyncpg still rolls back a transaction left open before this is called.
    The one thing kept on purpose is the change mix's staging table: temporary, and empty
    outside a batch's transaction (ON COMMIT DELETE ROWS).
    """


async def create_pool(settings: DatabaseSettings, size: int, application_name: str) -> asyncpg.Pool:
    """A pool opened with bounded retries."""
    kwargs = connect_kwargs(settings, application_name)

    async def create() -> asyncpg.Pool:
        return await asyncpg.create_pool(min_size=1, max_size=size, reset=_keep_session, **kwargs)

    return await open_with_retries(settings, create)


async def close_pool(pool: asyncpg.Pool) -> None:
    """Closes the pool with a timeout, and terminate() as the fallback; never raises."""
    try:
        await asyncio.wait_for(pool.close(), timeout=5)
    except Exception:
        pool.terminate()  # the server is gone or stuck: drop the sockets
