"""One exception hierarchy for cdcfeed.

Every `CdcfeedError` is a condition cdcfeed names on purpose; one that reaches the CLI ends
the command with one line on stderr and exit code 2. Any other exception is a bug and
crashes with its traceback.
"""

from __future__ import annotations


class CdcfeedError(Exception):
    """Root of every error cdcfeed raises on purpose."""


class UserError(CdcfeedError):
    """A mistake the user can fix: bad setting, unreachable database, unwritable directory.

    The CLI prints ``<setting>: <message>`` and exits with code 2, never a traceback.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class DatabaseUnavailable(CdcfeedError):
    """The database could not be reached (connection refused, reset, server shutting down):
    worth retrying once it answers again."""


class DatabaseSilent(DatabaseUnavailable):
    """The server did not answer within the time a caller gave it (a hung backend, say)."""


class DatabaseRefused(CdcfeedError):
    """The server refused one statement (constraint, privilege, statement timeout, lock not
    available, ...): a batch fails with it; loops log it and go on."""

    def __init__(self, description: str, sqlstate: str, detail: str = "") -> None:
        super().__init__(description)
        self.sqlstate = sqlstate
        self.detail = detail


class DatabaseBusy(DatabaseRefused):
    """Refused for now: a statement timeout, a lock not available, a serialization failure.
    Worth another try later."""


class PrivilegeRefused(DatabaseRefused):
    """Refused for want of a privilege (SQLSTATE 42501). When the boundary could tell, the
    message names each missing privilege, its object and the GRANT that fixes it."""

    def __init__(
        self,
        description: str,
        sqlstate: str = "42501",
        detail: str = "",
        *,
        grants: tuple[str, ...] = (),
    ) -> None:
        super().__init__(description, sqlstate, detail)
        self.grants = grants


class SchemaMissing(DatabaseRefused):
    """The ledger's tables (or some of them) do not exist in the database: `init-db` first."""


class SlotBusy(DatabaseRefused):
    """A replication slot (or another object) is in use by another session."""


class ObjectMissing(DatabaseRefused):
    """The server does not know an object a statement names (a publication, say)."""


class FeedError(CdcfeedError):
    """A feed file could not be written: directory missing, read-only or out of space."""


class BatchAborted(CdcfeedError):
    """A batch was given up before its COPY committed: cut off by shutdown, or settled by
    another instance first (this one's lease had lapsed)."""
