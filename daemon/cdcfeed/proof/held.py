"""What `fold` holds until it hands it out: inserts per batch and transaction (`Part`), and
one transaction's updates and deletes of orders (`Changes`) until it knows their batch.

Inserts are held as ranges of ids. Updates and deletes are held per order id: a redelivered
copy (counted) must be told from a second, different change of the same order (which the
judge names), and a batch changes a window of a few ids where it inserts a block of many.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import replace

from cdcfeed.proof.events import (
    ChangeObservation,
    Identity,
    OrderChange,
    OrderRanges,
    TransactionEnd,
    as_ranges,
    committed_span,
)

_WHAT = {"u": "UPDATE", "d": "DELETE"}

# Below any bigint by more than one: the first id of a part never extends a range.
_NONE = -(2**63) - 2
_NO_LSN = 2**64  # above any LSN


class Part:
    """One transaction's share of one batch: its order ids as sorted, disjoint ranges."""

    __slots__ = (
        "alone",
        "batch_id",
        "duplicates",
        "firsts",
        "high_lsn",
        "highs",
        "last",
        "low_lsn",
        "lows",
        "siblings",
        "xid",
    )

    def __init__(self, batch_id: int, xid: int, siblings: list[Part]) -> None:
        self.batch_id = batch_id
        self.xid = xid
        self.lows: list[int] = []
        self.highs: list[int] = []
        self.last = _NONE  # highs[-1]: an id above it is new to this part
        # The LSNs of the ids it holds (a copy of an id held elsewhere does not count).
        self.low_lsn = _NO_LSN
        self.high_lsn = -1
        self.duplicates = 0
        self.siblings = siblings  # every part of the batch, this one included
        self.alone = False  # the batch's only part: no other to look for an id in
        self.firsts: dict[int, tuple[int, int, int]] | None = None  # Fold._first's, once used

    def holds(self, order_id: int) -> bool:
        i = bisect_right(self.lows, order_id) - 1
        return i >= 0 and order_id <= self.highs[i]

    def place(self, order_id: int, lsn: int) -> None:
        """Adds an id this part does not hold, merging the ranges it touches."""
        if lsn < self.low_lsn:
            self.low_lsn = lsn
        if lsn > self.high_lsn:
            self.high_lsn = lsn
        lows, highs = self.lows, self.highs
        i = bisect_right(lows, order_id)  # lows[i - 1] < order_id < lows[i]
        joins_left = i > 0 and highs[i - 1] + 1 == order_id
        joins_right = i < len(lows) and lows[i] - 1 == order_id
        if joins_left and joins_right:
            highs[i - 1] = highs[i]
            del lows[i], highs[i]
        elif joins_left:
            highs[i - 1] = order_id
        elif joins_right:
            lows[i] = order_id
        else:
            lows.insert(i, order_id)
            highs.insert(i, order_id)
        self.last = highs[-1]


class Changes:
    """The updates and deletes of one transaction, by order id, in arrival order."""

    __slots__ = ("by_id", "duplicates", "high_lsn", "identity", "low_lsn", "twice", "xid")

    def __init__(self, xid: int) -> None:
        self.xid = xid
        self.by_id: dict[int, OrderChange] = {}
        self.twice: set[int] = set()
        self.low_lsn = 2**64
        self.high_lsn = -1
        self.identity: Identity = "d"
        self.duplicates = 0

    def add(self, change: OrderChange) -> bool:
        """Keeps a change; True when it is a redelivered copy of one kept already."""
        first = self.by_id.get(change.order_id)
        if first is not None:
            # The identity is the reader's knowledge, not the change's: a copy read across a
            # switch of the table's identity is the same change.
            if first == replace(change, identity=first.identity):
                self.duplicates += 1
                return True
            self.twice.add(change.order_id)  # the first stands, as for inserts
            return False
        self.by_id[change.order_id] = change
        self.low_lsn = min(self.low_lsn, change.lsn)
        self.high_lsn = max(self.high_lsn, change.lsn)
        # ALTER TABLE ... REPLICA IDENTITY waits for the transactions using the table, so
        # one transaction's changes were all written under one identity; a source unsure of
        # which (kafka/changes.py) stamps some with the laxer one, and the laxer stands.
        if len(self.by_id) == 1 or change.identity != "f":
            self.identity = change.identity
        return False

    def observe(self, batch_id: int | None, end: TransactionEnd | None) -> ChangeObservation:
        """What the judge weighs: the ids as ranges, per after status and before image."""
        statuses: dict[str | None, list[int]] = {}
        deleted: list[int] = []
        key_only: list[int] = []
        unmarked: list[int] = []
        unchanged = resolved = 0
        for order_id, change in self.by_id.items():
            if change.op == "u":
                statuses.setdefault(change.status, []).append(order_id)
            else:
                deleted.append(order_id)
                if change.tombstone is False:
                    unmarked.append(order_id)
            if change.before == "key":
                key_only.append(order_id)
            if change.note == "unchanged":
                unchanged += 1
            elif change.note == "resolved":
                resolved += 1
        commit_lsn, end_lsn, declared, declared_ledger = committed_span(
            end, self.low_lsn, self.high_lsn
        )
        ordered: list[tuple[str | None, OrderRanges]] = sorted(
            ((status, as_ranges(ids)) for status, ids in statuses.items()),
            key=lambda item: (item[0] is None, item[0] or ""),
        )
        return ChangeObservation(
            batch_id,
            self.xid,
            commit_lsn,
            end_lsn,
            statuses=tuple(ordered),
            deleted=as_ranges(deleted),
            key_only=as_ranges(key_only),
            identity=self.identity,
            unchanged_toast=unchanged,
            resolved_toast=resolved,
            missing_tombstones=as_ranges(unmarked),
            twice=as_ranges(self.twice),
            declared_rows=declared,
            declared_ledger_rows=declared_ledger,
            duplicates=self.duplicates,
        )

    def orphaned(self) -> Iterator[str]:
        """What each change is, when no batch ran the transaction: a change cdcfeed never
        makes."""
        for order_id, change in self.by_id.items():
            yield f"{_WHAT[change.op]} of order {order_id}; no batch of the ledger ran it"
