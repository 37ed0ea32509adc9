"""Logging, configured once by the CLI: loguru to stderr, text or JSON lines, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | {message}"
)


class _LibraryLogs(logging.Handler):
    """Routes the libraries' stdlib logging (asyncpg's pool, APScheduler) through loguru.

    Otherwise Python's last-resort handler prints them raw: outside the JSON lines, past the
    secret scrubber, and with a full traceback for every reconnect attempt asyncpg's pool makes
    by itself during an outage, which the database monitor already reports in one line.
    """

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            message = f"{message} ({type(error).__name__}: {error})"
        logger.log(
            record.levelname if record.levelno in _LEVELS else "WARNING",
            f"{record.name}: {message}",
        )


_LEVELS = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


def configure(level: str, json: bool, secrets: tuple[str, ...] = ()) -> None:
    """Sends logs to stderr; any secret that slips into a message is replaced by ***."""
    hidden = tuple(secret for secret in secrets if secret)

    def scrub(record: Record) -> None:
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "***")

    logger.remove()
    logger.configure(patcher=scrub if hidden else None)
    logger.add(
        sys.stderr,
        level=level,
        format=TEXT_FORMAT if not json else "{message}",
        serialize=json,
        colorize=False if json else None,
        backtrace=False,
        diagnose=False,  # diagnose would print local variables, DSNs among them
    )
    # Warnings and up only: APScheduler logs every job run at INFO, hundreds a second.
    logging.basicConfig(handlers=[_LibraryLogs()], level=logging.WARNING, force=True)
