"""One exception hierarchy for cdcfeed; the CLI turns each into one line and an exit code."""

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
    """The database could not be reached (connection refused, reset, server shutting down)."""


class FeedError(CdcfeedError):
    """A feed file could not be written: directory missing, read-only or out of space."""


class BatchAborted(CdcfeedError):
    """A batch was given up before its COPY committed: cut off by shutdown, or settled by
    another instance first (this one's lease had lapsed)."""
