"""What a driver error means, decided once, at the boundary.

Three kinds: the server is away or not accepting us (`DatabaseUnavailable`: retry), the
server refused one statement (`DatabaseRefused`, with its SQLSTATE: the batch fails), and
anything else, which is a bug and propagates as it is. Matched by class and SQLSTATE, never
by the server's message text (which it localises).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import NoReturn, ParamSpec, TypeVar

import asyncpg

from cdcfeed.errors import (
    CdcfeedError,
    DatabaseBusy,
    DatabaseRefused,
    DatabaseSilent,
    DatabaseUnavailable,
    ObjectMissing,
    PrivilegeRefused,
    SlotBusy,
)

P = ParamSpec("P")
T = TypeVar("T")

# The server went away or is not accepting us yet.
_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up / shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    asyncpg.exceptions.ConnectionDoesNotExistError,  # lost in the middle of an operation
)

# Refusals worth another try later: a statement timeout, a lock not available, a
# serialization failure or deadlock (class 40).
_BUSY = (
    asyncpg.exceptions.QueryCanceledError,  # 57014
    asyncpg.exceptions.LockNotAvailableError,  # 55P03
    asyncpg.exceptions.TransactionRollbackError,  # class 40
)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the server is away, as opposed to refusing us or a bug here."""
    if isinstance(exc, OSError):
        # A socket error; one naming a file is about a local file, not the network.
        return exc.filename is None
    if isinstance(exc, TimeoutError):
        # Every timeout the boundary sets is a wait on the server: to connect, to get a
        # pooled connection, or for a statement's answer.
        return True
    if isinstance(exc, _UNAVAILABLE):
        return True
    if type(exc) is asyncpg.exceptions.InternalClientError:
        # A server shutting down sends FATAL to idle connections; one handed out before
        # asyncpg saw the socket close is still in the error state and refuses the next query
        # with this. (Its subclasses, protocol and schema-cache errors, are bugs.)
        return True
    # A connection asyncpg already closed after losing the server; any other misuse of a
    # connection ("another operation is in progress", say) is a bug.
    return type(exc) is asyncpg.exceptions.InterfaceError and "connection is closed" in str(exc)


def describe_error(exc: BaseException) -> str:
    """A short, secret-free description of a driver error."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"{type(exc).__name__} [{exc.sqlstate}]: {exc.args[0] if exc.args else ''}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def translate(exc: BaseException) -> BaseException:
    """The cdcfeed error a driver error stands for; `exc` itself when it is a bug."""
    if isinstance(exc, CdcfeedError):
        return exc
    if is_unavailable(exc):
        kind = DatabaseSilent if isinstance(exc, TimeoutError) else DatabaseUnavailable
        return kind(describe_error(exc))
    if isinstance(exc, asyncpg.PostgresError):
        refused: type[DatabaseRefused] = DatabaseRefused
        if isinstance(exc, _BUSY):
            refused = DatabaseBusy
        elif isinstance(exc, asyncpg.exceptions.ObjectInUseError):  # 55006
            refused = SlotBusy
        elif isinstance(exc, asyncpg.exceptions.UndefinedObjectError):  # 42704
            refused = ObjectMissing
        elif isinstance(exc, asyncpg.exceptions.InsufficientPrivilegeError):  # 42501
            refused = PrivilegeRefused
        return refused(describe_error(exc), exc.sqlstate, getattr(exc, "detail", None) or "")
    return exc


def raise_translated(exc: BaseException) -> NoReturn:
    """Raises what `exc` stands for, chained to it; re-raises `exc` itself when it is a bug."""
    translated = translate(exc)
    if translated is exc:
        raise exc
    raise translated from exc


def translated(function: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Decorates a boundary method: driver errors leave it as cdcfeed errors."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await function(*args, **kwargs)
        except Exception as exc:
            raise_translated(exc)

    return wrapper
