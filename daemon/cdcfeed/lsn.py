"""Log sequence numbers: PostgreSQL's `X/Y` text and the integers cdcfeed computes with."""

from __future__ import annotations

import re
from typing import Final

_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def lsn_to_int(text: str) -> int:
    """Parse a PostgreSQL ``pg_lsn`` text such as ``16/B374D848`` into a 64-bit integer.

    Raises :class:`ValueError` for anything ``pg_lsn`` itself would not accept.
    """
    match = _LSN_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid LSN {text!r}: expected two hex numbers as 'X/Y'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def int_to_lsn(value: int) -> str:
    """Format a 64-bit integer as PostgreSQL prints a ``pg_lsn`` (``16/B374D848``)."""
    if not 0 <= value <= 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"LSN {value} is outside 0..2**64-1")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
