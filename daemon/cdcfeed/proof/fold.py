"""Change events, from whatever source, folded into what the judge weighs.

Every source hands its changes to a `Fold`: orders inserts become one `Observation` per batch
and transaction (rows, smallest, largest and sum of its distinct order ids, the ids as
ranges), changes cdcfeed never makes become `StreamEvent`s. Memory holds ranges of ids, not
rows, unless the events carry fingerprints: then each id's first delivery is kept, to tell a
redelivered copy (counted) from one that differs (a violation).

Two ways to use it:

- A source that reads whole transactions in commit order (a pgoutput slot) builds it with
  `transactional=True`, feeds a transaction's changes, its `end()`, then `flush()` (or
  `discard()`, for a transaction an earlier read already recorded): `observations` and
  `events` grow at each flush.
- A source whose transactions interleave or arrive twice (Kafka) keeps each batch until it is
  due and `take()`s its observations then; `events` grow as changes arrive.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from itertools import repeat

from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import (
    ChangeEvent,
    Observation,
    Op,
    StreamEvent,
    Table,
    TransactionEnd,
)

# Below any bigint by more than one: the first id of a part never extends a range.
_NONE = -(2**63) - 2
_NO_LSN = 2**64  # above any LSN


class _Part:
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

    def __init__(self, batch_id: int, xid: int, siblings: list[_Part]) -> None:
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


@dataclass(frozen=True, slots=True)
class _Pending:
    batch_id: int | None
    xid: int
    lsn: int
    what: str


class Fold:
    """Folds one source's change events into observations and stream events."""

    def __init__(self, *, transactional: bool = False) -> None:
        self.transactional = transactional
        self.observations: list[Observation] = []  # grown by flush()
        self.events: list[StreamEvent] = []
        self.duplicates = 0  # redelivered copies, counted and otherwise ignored
        self.snapshot_rows = 0  # orders read by a snapshot (op r), never part of a batch
        self._batches: dict[int, list[_Part]] = {}
        self._ends: dict[int, TransactionEnd] = {}
        self._parts_of_xid: dict[int, int] = {}  # xid -> how many held batches it carried
        # order id -> (xid, lsn, fingerprint) of its first delivery, per batch; only for
        # events that carry a fingerprint.
        self._first: dict[int, dict[int, tuple[int, int, int]]] = {}
        self._pending: list[_Pending] = []
        self._part: _Part | None = None  # the last part an insert went to

    @property
    def batches(self) -> list[int]:
        """The batches with rows folded and not yet flushed or taken."""
        return list(self._batches)

    def rows(self, batch_id: int) -> int:
        """How many distinct order ids of a batch are folded and not yet taken."""
        return sum(
            high - low + 1
            for part in self._batches.get(batch_id, ())
            for low, high in zip(part.lows, part.highs, strict=True)
        )

    def change(self, event: ChangeEvent) -> None:
        self.add(
            event.table,
            event.op,
            event.order_id,
            event.batch_id,
            event.xid,
            event.lsn,
            event.fingerprint,
        )

    def add(
        self,
        table: Table,
        op: Op,
        order_id: int | None,
        batch_id: int | None,
        xid: int,
        lsn: int,
        fingerprint: int | None = None,
    ) -> None:
        """`change()` without building the record first."""
        if table != "orders":
            return  # the ledger's own changes are the ledger's to judge, not the stream's
        if op == "c":
            if order_id is None or batch_id is None:
                raise ValueError(f"an insert of orders in xid {xid} lacks its order or batch id")
            self.insert(order_id, batch_id, xid, lsn, fingerprint)
        elif op == "r":
            self.snapshot_rows += 1
        elif op == "u":
            self._event(
                batch_id, xid, lsn, f"UPDATE of order {order_id}; cdcfeed only inserts orders"
            )
        elif op == "d":
            self._event(
                batch_id, xid, lsn, f"DELETE of order {order_id}; cdcfeed never deletes orders"
            )
        else:
            self._event(None, xid, lsn, "TRUNCATE of orders")

    def insert(
        self, order_id: int, batch_id: int, xid: int, lsn: int, fingerprint: int | None = None
    ) -> None:
        """An orders insert: the hot path, one call per row."""
        part = self._part
        if part is None or part.batch_id != batch_id or part.xid != xid:
            part = self._part_of(batch_id, xid)
        last = part.last
        if order_id > last and part.alone:
            # The common case: ids in order, in a batch that one transaction carries, so new
            # to it: `_insert` without looking.
            if order_id == last + 1:
                part.highs[-1] = order_id
            else:
                part.lows.append(order_id)
                part.highs.append(order_id)
            part.last = order_id
            if lsn > part.high_lsn:
                part.high_lsn = lsn
            if lsn < part.low_lsn:
                part.low_lsn = lsn
            if fingerprint is not None:
                firsts = part.firsts
                if firsts is None:
                    firsts = part.firsts = self._first.setdefault(batch_id, {})
                firsts[order_id] = (xid, lsn, fingerprint)
            return
        self._insert(part, order_id, lsn, fingerprint)

    def insert_run(
        self,
        batch_id: int,
        order_ids: list[int],
        xids: list[int],
        lsns: list[int],
        fingerprints: list[int],
    ) -> None:
        """`insert` of each row of one batch, in order; one step for the usual run: one
        transaction's, its ids rising one by one above those the batch holds."""
        xid, first, last = xids[0], order_ids[0], order_ids[-1]
        count = len(order_ids)
        part = self._part
        if part is None or part.batch_id != batch_id or part.xid != xid:
            part = self._part_of(batch_id, xid)
        if not (
            part.alone
            and first > part.last
            and last - first == count - 1
            and xids.count(xid) == count
            and order_ids == list(range(first, last + 1))
        ):
            for order_id, row_xid, lsn, fingerprint in zip(
                order_ids, xids, lsns, fingerprints, strict=True
            ):
                self.insert(order_id, batch_id, row_xid, lsn, fingerprint)
            return
        if first == part.last + 1:
            part.highs[-1] = last
        else:
            part.lows.append(first)
            part.highs.append(last)
        part.last = last
        part.high_lsn = max(part.high_lsn, max(lsns))
        part.low_lsn = min(part.low_lsn, min(lsns))
        firsts = part.firsts
        if firsts is None:
            firsts = part.firsts = self._first.setdefault(batch_id, {})
        firsts.update(zip(order_ids, zip(repeat(xid), lsns, fingerprints), strict=False))

    def end(self, end: TransactionEnd) -> None:
        """What a transaction's end says: where it committed, and what it declares it carried."""
        self._ends[end.xid] = end

    def flush(self) -> None:
        """Everything folded so far becomes `observations` and `events`, in arrival order."""
        for parts in self._batches.values():
            self.observations += self._observe(parts)
        for p in self._pending:
            end = self._ends.get(p.xid)
            lsn = p.lsn if end is None or end.commit_lsn is None else end.commit_lsn
            reason = f"{p.what} (transaction xid {p.xid}, commit {int_to_lsn(lsn)})"
            self.events.append(StreamEvent(p.batch_id, p.xid, lsn, reason))
        self.discard()

    def discard(self) -> None:
        """Forgets everything folded since the last flush."""
        self._batches = {}
        self._ends = {}
        self._parts_of_xid = {}
        self._first = {}
        self._pending = []
        self._part = None

    def firsts(self, batch_id: int) -> dict[int, tuple[int, int, int]]:
        """Per order id of a batch not yet taken: (xid, lsn, fingerprint) of its first
        delivery; empty unless its events carry fingerprints."""
        return self._first.get(batch_id, {})

    def take(self, batch_id: int) -> list[Observation]:
        """The observations of one batch, one per transaction, forgetting it; [] if none."""
        parts = self._batches.pop(batch_id, None)
        self._first.pop(batch_id, None)
        if parts is None:
            return []
        if self._part is not None and self._part.batch_id == batch_id:
            self._part = None
        observations = self._observe(parts)
        for part in parts:
            left = self._parts_of_xid[part.xid] - 1
            if left:
                self._parts_of_xid[part.xid] = left
            else:  # its transaction carried no other batch held: its end is of no more use
                del self._parts_of_xid[part.xid]
                self._ends.pop(part.xid, None)
        return observations

    def _part_of(self, batch_id: int, xid: int) -> _Part:
        parts = self._batches.get(batch_id)
        if parts is None:
            parts = self._batches[batch_id] = []
        for part in parts:
            if part.xid == xid:
                break
        else:
            part = _Part(batch_id, xid, parts)
            parts.append(part)
            for sibling in parts:
                sibling.alone = len(parts) == 1
            self._parts_of_xid[xid] = self._parts_of_xid.get(xid, 0) + 1
        self._part = part
        return part

    def _insert(self, part: _Part, order_id: int, lsn: int, fingerprint: int | None) -> None:
        firsts = self._first.get(part.batch_id)
        if fingerprint is not None and firsts is None:
            firsts = self._first[part.batch_id] = {}
        holder = next((p for p in part.siblings if p.holds(order_id)), None)
        if holder is None:
            part.place(order_id, lsn)
            if fingerprint is not None and firsts is not None:
                firsts[order_id] = (part.xid, lsn, fingerprint)
            return
        first = None if firsts is None else firsts.get(order_id)
        if first is not None:
            same = first == (part.xid, lsn, fingerprint)
            was = (first[0], int_to_lsn(first[1]), first[2] != fingerprint)
        else:  # no fingerprint: told apart by transaction and LSN only
            same = holder.xid == part.xid and holder.low_lsn == holder.high_lsn == lsn
            span = int_to_lsn(holder.low_lsn)
            if holder.high_lsn != holder.low_lsn:
                span += f"..{int_to_lsn(holder.high_lsn)}"
            was = (holder.xid, span, False)
        if same:
            holder.duplicates += 1
            self.duplicates += 1
            return
        first_xid, first_lsn, other_values = was
        differences = []
        if first_xid != part.xid:
            differences.append(f"first in xid {first_xid}, again in xid {part.xid}")
        if first_lsn != int_to_lsn(lsn):
            differences.append(f"first at LSN {first_lsn}, again at {int_to_lsn(lsn)}")
        if other_values:
            differences.append("with other values")
        self._event(
            part.batch_id,
            part.xid,
            lsn,
            f"order {order_id} delivered twice, differently: {'; '.join(differences)}",
        )

    def _event(self, batch_id: int | None, xid: int, lsn: int, what: str) -> None:
        if self.transactional:
            self._pending.append(_Pending(batch_id, xid, lsn, what))
        else:
            reason = f"{what} (transaction xid {xid}, LSN {int_to_lsn(lsn)})"
            self.events.append(StreamEvent(batch_id, xid, lsn, reason))

    def _observe(self, parts: list[_Part]) -> list[Observation]:
        observations = []
        for part in parts:
            if not part.lows:
                continue  # it only brought copies of ids another transaction delivered
            end = self._ends.get(part.xid)
            commit_lsn, end_lsn = part.low_lsn, part.high_lsn
            declared = declared_ledger = None
            if end is not None:
                # The end knows where the commit record lies; the changes lie before it.
                if end.commit_lsn is not None:
                    commit_lsn = end.commit_lsn
                if end.end_lsn is not None:
                    end_lsn = end.end_lsn
                declared, declared_ledger = end.declared_orders, end.declared_ledger
            ranges = tuple(zip(part.lows, part.highs, strict=True))
            rows = total = 0
            for low, high in ranges:
                count = high - low + 1
                rows += count
                total += (low + high) * count // 2
            observations.append(
                Observation(
                    part.batch_id,
                    commit_lsn,
                    end_lsn,
                    part.xid,
                    rows,
                    ranges[0][0],
                    ranges[-1][1],
                    total,
                    order_ranges=ranges,
                    declared_rows=declared,
                    declared_ledger_rows=declared_ledger,
                    duplicates=part.duplicates,
                )
            )
        return observations
