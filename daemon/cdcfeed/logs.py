"""Logging, configured once by the CLI: loguru to stderr, text or JSON lines, secrets scrubbed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | {message}"
)


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
