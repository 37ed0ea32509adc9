"""The records a source produces and the judge consumes, whatever the source reads.

A source turns what it reads into `ChangeEvent`s and `TransactionEnd`s, which carry what any
change data capture consumer sees; `fold` turns those into `Observation`s and `StreamEvent`s,
which `judge` weighs against the ledger's `LedgerBatch`es.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

Table: TypeAlias = Literal["orders", "ledger"]

Op: TypeAlias = Literal["c", "u", "d", "r", "t"]
"""Debezium's letters: c insert, u update, d delete, r a snapshot's read, t truncate."""

OrderRanges: TypeAlias = tuple[tuple[int, int], ...]
"""Order ids as sorted, disjoint, inclusive (first, last) ranges."""


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
class TransactionEnd:
    """A transaction's end, and what it declares it carried when the source says so."""

    xid: int
    # Where its commit record starts and ends; None when the source does not say (Debezium's
    # END event names its transaction, not its commit record).
    commit_lsn: int | None
    end_lsn: int | None
    declared_orders: int | None = None  # the END's event_count for orders
    declared_ledger: int | None = None  # and for the ledger table


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
        )
