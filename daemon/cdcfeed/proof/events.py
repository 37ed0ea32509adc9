"""The records a source produces and the judge consumes, whatever the source reads.

A source turns what it reads into `ChangeEvent`s (inserts, and changes cdcfeed never makes),
`OrderChange`s (updates and deletes of orders) and `TransactionEnd`s, which carry what any
change data capture consumer sees; `fold` turns those into `Observation`s (inserts, per batch),
`ChangeObservation`s (updates and deletes, per transaction) and `StreamEvent`s, which `judge`
weighs against the ledger's `LedgerBatch`es.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

Table: TypeAlias = Literal["orders", "ledger"]

Op: TypeAlias = Literal["c", "u", "d", "r", "t"]
"""Debezium's letters: c insert, u update, d delete, r a snapshot's read, t truncate."""

OrderRanges: TypeAlias = tuple[tuple[int, int], ...]
"""Order ids as sorted, disjoint, inclusive (first, last) ranges."""

Before: TypeAlias = Literal["key", "row"]
"""What an update's or a delete's before image carried: the key alone (or no before image at
all: pgoutput sends none for an update under REPLICA IDENTITY DEFAULT), or the whole old row."""

Note: TypeAlias = Literal["value", "unchanged", "resolved", "none"]
"""What an update's after image carried of the TOASTed `note`: its value; not the value
(pgoutput's 'u' marker, Debezium's placeholder) and no before image holding it either
("unchanged"); not the value, but the before image holds it ("resolved"); nothing to carry
("none": a delete, a NULL note, a table without the column)."""

Identity: TypeAlias = Literal["d", "f", "n", "i"]
"""The replica identity of orders as the source knows it (`pg_class.relreplident`): d default
(the key), f full (the whole old row), n nothing, i an index."""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row change as the stream carried it."""

    table: Table
    op: Op
    order_id: int | None  # the orders row's key; None for a ledger row or a truncate
    batch_id: int | None  # None when the event lacks it (a delete's key-only old row)
    xid: int  # 32 bits: pgoutput's Begin, Debezium's source.txId
    lsn: int  # pgoutput: its transaction's commit LSN; Debezium: source.lsn
    # A digest of the row's values, telling a redelivered copy from one that differs.
    fingerprint: int | None = None
    # When the event reached the stream (a Kafka record's timestamp), in seconds since the
    # epoch; None when the source does not know.
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class OrderChange:
    """One update or delete of orders as the stream carried it.

    Attributed to a batch by its transaction (the ledger's xid of the batch), never by the
    row: an update's after image carries the batch that inserted the row, a delete's before
    image under REPLICA IDENTITY DEFAULT carries the key alone.
    """

    op: Literal["u", "d"]
    order_id: int
    xid: int  # 32 bits, as in ChangeEvent
    lsn: int  # as in ChangeEvent
    status: str | None  # the after image's status; None for a delete
    before: Before
    note: Note = "none"
    identity: Identity = "d"  # the replica identity the source knew when it read the change
    # Kafka: whether the delete's tombstone followed it; None where there is no such promise
    # (the slot, an update).
    tombstone: bool | None = None
    fingerprint: int | None = None  # as in ChangeEvent: tells a redelivered copy apart


@dataclass(frozen=True, slots=True)
class TransactionEnd:
    """A transaction's end, and what it declares it carried when the source says so."""

    xid: int
    # Where its commit record starts and ends; None when the source does not say (Debezium's
    # END event names its transaction, not its commit record).
    commit_lsn: int | None
    end_lsn: int | None
    declared_orders: int | None = None  # the END's event_count for orders
    declared_ledger: int | None = None  # and for the ledger table


def committed_span(
    end: TransactionEnd | None, low_lsn: int, high_lsn: int
) -> tuple[int, int, int | None, int | None]:
    """A transaction's (commit LSN, end LSN, declared orders, declared ledger rows): where its
    END says, since the end knows where the commit record lies; else the span of the changes
    seen (`low_lsn`, `high_lsn`) and no declared counts."""
    if end is None:
        return low_lsn, high_lsn, None, None
    return (
        low_lsn if end.commit_lsn is None else end.commit_lsn,
        high_lsn if end.end_lsn is None else end.end_lsn,
        end.declared_orders,
        end.declared_ledger,
    )


@dataclass(frozen=True, slots=True)
class Violation:
    batch_id: int | None
    reason: str

    def line(self) -> str:
        where = "stream" if self.batch_id is None else f"batch {self.batch_id}"
        return f"{where}: {self.reason}"


def violation_lines(shown: Sequence[Violation], total: int) -> list[str]:
    """A report's violation lines: those it holds, then how many more the state has."""
    lines = [f"violation: {v.line()}" for v in shown]
    if total > len(shown):
        lines.append(
            f"... and {total - len(shown)} more (see --format json or table cdcfeed_verify_results)"
        )
    return lines


@dataclass(frozen=True, slots=True)
class Observation:
    """One transaction's share of one batch, as the stream carried it."""

    batch_id: int
    commit_lsn: int
    commit_end_lsn: int
    xid: int
    rows: int
    min_order_id: int
    max_order_id: int
    sum_order_id: int
    # What only some sources know, and what a stored observation does not keep; never compared,
    # so two observations of the same rows are equal whichever way they were made.
    order_ranges: OrderRanges = field(default=(), compare=False)  # () when not tracked
    declared_rows: int | None = field(default=None, compare=False)  # the END's orders count
    declared_ledger_rows: int | None = field(default=None, compare=False)
    duplicates: int = field(default=0, compare=False)  # redelivered copies, not in `rows`


@dataclass(frozen=True, slots=True)
class ChangeObservation:
    """One transaction's updates and deletes of orders, as the stream carried them.

    Kept as ranges of ids, like inserts; an update's after status is kept too (ranges of the
    ids per status), since the judge checks each against the lifecycle.
    """

    batch_id: int | None  # the batch whose ledger row the transaction claimed, when known
    xid: int
    commit_lsn: int
    commit_end_lsn: int
    statuses: tuple[tuple[str | None, OrderRanges], ...] = ()  # updated ids per after status
    deleted: OrderRanges = ()
    key_only: OrderRanges = ()  # updates and deletes whose before image carried the key only
    identity: Identity = "d"  # the strictest the source knew during the transaction
    unchanged_toast: int = 0  # after images without the note, nor a before image holding it
    resolved_toast: int = 0  # after images without the note, the before image holding it
    missing_tombstones: OrderRanges = ()  # Kafka: deletes no tombstone followed
    twice: OrderRanges = ()  # ids the transaction changed more than once, differently
    declared_rows: int | None = None  # the END's orders count (inserts included)
    declared_ledger_rows: int | None = None
    duplicates: int = 0  # redelivered copies, not counted in the ranges

    @property
    def updated(self) -> OrderRanges:
        """Every updated id, whatever its after status."""
        return merged([r for _, ranges in self.statuses for r in ranges])

    @property
    def updates(self) -> int:
        return count(self.updated)

    @property
    def deletes(self) -> int:
        return count(self.deleted)


def merged(ranges: Sequence[tuple[int, int]]) -> OrderRanges:
    """Sorted, disjoint ranges covering the same ids (the given ones may overlap)."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            if high > out[-1][1]:
                out[-1] = (out[-1][0], high)
        else:
            out.append((low, high))
    return tuple(out)


def as_ranges(ids: Iterable[int]) -> OrderRanges:
    """Order ids (any order, repeats allowed) as ranges."""
    return merged([(i, i) for i in ids])


def count(ranges: OrderRanges) -> int:
    return sum(high - low + 1 for low, high in ranges)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A change to orders that cdcfeed never makes, or an order delivered twice, differently."""

    batch_id: int | None
    xid: int
    commit_lsn: int
    reason: str


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    batch_id: int
    status: str
    row_count: int
    first_order_id: int
    start_lsn: int | None
    end_lsn: int | None
    xid: int | None
    # What a batch of the change mix updated and deleted (ascending ids); counts 0 and ids
    # None for an insert-only batch (and for ledgers older than the change mix).
    updated: int = 0
    deleted: int = 0
    updated_ids: tuple[int, ...] | None = None
    deleted_ids: tuple[int, ...] | None = None

    @property
    def mixed(self) -> bool:
        """Whether the batch ran as a batch of the change mix (its ledger row names the ids
        it changed, if none): its transaction then writes its ledger row twice."""
        return self.updated_ids is not None or self.deleted_ids is not None

    @property
    def changes(self) -> int:
        """Orders events its transaction makes: inserts, updates and deletes."""
        return self.row_count + self.updated + self.deleted

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LedgerBatch | None:
        """A ledger row as the verifiers' queries give it (xid8 as text); None when the row
        is missing (a status of NULL from an outer join: a batch id the ledger lacks)."""
        if row["status"] is None:
            return None
        return cls(
            batch_id=row["batch_id"],
            status=row["status"],
            row_count=row["row_count"],
            first_order_id=row["first_order_id"],
            start_lsn=row["start_lsn"],
            end_lsn=row["end_lsn"],
            xid=int(row["xid"]) if row["xid"] is not None else None,
            # Absent from rows of queries (or ledgers) older than the change mix.
            updated=row.get("updated") or 0,
            deleted=row.get("deleted") or 0,
            updated_ids=_ids(row.get("updated_ids")),
            deleted_ids=_ids(row.get("deleted_ids")),
        )


def _ids(value: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)
