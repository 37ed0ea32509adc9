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
A batch judged by an earlier run is only known once the runner looks its transaction up
(`learn`): until then its changes are held like any others; then those read before (below the
stored position) are dropped, being what that run judged, and new ones are redeliveries.

Replica identity. It is read from the database (with the WAL position it was read at) once a
pass; a change is held to the identity of the last read, except that after a read that found
another identity than the read before, changes at or below the position of that read may have
been written under either: they are held to the laxer one (a FULL rule on a change written
under DEFAULT would be a false violation).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import islice

from cdcfeed.lifecycle import updated_status
from cdcfeed.proof import events
from cdcfeed.proof.events import Identity, LedgerBatch, Violation
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.kafka.debezium import OrderChange
from cdcfeed.proof.kafka.digest import fingerprint

TP = tuple[str, int]
XID_MASK = 0xFFFF_FFFF
_WHAT = {"u": "UPDATE", "d": "DELETE"}
# Transactions of judged batches remembered, as Redeliveries' batches: a 32-bit xid comes back
# after wraparound, and a week-long run must not grow with every batch. One forgotten is looked
# up again (`learn`) if its changes come again.
_MAX_JUDGED = 100_000


@dataclass(frozen=True, slots=True)
class _Ran:
    """What tells a redelivered change of a judged batch from one it did not make: its ledger
    row's bracket and changed ids (the tuples are the ledger row's own, not copies)."""

    batch_id: int
    start_lsn: int | None
    end_lsn: int | None
    updated_ids: tuple[int, ...] | None
    deleted_ids: tuple[int, ...] | None

    @classmethod
    def of(cls, batch: LedgerBatch) -> _Ran:
        return cls(
            batch.batch_id, batch.start_lsn, batch.end_lsn, batch.updated_ids, batch.deleted_ids
        )


@dataclass(slots=True)
class _Held:
    """What is known of one transaction's updates and deletes before its batch is judged."""

    ids: set[int]  # the orders it changed (copies counted once)
    low_lsn: int
    high_lsn: int
    # The orders with a copy read for the first time (not below the stored position): if an
    # earlier run judged the batch, these are redeliveries to check (`learn`).
    fresh: set[int] = field(default_factory=set)


class ChangeBook:
    """One verifier's updates and deletes, by transaction, and the deletes awaiting their
    tombstone."""

    def __init__(self, fold: Fold) -> None:
        self.fold = fold
        # The replica identity of orders, read from the database when a pass starts; changes
        # at or below `_mixed_below` are held to `_laxer` (`read_identity`).
        self.identity: Identity = "d"
        self._read = False
        self._mixed_below = -1
        self._laxer: Identity = "d"
        self._held: dict[int, _Held] = {}  # xid -> its changes folded, not yet judged
        # Per partition: the delete its last record was, awaiting the tombstone that must
        # come next (at most one: the tombstone follows its delete at once).
        self._awaiting: dict[TP, events.OrderChange] = {}
        # Per partition: xid -> (its first change's offset, the highest source.lsn before it),
        # to commit no offset past a change of an unjudged transaction.
        self.firsts: dict[TP, dict[int, tuple[int, int]]] = {}
        # xid -> the judged batch it ran (None: no batch), for the transactions with updates
        # or deletes (this run's verdicts, and earlier runs' looked up); trimmed.
        self.judged: dict[int, _Ran | None] = {}
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
        if new:
            held.fresh.add(change.order_id)
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
            self.identity if lsn > self._mixed_below else self._laxer,
            None,
            values,
        )

    def read_identity(self, identity: Identity, at_lsn: int) -> None:
        """The replica identity of orders as read now, at WAL position `at_lsn`."""
        if self._read and identity != self.identity:
            # Written before the read, a change may predate the switch: the laxer identity,
            # for those read from now on and for those held already.
            self._mixed_below = at_lsn
            self._laxer = self.identity if identity == "f" else identity
            self.fold.relax_identity(self._laxer, at_lsn)
            self._awaiting = {
                tp: replace(d, identity=self._laxer) if d.lsn <= at_lsn else d
                for tp, d in self._awaiting.items()
            }
        self._read = True
        self.identity = identity

    def _give(self, delete: events.OrderChange, *, tombstone: bool) -> None:
        self.fold.order_change(replace(delete, tombstone=tombstone))

    def _again(self, xid: int, change: OrderChange | events.OrderChange) -> None:
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
        return not self.awaits_tombstone(xid)

    def awaits_tombstone(self, xid: int) -> bool:
        """A delete of the transaction is the last record read on its partition: its
        tombstone may be the next one, so the batch is not complete yet, however late."""
        return any(d.xid == xid for d in self._awaiting.values())

    def unclaimed(self, batches: Iterable[LedgerBatch]) -> dict[int, int]:
        """The transactions held that none of these batches ran, each with the lowest LSN of
        its changes: the runner asks the database which of them belong to batches judged
        before (`learn`)."""
        claimed = {b.xid & XID_MASK for b in batches if b.xid is not None}
        return {xid: held.low_lsn for xid, held in self._held.items() if xid not in claimed}

    def orphans(self, known: set[int], candidates: list[LedgerBatch], complete: bool) -> None:
        """Changes of transactions no batch ran (none of `known`) become stream violations
        once the candidates cover them: every unjudged batch, or those starting past them."""
        top = None if complete else max((b.start_lsn or 0 for b in candidates), default=None)
        for xid in sorted(self.xids - known - self.judged.keys()):
            if top is None or self._held[xid].low_lsn < top:
                self.orphan(xid)

    def take(self, xid: int, batch: LedgerBatch | None) -> events.ChangeObservation | None:
        """The batch's (or a batch id the ledger lacks) updates and deletes, forgetting them;
        deletes still awaiting a tombstone have none. Later copies are redeliveries."""
        self._settle(xid)
        self._forget(xid)
        changes = self.fold.take_changes(xid, None if batch is None else batch.batch_id)
        if batch is None or changes is not None or batch.updated or batch.deleted:
            # Only a transaction with changes can see them again: an insert-only batch's
            # inserts are Redeliveries' to tell.
            self.judged[xid] = None if batch is None else _Ran.of(batch)
        return changes

    def orphan(self, xid: int) -> None:
        """The changes of a transaction no batch of the ledger ran: stream violations."""
        self._settle(xid)
        self._forget(xid)
        self.judged[xid] = None
        self.fold.orphan(xid)

    def learn(self, judged: dict[int, LedgerBatch]) -> None:
        """Transactions whose batches an earlier run judged. Their changes held are dropped:
        those read before were judged by that run; new ones are redeliveries (`_again`)."""
        for xid, batch in judged.items():
            self.judged[xid] = _Ran.of(batch)
            held = self._held.get(xid)
            if held is None:
                continue
            kept = [d for d in self._awaiting.values() if d.xid == xid]
            self._awaiting = {tp: d for tp, d in self._awaiting.items() if d.xid != xid}
            kept += self.fold.drop_changes(xid)
            self._forget(xid)
            for change in kept:
                if change.order_id in held.fresh:
                    self._again(xid, change)

    def take_counts(self) -> tuple[int, list[Violation]]:
        """(duplicates, amendments) since the last call."""
        done = self.duplicates, self.amendments
        self.duplicates, self.amendments = 0, []
        judged = self.judged
        if len(judged) > 2 * _MAX_JUDGED:  # the oldest are looked up again if redelivered
            for xid in list(islice(judged, len(judged) - _MAX_JUDGED)):
                del judged[xid]
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
