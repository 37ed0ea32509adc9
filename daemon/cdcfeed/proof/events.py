"""The records a source produces and the judge consumes, whatever the source reads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Violation:
    batch_id: int | None
    reason: str

    def line(self) -> str:
        where = "stream" if self.batch_id is None else f"batch {self.batch_id}"
        return f"{where}: {self.reason}"


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


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A change to orders that cdcfeed never makes."""

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
