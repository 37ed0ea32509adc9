"""A pgoutput slot as a source: its messages as change events, folded by `proof.fold`.

The runner peeks the slot's messages in chunks and feeds them here, one at a time; memory
holds the open transaction's per-batch ranges of order ids, never rows, and its updates and
deletes (a batch changes a window of orders, not a block).

Updates and deletes belong to the batch whose ledger row their transaction claimed: the
claim (`UPDATE batch_control SET xid = pg_current_xact_id()`) is a ledger change in the same
transaction, whose new xid is the transaction's own. pgoutput tells what each image carries:
an Update's old tuple is absent or 'K' (key) under REPLICA IDENTITY DEFAULT, 'O' (the whole
old row) under FULL; an unchanged TOASTed value in the new tuple is 'u', and under FULL the
old tuple carries the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from cdcfeed.errors import CdcfeedError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import (
    ChangeEvent,
    ChangeObservation,
    Identity,
    Note,
    Observation,
    OrderChange,
    StreamEvent,
    TransactionEnd,
)
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.slot import pgoutput


class StreamError(CdcfeedError):
    """The slot's change stream is not what pgoutput protocol version 1 sends."""


_XID_MASK = 0xFFFF_FFFF
_IDENTITIES: dict[str, Identity] = {"d": "d", "f": "f", "n": "n", "i": "i"}


@dataclass(frozen=True, slots=True)
class _Relation:
    is_orders: bool
    order_id: int = -1  # column positions in the relation's tuples
    batch_id: int = -1
    status: int = -1  # -1: a table without the column (older than the change mix)
    note: int = -1
    identity: Identity = "d"
    is_ledger: bool = False
    xid: int = -1  # the ledger's


def _int(value: pgoutput.TupleValue, what: str) -> int:
    if isinstance(value, str):
        return int(value)
    raise StreamError(f"{what} arrived as {value!r}, not as text")


class StreamReader:
    """Turns pgoutput messages into change events and folds them, one transaction at a time.

    Transactions committing before `position` were recorded by an earlier read (the slot was
    not advanced past them yet, or was restored to an older position by crash recovery):
    they are decoded, to keep the protocol state right, and dropped.
    """

    def __init__(
        self, orders: tuple[str, str], position: int, ledger: tuple[str, str] | None = None
    ) -> None:
        self.orders = orders
        self.ledger = ledger
        self.position = position
        self.relations: dict[int, _Relation] = {}
        self.fold = Fold(transactional=True)
        self._fold_insert = self.fold.insert
        self.observations: list[Observation] = self.fold.observations
        self.changes: list[ChangeObservation] = self.fold.changes
        self.events: list[StreamEvent] = self.fold.events
        self.messages = 0
        self.last_end = 0
        self._xid: int | None = None
        self._lsn = 0  # the open transaction's commit LSN, as its Begin announces it

    def feed(self, data: bytes) -> None:
        self.messages += 1
        try:
            message = pgoutput.decode(data)
        except pgoutput.PgOutputError as exc:
            raise StreamError(str(exc)) from None
        if type(message) is pgoutput.Insert:  # the hot path: one per row
            relation = self._relation(message.relation_id)
            if relation.is_orders:
                # Inlined, and the fold's fast path: no call, no ChangeEvent, for each row.
                xid = self._xid
                new = message.new
                order_id = new[relation.order_id]
                batch_id = new[relation.batch_id]
                if xid is None or type(order_id) is not str or type(batch_id) is not str:
                    self._refuse_insert(relation, new)
                self._fold_insert(int(order_id), int(batch_id), xid, self._lsn)
        elif isinstance(message, pgoutput.Begin):
            if self._xid is not None:
                raise StreamError(f"Begin of xid {message.xid} inside xid {self._xid}")
            self._xid = message.xid
            self._lsn = message.final_lsn
        elif isinstance(message, pgoutput.Commit):
            self._commit(message)
        elif isinstance(message, pgoutput.Relation):
            self.relations[message.relation_id] = self._describe(message)
        elif isinstance(message, pgoutput.Update):
            relation = self._relation(message.relation_id)
            if relation.is_orders:
                self._update(relation, message)
            elif relation.is_ledger:
                self._ledger_update(relation, message.new)
        elif isinstance(message, pgoutput.Delete):
            relation = self._relation(message.relation_id)
            if relation.is_orders:
                self._delete(relation, message)
        elif isinstance(message, pgoutput.Truncate) and any(
            self._relation(rid).is_orders for rid in message.relation_ids
        ):
            self.fold.change(
                ChangeEvent("orders", "t", None, None, self._open("TRUNCATE"), self._lsn)
            )
        # Type, Origin and logical messages say nothing about orders.

    def finish(self) -> None:
        if self._xid is not None:
            raise StreamError(f"the stream ended inside transaction xid {self._xid}")

    def _relation(self, relation_id: int) -> _Relation:
        try:
            return self.relations[relation_id]
        except KeyError:
            raise StreamError(f"change for relation {relation_id} before its Relation") from None

    def _describe(self, message: pgoutput.Relation) -> _Relation:
        columns = message.column_names
        if (message.namespace, message.name) == self.ledger:
            if "batch_id" in columns and "xid" in columns:
                return _Relation(
                    False,
                    batch_id=columns.index("batch_id"),
                    is_ledger=True,
                    xid=columns.index("xid"),
                )
            return _Relation(False)
        if (message.namespace, message.name) != self.orders:
            return _Relation(False)
        try:
            order_id, batch_id = columns.index("order_id"), columns.index("batch_id")
        except ValueError:
            raise StreamError(f"orders arrived without order_id and batch_id: {columns}") from None
        return _Relation(
            True,
            order_id,
            batch_id,
            columns.index("status") if "status" in columns else -1,
            columns.index("note") if "note" in columns else -1,
            _IDENTITIES.get(message.replica_identity, "d"),
        )

    def _refuse_insert(self, relation: _Relation, new: pgoutput.TupleData) -> NoReturn:
        if self._xid is None:
            raise StreamError("Insert outside a transaction")
        _int(new[relation.order_id], "order_id")
        _int(new[relation.batch_id], "batch_id")
        raise AssertionError("an insert refused without a reason")

    def _update(self, relation: _Relation, message: pgoutput.Update) -> None:
        xid = self._open("UPDATE")
        new, old = message.new, message.old
        order_id = _int(new[relation.order_id], "an updated order_id")
        status = new[relation.status] if relation.status >= 0 else None
        note: Note = "none"
        if relation.note >= 0:
            value = new[relation.note]
            if value is pgoutput.UNCHANGED:
                # Under FULL the old tuple carries the whole old row, the value included.
                held = old is not None and isinstance(old[relation.note], str)
                note = "resolved" if held else "unchanged"
            elif value is not None:
                note = "value"
        self.fold.order_change(
            OrderChange(
                "u",
                order_id,
                xid,
                self._lsn,
                status if isinstance(status, str) else None,
                "row" if message.old_kind == "O" else "key",
                note,
                relation.identity,
            )
        )

    def _delete(self, relation: _Relation, message: pgoutput.Delete) -> None:
        xid = self._open("DELETE")
        order_id = _int(message.old[relation.order_id], "a deleted order_id")
        self.fold.order_change(
            OrderChange(
                "d",
                order_id,
                xid,
                self._lsn,
                None,
                "row" if message.old_kind == "O" else "key",
                identity=relation.identity,
            )
        )

    def _ledger_update(self, relation: _Relation, new: pgoutput.TupleData) -> None:
        """A ledger row whose new xid is this transaction's own: the batch it claims."""
        xid, batch_id = self._open("UPDATE"), new[relation.batch_id]
        claimed = new[relation.xid]
        if (
            isinstance(claimed, str)
            and isinstance(batch_id, str)
            and int(claimed) & _XID_MASK == xid
        ):
            self.fold.claim(xid, int(batch_id))

    def _open(self, what: str) -> int:
        if self._xid is None:
            raise StreamError(f"{what} of orders outside a transaction")
        return self._xid

    def _commit(self, commit: pgoutput.Commit) -> None:
        xid = self._xid
        if xid is None:
            raise StreamError(f"Commit at {int_to_lsn(commit.commit_lsn)} without a Begin")
        if commit.commit_lsn >= self.position:
            self.fold.end(TransactionEnd(xid, commit.commit_lsn, commit.end_lsn))
            self.fold.flush()
        else:
            self.fold.discard()
        self.last_end = max(self.last_end, commit.end_lsn)
        self._xid = None
