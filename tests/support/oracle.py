"""What the tests check: the ledger's invariant (README), from the ledger and from a pgoutput slot.

The oracle shares no code with `cdcfeed.proof`: it decodes the stream itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from tests.support.product import lsn_to_int, pgoutput
from tests.support.settings import create_schema

PUBLICATION = "cdcfeed_test"


async def prepare_slot(dsn: str, slot: str = "test_slot", before_slot: str = "") -> str:
    """Schema, a publication over the cdcfeed tables, and a pgoutput slot made before the load.

    `before_slot` is SQL run once the schema exists but before the slot, so the stream
    does not see it.
    """
    await create_schema(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        if before_slot:
            await conn.execute(before_slot)
        await conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE orders, batch_control")
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", slot)
    finally:
        await conn.close()
    return slot


@dataclass(frozen=True)
class Change:
    """An update or delete of an order as pgoutput sent it: the order id, the new tuple (an
    update's; None for a delete) and the old one (None when none was sent), as column ->
    value, with `UNCHANGED` for a TOASTed value the tuple does not carry (kind 'u'), and the
    old tuple's kind ('K' key only, 'O' the whole old row)."""

    order_id: int
    new: dict[str, object] | None
    old: dict[str, object] | None
    old_kind: str | None


@dataclass
class Transaction:
    xid: int
    commit_lsn: int = 0
    end_lsn: int = 0
    orders: list[tuple[int, int]] = field(default_factory=list)  # (order_id, batch_id)
    updates: list[Change] = field(default_factory=list)
    deletes: list[Change] = field(default_factory=list)


async def read_stream(dsn: str, slot: str = "test_slot") -> list[Transaction]:
    """Every committed transaction the slot holds, decoded from pgoutput."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT data FROM pg_logical_slot_get_binary_changes($1, NULL, NULL, "
            "'proto_version', '1', 'publication_names', $2)",
            slot,
            PUBLICATION,
        )
    finally:
        await conn.close()
    relations: dict[int, pgoutput.Relation] = {}
    transactions: list[Transaction] = []
    current: Transaction | None = None
    for row in rows:
        message = pgoutput.decode(row["data"])
        if isinstance(message, pgoutput.Relation):
            relations[message.relation_id] = message
        elif isinstance(message, pgoutput.Begin):
            current = Transaction(xid=message.xid)
        elif isinstance(message, pgoutput.Insert):
            assert current is not None
            relation = relations[message.relation_id]
            if relation.name == "orders":
                values = relation.as_dict(message.new)
                current.orders.append((int(str(values["order_id"])), int(str(values["batch_id"]))))
        elif isinstance(message, pgoutput.Update | pgoutput.Delete):
            assert current is not None
            relation = relations[message.relation_id]
            if relation.name == "orders":
                old = None if message.old is None else relation.as_dict(message.old)
                if isinstance(message, pgoutput.Update):
                    new = relation.as_dict(message.new)
                    key = new["order_id"]
                    current.updates.append(Change(int(str(key)), new, old, message.old_kind))
                else:
                    assert old is not None
                    key = old["order_id"]
                    current.deletes.append(Change(int(str(key)), None, old, message.old_kind))
        elif isinstance(message, pgoutput.Commit):
            assert current is not None
            current.commit_lsn, current.end_lsn = message.commit_lsn, message.end_lsn
            transactions.append(current)
            current = None
    return transactions


async def ledger_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(
            "SELECT batch_id, status, row_count, first_order_id, start_lsn::text, "
            "end_lsn::text, xid::text, instance, error FROM batch_control ORDER BY batch_id"
        )
    finally:
        await conn.close()


async def check_invariant(dsn: str, stream: list[Transaction] | None = None) -> dict[str, int]:
    """Asserts the invariant for every batch in the ledger; returns counts by status.

    Ledger side: COMPLETED batches hold exactly row_count orders, FAILED none, nothing is
    IN_PROGRESS, no order belongs to a batch that is not COMPLETED. Stream side (when given):
    each COMPLETED batch arrived whole in one transaction whose xid is the ledger's and whose
    commit lies inside (start_lsn, end_lsn]; no FAILED batch's rows arrived.
    """
    ledger = await ledger_rows(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        counts = {
            r[0]: r[1]
            for r in await conn.fetch("SELECT batch_id, count(*) FROM orders GROUP BY batch_id")
        }
    finally:
        await conn.close()
    by_status: dict[str, int] = defaultdict(int)
    completed = {}
    for batch in ledger:
        by_status[batch["status"]] += 1
        assert batch["status"] != "IN_PROGRESS", f"batch {batch['batch_id']} is IN_PROGRESS"
        present = counts.pop(batch["batch_id"], 0)
        if batch["status"] == "COMPLETED":
            assert present == batch["row_count"], (batch["batch_id"], present, batch["row_count"])
            assert lsn_to_int(batch["end_lsn"]) > lsn_to_int(batch["start_lsn"])
            completed[batch["batch_id"]] = batch
        else:
            assert present == 0, f"FAILED batch {batch['batch_id']} left {present} rows"
    assert not counts, f"orders of batches the ledger lacks: {counts}"

    if stream is not None:
        seen: dict[int, Transaction] = {}
        for tx in stream:
            batch_ids = {batch_id for _, batch_id in tx.orders}
            if not batch_ids:
                continue
            assert len(batch_ids) == 1, f"one transaction held batches {batch_ids}"
            (batch_id,) = batch_ids
            assert batch_id in completed, f"rows of non-COMPLETED batch {batch_id} streamed"
            assert batch_id not in seen, f"batch {batch_id} arrived in two transactions"
            seen[batch_id] = tx
        for batch_id, batch in completed.items():
            tx = seen.get(batch_id)
            assert tx is not None, f"COMPLETED batch {batch_id} never reached the stream"
            assert len(tx.orders) == batch["row_count"]
            assert tx.xid == int(batch["xid"]) & 0xFFFF_FFFF, (batch_id, tx.xid, batch["xid"])
            start, end = lsn_to_int(batch["start_lsn"]), lsn_to_int(batch["end_lsn"])
            assert start < tx.commit_lsn and tx.end_lsn <= end, (batch_id, batch, tx)
    return dict(by_status)


def _updated_status(order_id: int) -> str:
    # The lifecycle as the model states it, written out here rather than imported.
    return "cancelled" if order_id % 10 == 0 else "paid"


@dataclass
class MixedCounts:
    """What `check_changes` saw: batches by status, orders inserted, updated, deleted by
    COMPLETED batches, and updates whose new tuple left the TOASTed note out (kind 'u')."""

    statuses: dict[str, int]
    inserted: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0
    resolved_from_old: int = 0


async def check_changes(
    dsn: str, stream: list[Transaction] | None = None, *, full: bool = False
) -> MixedCounts:
    """The invariant of a change mix (a load that updates and deletes), for every batch.

    Table side: every order a COMPLETED batch deleted is gone, every order it updated has the
    updated status and an updated_at, every other order its block inserted is there untouched;
    no order was changed twice; FAILED batches left no order and recorded no change; nothing
    is IN_PROGRESS; no order belongs to a batch the ledger lacks. Stream side (when given):
    each COMPLETED batch's inserts, updates and deletes are exactly what the ledger records,
    in the one transaction of its xid, committed inside (start_lsn, end_lsn]; updates carry
    the updated status; old tuples as the replica identity promises (`full`: the whole old
    row, status 'created'; else a delete's key only); no other transaction changes orders.
    """
    conn = await asyncpg.connect(dsn)
    try:
        ledger = await conn.fetch(
            "SELECT batch_id, status, row_count, first_order_id, start_lsn::text, "
            "end_lsn::text, xid::text, updated, deleted, updated_ids, deleted_ids "
            "FROM batch_control ORDER BY batch_id"
        )
        orders = {
            row[0]: row
            for row in await conn.fetch(
                "SELECT order_id, batch_id, status, updated_at FROM orders ORDER BY order_id"
            )
        }
    finally:
        await conn.close()
    counts = MixedCounts(statuses=defaultdict(int))
    changed: set[int] = set()
    expected: dict[int, int] = {}  # order id -> the batch that inserted it
    completed = {}
    for batch in ledger:
        batch_id, status = batch["batch_id"], batch["status"]
        counts.statuses[status] += 1
        assert status != "IN_PROGRESS", f"batch {batch_id} is IN_PROGRESS"
        updated, deleted = list(batch["updated_ids"] or []), list(batch["deleted_ids"] or [])
        assert (len(updated), len(deleted)) == (batch["updated"], batch["deleted"]), batch
        if status != "COMPLETED":
            assert not updated and not deleted, f"FAILED batch {batch_id} recorded changes"
            continue
        completed[batch_id] = batch
        assert updated == sorted(updated) and deleted == sorted(deleted), batch
        assert lsn_to_int(batch["end_lsn"]) > lsn_to_int(batch["start_lsn"])
        for order_id in updated + deleted:
            assert order_id not in changed, f"order {order_id} changed twice"
            changed.add(order_id)
        first = batch["first_order_id"]
        expected.update((i, batch_id) for i in range(first, first + batch["row_count"]))
        counts.inserted += batch["row_count"]
        counts.updated += len(updated)
        counts.deleted += len(deleted)
    updated_ids = {i for b in completed.values() for i in (b["updated_ids"] or [])}
    deleted_ids = {i for b in completed.values() for i in (b["deleted_ids"] or [])}
    for order_id in deleted_ids:
        assert order_id not in orders, f"deleted order {order_id} is still there"
        assert order_id in expected, f"deleted order {order_id} no COMPLETED batch inserted"
    for order_id, batch_id in expected.items():
        if order_id in deleted_ids:
            continue
        row = orders.pop(order_id, None)
        assert row is not None, f"order {order_id} of batch {batch_id} is missing"
        assert row["batch_id"] == batch_id, (order_id, row)
        if order_id in updated_ids:
            assert row["status"] == _updated_status(order_id) and row["updated_at"], row
        else:
            assert row["status"] == "created" and row["updated_at"] is None, row
    assert not orders, f"orders no COMPLETED batch inserted: {sorted(orders)[:10]}"
    if stream is not None:
        _check_stream(stream, completed, counts, full)
    counts.statuses = dict(counts.statuses)
    return counts


def _check_stream(
    stream: list[Transaction], completed: dict[int, Any], counts: MixedCounts, full: bool
) -> None:
    by_xid = {int(batch["xid"]) & 0xFFFF_FFFF: batch for batch in completed.values()}
    seen: set[int] = set()
    for tx in stream:
        if not (tx.orders or tx.updates or tx.deletes):
            continue
        batch = by_xid.get(tx.xid)
        assert batch is not None, f"transaction {tx.xid} changed orders; no COMPLETED batch's"
        batch_id = batch["batch_id"]
        assert batch_id not in seen, f"batch {batch_id} arrived in two transactions"
        seen.add(batch_id)
        first = batch["first_order_id"]
        inserted = sorted(order_id for order_id, _ in tx.orders)
        assert inserted == list(range(first, first + batch["row_count"])), batch_id
        assert {b for _, b in tx.orders} <= {batch_id}, (batch_id, tx.orders[:3])
        assert sorted(c.order_id for c in tx.updates) == list(batch["updated_ids"] or [])
        assert sorted(c.order_id for c in tx.deletes) == list(batch["deleted_ids"] or [])
        for change in tx.updates:
            assert change.new is not None
            assert change.new["status"] == _updated_status(change.order_id), change
            if change.new["note"] is pgoutput.UNCHANGED:
                counts.unchanged_toast += 1
            if full:
                assert change.old_kind == "O" and change.old is not None, change
                assert change.old["status"] == "created", change
                if change.new["note"] is pgoutput.UNCHANGED and isinstance(change.old["note"], str):
                    counts.resolved_from_old += 1
            else:
                assert change.old is None, change  # the key did not change
        for change in tx.deletes:
            assert change.old is not None
            if full:
                assert change.old_kind == "O" and change.old["status"] == "created", change
            else:
                assert change.old_kind == "K", change
        start, end = lsn_to_int(batch["start_lsn"]), lsn_to_int(batch["end_lsn"])
        assert start < tx.commit_lsn and tx.end_lsn <= end, (batch_id, batch, tx.commit_lsn)
    for batch_id, batch in completed.items():
        changes = batch["row_count"] + batch["updated"] + batch["deleted"]
        assert batch_id in seen or not changes, f"batch {batch_id} never reached the stream"
