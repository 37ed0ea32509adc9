"""What the tests check: the ledger's invariant (README), from the ledger and from a pgoutput slot.

The oracle shares no code with `cdcfeed.proof`: it decodes the stream itself.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

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


@dataclass
class Transaction:
    xid: int
    commit_lsn: int = 0
    end_lsn: int = 0
    orders: list[tuple[int, int]] = field(default_factory=list)  # (order_id, batch_id)


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
