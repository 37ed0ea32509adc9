"""The orders topic's updates, deletes and tombstones, kept until their batch is judged.

Split from `delivery` (which folds inserts by batch): an update or a delete carries no batch
of its own - its after image names the batch that *inserted* the row - so it is kept by its
transaction (source.txId) in the shared fold, and handed to the judge with the batch whose
ledger xid that transaction is.

Tombstones. Debezium follows each delete with a tombstone (`tombstones.on.delete=true`, its
default): a record with the deleted row's key and no value, produced right after the delete,
hence next to it on the same partition (same key). So the record that follows a delete on its
partition is its tombstone, or the tombstone is missing. Until that next record is read, the
delete waits here (a fetch may end between the two), and its batch is not yet whole.

Redeliveries. A change of a transaction whose batch was judged is a duplicate when the ledger
accounts for it (the id among the batch's updated or deleted ids, an update's status the one
the lifecycle gives, inside the batch's bracket), else it amends the verdict as a violation.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace

from cdcfeed.lifecycle import updated_status
from cdcfeed.proof import events
from cdcfeed.proof.events import Identity, LedgerBatch, Violation
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.kafka.debezium import OrderChange
from cdcfeed.proof.kafka.digest import fingerprint

TP = tuple[str, int]
XID_MASK = 0xFFFF_FFFF
_WHAT = {"u": "UPDATE", "d": "DELETE"}


@dataclass(slots=True)
class _Held:
    """What is known of one transaction's updates and deletes before its batch is judged."""

    ids: set[int]  # the orders it changed (copies counted once)
    low_lsn: int
    high_lsn: int


class ChangeBook:
    """One verifier's updates and deletes, by transaction, and the deletes awaiting their
    tombstone."""

    def __init__(self, fold: Fold) -> None:
        self.fold = fold
        # The replica identity of orders, read from the database when a pass starts.
        self.identity: Identity = "d"
        self._held: dict[int, _Held] = {}  # xid -> its changes folded, not yet judged
        # Per partition: the delete its last record was, awaiting the tombstone that must
        # come next (at most one: the tombstone follows its delete at once).
        self._awaiting: dict[TP, events.OrderChange] = {}
        # Per partition: xid -> (its first change's offset, the highest source.lsn before it),
        # to commit no offset past a change of an unjudged transaction.
        self.firsts: dict[TP, dict[int, tuple[int, int]]] = {}
        # xid -> the judged batch it ran (this run's verdicts, and earlier runs' looked up).
        self.judged: dict[int, LedgerBatch | None] = {}
        self.duplicates = 0
        self.amendments: list[Violation] = []

    # --- reading --------------------------------------------------------------------------

    def tombstone(self, tp: TP, order_id: int | None) -> bool:
        """A tombstone read on `tp`; True when it is the one the delete before it awaited."""
        delete = self._awaiting.pop(tp, None)
        if delete is None:
            return False
        if delete.order_id == order_id:
            self.fold.order_change(replace(delete, tombstone=True))
            return True
        self._give(delete, tombstone=False)
        return False

    def next_record(self, tp: TP) -> None:
        """A record other than a tombstone read on `tp`: the delete before it, if any, had
        none."""
        delete = self._awaiting.pop(tp, None)
        if delete is not None:
            self._give(delete, tombstone=False)

    def change(self, tp: TP, offset: int, below: int, change: OrderChange, new: bool) -> None:
        """An update or delete (not a snapshot's) read at `offset` of `tp`; `below`: the highest
        source.lsn before it there; `new`: not read by an earlier run."""
        xid, lsn = change.tx_id or 0, change.lsn or 0
        if xid in self.judged:
            if new:
                self._again(xid, change)
            return
        held = self._held.get(xid)
        if held is None:
            held = self._held[xid] = _Held(set(), lsn, lsn)
        held.ids.add(change.order_id)
        held.low_lsn, held.high_lsn = min(held.low_lsn, lsn), max(held.high_lsn, lsn)
        self.firsts.setdefault(tp, {}).setdefault(xid, (offset, below))
        record = self._record(change, xid, lsn)
        if change.op == "d":
            self._awaiting[tp] = record
        else:
            self.fold.order_change(record)

    def _record(self, change: OrderChange, xid: int, lsn: int) -> events.OrderChange:
        note: events.Note = "none"
        if change.op == "u":  # Debezium never resolves a placeholder from the old row
            note = "unchanged" if change.note_unavailable else "value"
        # The values of the row, to tell a redelivered copy from a change that differs.
        values = fingerprint(change.customer_id, change.amount) ^ zlib.crc32(
            f"{change.status}|{change.updated_at}".encode()
        )
        return events.OrderChange(
            "u" if change.op == "u" else "d",
            change.order_id,
            xid,
            lsn,
            change.status if change.op == "u" else None,
            "row" if change.before == "row" else "key",
            note,
            self.identity,
            None,
            values,
        )

    def _give(self, delete: events.OrderChange, *, tombstone: bool) -> None:
        self.fold.order_change(replace(delete, tombstone=tombstone))

    def _again(self, xid: int, change: OrderChange) -> None:
        """A change of a transaction whose batch was judged: a duplicate when the ledger
        accounts for it, else a violation amending the verdict."""
        batch = self.judged[xid]
        what = f"{_WHAT[change.op]} of order {change.order_id}"
        reason = None
        lsn = change.lsn or 0
        if batch is None:
            reason = f"{what} again, in transaction xid {xid} no batch of the ledger ran"
        else:
            ids = batch.updated_ids if change.op == "u" else batch.deleted_ids
            if ids is None or change.order_id not in ids:
                reason = f"{what} arrived after its verdict; the batch did not make it"
            elif change.op == "u" and change.status != updated_status(change.order_id):
                reason = f"{what} arrived again with status {change.status!r} after its verdict"
            elif (
                batch.start_lsn is not None
                and batch.end_lsn is not None
                and not (batch.start_lsn < lsn <= batch.end_lsn)
            ):
                reason = f"{what} arrived again outside its bracket after its verdict"
        if reason is None:
            self.duplicates += 1
        else:
            batch_id = None if batch is None else batch.batch_id
            self.amendments.append(Violation(batch_id, f"{reason} (transaction xid {xid})"))

    # --- judging --------------------------------------------------------------------------

    @property
    def xids(self) -> set[int]:
        """The transactions with changes held."""
        return set(self._held)

    def whole(self, batch: LedgerBatch) -> bool:
        """Every update and delete of the batch arrived, each delete with its tombstone."""
        if not (batch.updated or batch.deleted):
            return True
        if batch.xid is None:
            return False
        xid = batch.xid & XID_MASK
        held = self._held.get(xid)
        if held is None or len(held.ids) < batch.updated + batch.deleted:
            return False
        return all(d.xid != xid for d in self._awaiting.values())

    def unclaimed(self, batches: Iterable[LedgerBatch]) -> set[int]:
        """The transactions held that none of these batches ran: the runner asks the
        database which of them belong to batches judged before (`learn`)."""
        return self.xids - {b.xid & XID_MASK for b in batches if b.xid is not None}

    def orphans(self, known: set[int], candidates: list[LedgerBatch], complete: bool) -> None:
        """Changes of transactions no batch ran (none of `known`) become stream violations
        once the candidates cover them: every unjudged batch, or those starting past them."""
        top = None if complete else max((b.start_lsn or 0 for b in candidates), default=None)
        for xid in sorted(self.xids - known):
            if top is None or self._held[xid].low_lsn < top:
                self.orphan(xid)

    def take(self, xid: int, batch: LedgerBatch | None) -> events.ChangeObservation | None:
        """The batch's (or a batch id the ledger lacks) updates and deletes, forgetting them;
        deletes still awaiting a tombstone have none. Later copies are redeliveries."""
        self._settle(xid)
        self._forget(xid)
        self.judged[xid] = batch
        return self.fold.take_changes(xid, None if batch is None else batch.batch_id)

    def orphan(self, xid: int) -> None:
        """The changes of a transaction no batch of the ledger ran: stream violations."""
        self._settle(xid)
        self._forget(xid)
        self.judged[xid] = None
        self.fold.orphan(xid)

    def learn(self, judged: dict[int, LedgerBatch | None]) -> None:
        """Transactions whose batches an earlier run judged."""
        self.judged.update(judged)

    def take_counts(self) -> tuple[int, list[Violation]]:
        """(duplicates, amendments) since the last call."""
        done = self.duplicates, self.amendments
        self.duplicates, self.amendments = 0, []
        return done

    def _settle(self, xid: int) -> None:
        for tp, delete in list(self._awaiting.items()):
            if delete.xid == xid:
                del self._awaiting[tp]
                self._give(delete, tombstone=False)

    def _forget(self, xid: int) -> None:
        self._held.pop(xid, None)
        for firsts in self.firsts.values():
            firsts.pop(xid, None)
