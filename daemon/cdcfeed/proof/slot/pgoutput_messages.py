"""The messages of the ``pgoutput`` logical replication protocol, version 1, as records.

:mod:`cdcfeed.proof.slot.pgoutput` decodes bytes into these and is the one module callers
import: it exports them all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal, TypeAlias

__all__ = [
    "COLUMN_FLAG_KEY",
    "MESSAGE_FLAG_TRANSACTIONAL",
    "PG_EPOCH",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "OldTupleKind",
    "Origin",
    "PgOutputError",
    "Relation",
    "Truncate",
    "TupleData",
    "TupleValue",
    "Type",
    "Unchanged",
    "Update",
    "pg_timestamp_to_datetime",
]


class PgOutputError(Exception):
    """The bytes are not a well-formed pgoutput protocol version 1 message."""


class Unchanged(enum.Enum):
    """An unchanged TOASTed column: pgoutput does not resend its value."""

    UNCHANGED = "u"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = Unchanged.UNCHANGED

TupleValue: TypeAlias = str | bytes | Unchanged | None
"""One column: text format ``str``, binary format ``bytes``, SQL NULL, or unchanged TOAST."""

TupleData: TypeAlias = tuple[TupleValue, ...]

OldTupleKind: TypeAlias = Literal["K", "O"]
"""``K``: only the replica identity key columns; ``O``: the whole old row (identity FULL)."""

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2

COLUMN_FLAG_KEY: Final = 1
MESSAGE_FLAG_TRANSACTIONAL: Final = 1


def pg_timestamp_to_datetime(microseconds: int) -> datetime:
    """Convert a TimestampTz (microseconds since 2000-01-01 UTC) to an aware datetime."""
    try:
        return PG_EPOCH + timedelta(microseconds=microseconds)
    except OverflowError:
        # Only +/-infinity timestamps get here; a commit time is never one of those.
        raise PgOutputError(f"timestamp {microseconds} is out of range") from None


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & COLUMN_FLAG_KEY)


@dataclass(frozen=True, slots=True)
class Relation:
    relation_id: int
    namespace: str
    """Empty for ``pg_catalog``."""
    name: str
    replica_identity: str
    """``relreplident``: ``d`` default, ``n`` nothing, ``f`` full, ``i`` index."""
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def as_dict(self, values: TupleData) -> dict[str, TupleValue]:
        """Pair a tuple of this relation with its column names.

        Raises :class:`PgOutputError` if the widths differ, which means the tuple was read
        against a stale or wrong Relation message.
        """
        if len(values) != len(self.columns):
            raise PgOutputError(
                f"tuple has {len(values)} columns but relation "
                f"{self.namespace}.{self.name} ({self.relation_id}) has {len(self.columns)}"
            )
        return {column.name: value for column, value in zip(self.columns, values, strict=True)}


@dataclass(frozen=True, slots=True)
class Type:
    type_oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_id: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation_id: int
    new: TupleData
    old: TupleData | None = None
    """Absent when the replica identity did not change and the identity is not FULL."""
    old_kind: OldTupleKind | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    relation_id: int
    old: TupleData
    old_kind: OldTupleKind


@dataclass(frozen=True, slots=True)
class Truncate:
    options: int
    relation_ids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A ``pg_logical_emit_message`` record (sent only with the ``messages`` option)."""

    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & MESSAGE_FLAG_TRANSACTIONAL)


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | Type | Insert | Update | Delete | Truncate | LogicalMessage
)
