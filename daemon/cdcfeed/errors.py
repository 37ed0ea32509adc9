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
    """The database could not be reached (connection refused, reset, server shutting down)."""


class FeedError(CdcfeedError):
    """A feed file could not be written: directory missing, read-only or out of space."""


class BatchAborted(CdcfeedError):
    """A batch was given up before its COPY committed: cut off by shutdown, or settled by
    another instance first (this one's lease had lapsed)."""
