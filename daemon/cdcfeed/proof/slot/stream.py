"""A pgoutput slot as a source: its messages as change events, folded by `proof.fold`.

The runner peeks the slot's messages in chunks and feeds them here, one at a time; memory
holds the open transaction's per-batch ranges of order ids, never rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from cdcfeed.errors import CdcfeedError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import (
    ChangeEvent,
    Observation,
    Op,
    StreamEvent,
    TransactionEnd,
)
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.slot import pgoutput


class StreamError(CdcfeedError):
    """The slot's change stream is not what pgoutput protocol version 1 sends."""


@dataclass(frozen=True, slots=True)
class _Relation:
    is_orders: bool
    order_id: int = -1  # column positions in the relation's tuples
    batch_id: int = -1


def _int(value: pgoutput.TupleValue, what: str) -> int:
    if isinstance(value, str):
        return int(value)
    raise StreamError(f"{what} arrived as {value!r}, not as text")


def _maybe_int(value: pgoutput.TupleValue) -> int | None:
    return int(value) if isinstance(value, str) else None


class StreamReader:
    """Turns pgoutput messages into change events and folds them, one transaction at a time.

    Transactions committing before `position` were recorded by an earlier read (the slot was
    not advanced past them yet, or was restored to an older position by crash recovery):
    they are decoded, to keep the protocol state right, and dropped.
    """

    def __init__(self, orders: tuple[str, str], position: int) -> None:
        self.orders = orders
        self.position = position
        self.relations: dict[int, _Relation] = {}
        self.fold = Fold(transactional=True)
        self._fold_insert = self.fold.insert
        self.observations: list[Observation] = self.fold.observations
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
                self._change("u", relation, message.new)
        elif isinstance(message, pgoutput.Delete):
            relation = self._relation(message.relation_id)
            if relation.is_orders:
                # The old tuple holds the key only (unless REPLICA IDENTITY FULL): no batch id.
                self._change("d", relation, message.old)
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
        if (message.namespace, message.name) != self.orders:
            return _Relation(False)
        columns = message.column_names
        try:
            return _Relation(True, columns.index("order_id"), columns.index("batch_id"))
        except ValueError:
            raise StreamError(f"orders arrived without order_id and batch_id: {columns}") from None

    def _refuse_insert(self, relation: _Relation, new: pgoutput.TupleData) -> NoReturn:
        if self._xid is None:
            raise StreamError("Insert outside a transaction")
        _int(new[relation.order_id], "order_id")
        _int(new[relation.batch_id], "batch_id")
        raise AssertionError("an insert refused without a reason")

    def _change(self, op: Op, relation: _Relation, row: pgoutput.TupleData) -> None:
        xid = self._open("UPDATE" if op == "u" else "DELETE")
        order_id = _maybe_int(row[relation.order_id])
        batch_id = _maybe_int(row[relation.batch_id])
        self.fold.change(ChangeEvent("orders", op, order_id, batch_id, xid, self._lsn))

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
