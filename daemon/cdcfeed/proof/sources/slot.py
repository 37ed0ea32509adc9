"""A pgoutput slot as a source: its messages folded into Observations and StreamEvents.

The runner peeks the slot's messages in chunks and feeds them here, one at a time; memory
holds the open transaction's per-batch counters, never rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdcfeed.errors import CdcfeedError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import Observation, StreamEvent
from cdcfeed.proof.sources import pgoutput


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
    """Folds pgoutput messages into per-transaction, per-batch summaries.

    Transactions committing before `position` were recorded by an earlier read (the slot was
    not advanced past them yet, or was restored to an older position by crash recovery):
    they are decoded, to keep the protocol state right, and dropped.
    """

    def __init__(self, orders: tuple[str, str], position: int) -> None:
        self.orders = orders
        self.position = position
        self.relations: dict[int, _Relation] = {}
        self.observations: list[Observation] = []
        self.events: list[StreamEvent] = []
        self.messages = 0
        self.last_end = 0
        self._xid: int | None = None
        # batch id -> [rows, smallest order id, largest order id, sum of order ids]
        self._batches: dict[int, list[int]] = {}
        self._events: list[tuple[int | None, str]] = []

    def feed(self, data: bytes) -> None:
        self.messages += 1
        try:
            message = pgoutput.decode(data)
        except pgoutput.PgOutputError as exc:
            raise StreamError(str(exc)) from None
        if type(message) is pgoutput.Insert:  # the hot path: one per row
            relation = self._relation(message.relation_id)
            if relation.is_orders:
                self._insert(relation, message.new)
        elif isinstance(message, pgoutput.Begin):
            if self._xid is not None:
                raise StreamError(f"Begin of xid {message.xid} inside xid {self._xid}")
            self._xid = message.xid
        elif isinstance(message, pgoutput.Commit):
            self._commit(message)
        elif isinstance(message, pgoutput.Relation):
            self.relations[message.relation_id] = self._describe(message)
        elif isinstance(message, pgoutput.Update):
            if self._relation(message.relation_id).is_orders:
                self._update(message)
        elif isinstance(message, pgoutput.Delete):
            if self._relation(message.relation_id).is_orders:
                self._delete(message)
        elif isinstance(message, pgoutput.Truncate) and any(
            self._relation(rid).is_orders for rid in message.relation_ids
        ):
            self._event(None, "TRUNCATE of orders")
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

    def _insert(self, relation: _Relation, new: pgoutput.TupleData) -> None:
        if self._xid is None:
            raise StreamError("Insert outside a transaction")
        order_id = _int(new[relation.order_id], "order_id")
        batch_id = _int(new[relation.batch_id], "batch_id")
        summary = self._batches.get(batch_id)
        if summary is None:
            self._batches[batch_id] = [1, order_id, order_id, order_id]
            return
        summary[0] += 1
        if order_id < summary[1]:
            summary[1] = order_id
        elif order_id > summary[2]:
            summary[2] = order_id
        summary[3] += order_id

    def _update(self, message: pgoutput.Update) -> None:
        relation = self._relation(message.relation_id)
        order_id = _maybe_int(message.new[relation.order_id])
        batch_id = _maybe_int(message.new[relation.batch_id])
        self._event(batch_id, f"UPDATE of order {order_id}; cdcfeed only inserts orders")

    def _delete(self, message: pgoutput.Delete) -> None:
        relation = self._relation(message.relation_id)
        # The old tuple holds the key only (unless REPLICA IDENTITY FULL): no batch id.
        order_id = _maybe_int(message.old[relation.order_id])
        batch_id = _maybe_int(message.old[relation.batch_id])
        self._event(batch_id, f"DELETE of order {order_id}; cdcfeed never deletes orders")

    def _event(self, batch_id: int | None, what: str) -> None:
        if self._xid is None:
            raise StreamError(f"{what} outside a transaction")
        self._events.append((batch_id, what))

    def _commit(self, commit: pgoutput.Commit) -> None:
        xid = self._xid
        if xid is None:
            raise StreamError(f"Commit at {int_to_lsn(commit.commit_lsn)} without a Begin")
        if commit.commit_lsn >= self.position:
            for batch_id, (rows, low, high, total) in self._batches.items():
                self.observations.append(
                    Observation(
                        batch_id, commit.commit_lsn, commit.end_lsn, xid, rows, low, high, total
                    )
                )
            lsn = int_to_lsn(commit.commit_lsn)
            for event_batch, what in self._events:
                reason = f"{what} (transaction xid {xid}, commit {lsn})"
                self.events.append(StreamEvent(event_batch, xid, commit.commit_lsn, reason))
        self.last_end = max(self.last_end, commit.end_lsn)
        self._xid = None
        self._batches = {}
        self._events = []
