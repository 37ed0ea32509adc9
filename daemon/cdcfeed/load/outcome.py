"""A batch's outcome when its load did not finish, decided in one place.

From how far the batch got and what stopped it:

- it never reached the server (no connection to be had, or cut off before one): *skip*;
  nothing of it is in the ledger beyond its reserved ids;
- the server refused a statement before the COPY committed: *fail*, with the server's error
  (the COPY's transaction rolled back whole);
- anything else the database may know better than this process: *settle* from what the
  database holds, never a guess. That is a connection lost mid-protocol, a COPY the server
  did not answer, a mark that failed after the COPY committed, a batch a settler decided
  first, or shutdown cutting the batch off (then within the shutdown's deadline).

Errors that are none of these are bugs: `decide` returns None and the caller lets them go.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field

from cdcfeed.errors import BatchAborted, DatabaseRefused, DatabaseSilent, DatabaseUnavailable


class Reached(enum.Enum):
    """How far a batch got with the server."""

    NOTHING = "nothing"  # no connection yet: nothing was sent
    SERVER = "server"  # statements sent; whether the COPY committed is not known here
    COMMIT = "commit"  # the COPY committed; only its COMPLETED mark is missing


class Action(enum.Enum):
    SKIP = "skip"
    FAIL = "fail"
    SETTLE = "settle"


@dataclass(frozen=True, slots=True)
class Outcome:
    action: Action
    reason: str
    # Tell the database monitor to look now (and, for a skip, count it as database_down).
    database_down: bool = False
    # Settle within the shutdown's deadline; the batch is cancelled, not failed.
    shutdown: bool = False
    # A skip because the server refused us before anything of the batch was sent (a login or
    # a connection refused): counted as a refused run, not as a FAILED batch with no row.
    refused: bool = False
    # A refusal's SQLSTATE, for throttling its log lines by kind (not part of the decision).
    sqlstate: str = field(default="", compare=False)


def decide(reached: Reached, error: BaseException, copy_timeout: float | None) -> Outcome | None:
    """The outcome of a batch stopped by `error` after reaching `reached`; None for a bug."""
    if isinstance(error, asyncio.CancelledError):
        if reached is Reached.NOTHING:
            return Outcome(Action.SKIP, "cut off by shutdown")
        return Outcome(Action.SETTLE, "cut off by shutdown", shutdown=True)
    if isinstance(error, BatchAborted):
        # A settler decided the batch before its COPY: the ledger says how.
        return Outcome(Action.SETTLE, f"{type(error).__name__}: {error}")
    if isinstance(error, DatabaseUnavailable):
        if reached is Reached.NOTHING:
            return Outcome(Action.SKIP, str(error), database_down=True)
        if reached is Reached.COMMIT:
            return Outcome(Action.SETTLE, f"database unavailable: {error}")
        if isinstance(error, DatabaseSilent) and copy_timeout is not None:
            reason = f"COPY got no answer within {copy_timeout:g}s (hung server?)"
            return Outcome(Action.SETTLE, reason, database_down=True)
        return Outcome(Action.SETTLE, f"database unavailable: {error}", database_down=True)
    if isinstance(error, DatabaseRefused):
        if reached is Reached.NOTHING:
            return Outcome(Action.SKIP, str(error), refused=True, sqlstate=error.sqlstate)
        if reached is Reached.COMMIT:
            return Outcome(Action.SETTLE, str(error))  # only the mark was refused
        return Outcome(Action.FAIL, str(error), sqlstate=error.sqlstate)
    return None
