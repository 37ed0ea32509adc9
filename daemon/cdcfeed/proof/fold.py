"""Change events, from whatever source, folded into what the judge weighs.

Every source hands its changes to a `Fold`: orders inserts become one `Observation` per batch
and transaction (rows, smallest, largest and sum of its distinct order ids, the ids as
ranges); updates and deletes (`OrderChange`s) are kept per transaction, since only the
transaction says which batch made them, and become one `ChangeObservation` per transaction;
changes cdcfeed never makes become `StreamEvent`s. Memory holds ranges of ids, not
rows, unless the events carry fingerprints: then each id's first delivery is kept, to tell a
redelivered copy (counted) from one that differs (a violation).

Two ways to use it:

- A source that reads whole transactions in commit order (a pgoutput slot) builds it with
  `transactional=True`, feeds a transaction's changes, its `end()`, then `flush()` (or
  `discard()`, for a transaction an earlier read already recorded): `observations`,
  `changes` and `events` grow at each flush. Its updates and deletes belong to the batch
  whose ledger row the transaction claimed (`claim()`, from the ledger's change in the same
  transaction); those of a transaction that claimed none become `events`.
- A source whose transactions interleave or arrive twice (Kafka) keeps each batch until it is
  due and `take()`s its observations then, and the updates and deletes of the batch's
  transaction (the ledger's xid) with `take_changes()`; those of a transaction no batch ran
  become `events` with `orphan()`. Other `events` grow as changes arrive.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import (
    ChangeEvent,
    ChangeObservation,
    Identity,
    Observation,
    Op,
    OrderChange,
    StreamEvent,
    Table,
    TransactionEnd,
    committed_span,
)
from cdcfeed.proof.held import Changes, Part


@dataclass(frozen=True, slots=True)
class _Pending:
    batch_id: int | None
    xid: int
    lsn: int
    what: str  # "": where the updates and deletes of an unclaimed `xid` are reported


class Fold:
    """Folds one source's change events into observations and stream events."""

    def __init__(self, *, transactional: bool = False) -> None:
        self.transactional = transactional
        self.observations: list[Observation] = []  # grown by flush()
        self.changes: list[ChangeObservation] = []  # grown by flush()
        self.events: list[StreamEvent] = []
        self.duplicates = 0  # redelivered copies, counted and otherwise ignored
        self.snapshot_rows = 0  # orders read by a snapshot (op r), never part of a batch
        self._batches: dict[int, list[Part]] = {}
        self._ends: dict[int, TransactionEnd] = {}
        self._parts_of_xid: dict[int, int] = {}  # xid -> how many held batches it carried
        # order id -> (xid, lsn, fingerprint) of its first delivery, per batch; only for
        # events that carry a fingerprint.
        self._first: dict[int, dict[int, tuple[int, int, int]]] = {}
        self._pending: list[_Pending] = []
        self._part: Part | None = None  # the last part an insert went to
        self._changes: dict[int, Changes] = {}  # xid -> its updates and deletes
        self._claims: dict[int, int] = {}  # xid -> the batch whose ledger row it claimed

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
        for xid, held in self._changes.items():
            batch_id = self._claims.get(xid)
            if batch_id is not None:
                self.changes.append(held.observe(batch_id, self._ends.get(xid)))
        for p in self._pending:
            end = self._ends.get(p.xid)
            lsn = p.lsn if end is None or end.commit_lsn is None else end.commit_lsn
            if not p.what:
                if p.xid not in self._claims:
                    for what in self._changes[p.xid].orphaned():
                        self._flushed_event(p.xid, lsn, what)
                continue
            self._flushed_event(p.xid, lsn, p.what, p.batch_id)
        self.discard()

    def _flushed_event(self, xid: int, lsn: int, what: str, batch_id: int | None = None) -> None:
        reason = f"{what} (transaction xid {xid}, commit {int_to_lsn(lsn)})"
        self.events.append(StreamEvent(batch_id, xid, lsn, reason))

    def discard(self) -> None:
        """Forgets everything folded since the last flush."""
        self._batches = {}
        self._ends = {}
        self._parts_of_xid = {}
        self._first = {}
        self._pending = []
        self._part = None
        self._changes = {}
        self._claims = {}

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
            self._release(part.xid)
        return observations

    # --- updates and deletes -----------------------------------------------------------------

    def order_change(self, change: OrderChange) -> None:
        """An update or delete of orders, kept with its transaction's others."""
        held = self._changes.get(change.xid)
        if held is None:
            held = self._changes[change.xid] = Changes(change.xid)
            self._parts_of_xid[change.xid] = self._parts_of_xid.get(change.xid, 0) + 1
            if self.transactional:
                # Where its changes are reported, in arrival order, should no batch claim it.
                self._pending.append(_Pending(None, change.xid, change.lsn, ""))
        if held.add(change):
            self.duplicates += 1

    def relax_identity(self, identity: Identity, at_or_below: int) -> None:
        """The table's replica identity became the laxer `identity`, seen at WAL position
        `at_or_below`: the transactions held with a change there may predate the switch."""
        for held in self._changes.values():
            if held.low_lsn <= at_or_below:
                held.identity = identity

    def claim(self, xid: int, batch_id: int) -> None:
        """Transaction `xid` wrote batch `batch_id`'s ledger row with its own xid: the
        updates and deletes it carries are that batch's (transactional use)."""
        self._claims.setdefault(xid, batch_id)

    @property
    def change_xids(self) -> list[int]:
        """The transactions with updates or deletes folded and not yet taken."""
        return list(self._changes)

    def take_changes(self, xid: int, batch_id: int | None) -> ChangeObservation | None:
        """The updates and deletes of transaction `xid`, as `batch_id`'s (the batch whose
        ledger xid it is), forgetting them; None when it carried none."""
        held = self._changes.pop(xid, None)
        if held is None:
            return None
        observation = held.observe(batch_id, self._ends.get(xid))
        self._release(xid)
        return observation

    def drop_changes(self, xid: int) -> list[OrderChange]:
        """The updates and deletes of transaction `xid` as first kept, forgotten unjudged: a
        source that learns late that their batch was judged (by an earlier run) weighs them
        as redeliveries instead."""
        held = self._changes.pop(xid, None)
        if held is None:
            return []
        self._release(xid)
        return list(held.by_id.values())

    def orphan(self, xid: int) -> None:
        """The updates and deletes of transaction `xid`, which no batch of the ledger ran,
        become `events`; forgotten."""
        held = self._changes.pop(xid, None)
        if held is None:
            return
        for what in held.orphaned():
            reason = f"{what} (transaction xid {xid}, LSN {int_to_lsn(held.low_lsn)})"
            self.events.append(StreamEvent(None, xid, held.low_lsn, reason))
        self._release(xid)

    def _release(self, xid: int) -> None:
        left = self._parts_of_xid[xid] - 1
        if left:
            self._parts_of_xid[xid] = left
        else:  # its transaction carried nothing else held: its end is of no more use
            del self._parts_of_xid[xid]
            self._ends.pop(xid, None)

    def _part_of(self, batch_id: int, xid: int) -> Part:
        parts = self._batches.get(batch_id)
        if parts is None:
            parts = self._batches[batch_id] = []
        for part in parts:
            if part.xid == xid:
                break
        else:
            part = Part(batch_id, xid, parts)
            parts.append(part)
            for sibling in parts:
                sibling.alone = len(parts) == 1
            self._parts_of_xid[xid] = self._parts_of_xid.get(xid, 0) + 1
        self._part = part
        return part

    def _insert(self, part: Part, order_id: int, lsn: int, fingerprint: int | None) -> None:
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

    def _observe(self, parts: list[Part]) -> list[Observation]:
        observations = []
        for part in parts:
            if not part.lows:
                continue  # it only brought copies of ids another transaction delivered
            commit_lsn, end_lsn, declared, declared_ledger = committed_span(
                self._ends.get(part.xid), part.low_lsn, part.high_lsn
            )
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
