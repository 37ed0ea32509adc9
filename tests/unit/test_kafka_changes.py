"""The Kafka verifier on the change mix: updates and deletes attributed to their batch by
transaction, tombstones matched to their deletes, TOAST placeholders counted, redeliveries of
changes told from violations. Debezium's JSON as the decoder reads it (test_kafka_delivery)."""

from __future__ import annotations

import json
from typing import Any

from cdcfeed.proof.events import LedgerBatch
from cdcfeed.proof.kafka.debezium import UNAVAILABLE
from cdcfeed.proof.kafka.delivery import Delivery
from tests.unit.test_kafka_delivery import (
    NOW,
    ORDERS,
    TX,
    Rec,
    candidate,
    delivery,
    end,
    nothing_judged,
    order,
)

XID = 601
LATER = (order(31, 8, 602, 900), json.dumps({"order_id": 31}).encode())  # moves the pipeline past
BATCH_8 = LedgerBatch(8, "IN_PROGRESS", 1, 31, 850, 950, 602)  # still running: not judged
# Batch 7 inserts 21..22 and, in the same transaction, updates 1 and 10 and deletes 2.
MIXED = LedgerBatch(7, "COMPLETED", 2, 21, 700, 800, XID, 2, 1, (1, 10), (2,))


def change(op: str, order_id: int, *, xid: int = XID, lsn: int = 750, **after: Any) -> bytes:
    """An update (after image: status by the lifecycle unless given) or a delete (key only)."""
    source = {"ts_ms": 0, "snapshot": "false", "txId": xid, "lsn": lsn}
    if op == "d":
        key_only = {"order_id": order_id, "batch_id": 0, "customer_id": 0, "amount": "0.00"}
        payload = {"before": key_only, "after": None}
    else:
        row = {"order_id": order_id, "batch_id": 1, "customer_id": 7, "amount": "1.00",
               "status": "cancelled" if order_id % 10 == 0 else "paid",
               "updated_at": "2026-11-30T08:00:00Z", "note": None, **after}  # fmt: skip
        payload = {"before": None, "after": row}
    return json.dumps({**payload, "source": source, "op": op, "ts_ms": 0}).encode()


def key(order_id: int) -> bytes:
    return json.dumps({"order_id": order_id}).encode()


def mixed_topic(
    *, tombstone: bool = True, **update: Any
) -> list[tuple[bytes | None, bytes | None]]:
    """(value, key) of batch 7's orders records in the order Debezium writes them."""
    records = [
        (order(21, 7, XID, 750), key(21)),
        (order(22, 7, XID, 750), key(22)),
        (change("u", 1, **update), key(1)),
        (change("u", 10), key(10)),
        (change("d", 2), key(2)),
    ]
    if tombstone:
        records.append((None, key(2)))
    return records


async def feed(
    d: Delivery, records: list[tuple[bytes | None, bytes | None]], first: int = 0
) -> None:
    recs = [Rec(first + i, 1_000, value, k) for i, (value, k) in enumerate(records)]
    await d.feed(ORDERS, 0, recs, nothing_judged, NOW)


async def after_the_end(d: Delivery, orders: int = 5) -> None:
    """The transaction's END, and a later transaction's change that moves the pipeline past."""
    await d.feed(TX, 0, [Rec(0, 1_000, end(XID, orders, 2))], nothing_judged, NOW)


async def test_a_mixed_batch_delivered_whole_holds_with_its_counts() -> None:
    d = delivery(transactions=True)
    await feed(d, mixed_topic())
    await after_the_end(d)
    j = d.judge([candidate(MIXED)], NOW, ORDERS)
    (verdict,) = j.verdicts
    assert verdict.reason is None, verdict
    assert (verdict.rows, verdict.updated, verdict.deleted) == (2, 2, 1)
    assert (j.updated, j.deleted, j.unchanged_toast, j.tombstones) == (2, 1, 0, 1)
    assert j.events == [] and j.amendments == []


async def test_a_delete_at_the_end_of_a_fetch_waits_for_its_tombstone() -> None:
    d = delivery(transactions=True)
    records = mixed_topic()
    await feed(d, records[:-1])
    await after_the_end(d)
    # Everything but the tombstone: the batch is not whole yet, so not judged.
    j = d.judge([candidate(MIXED)], NOW, ORDERS)
    assert (j.verdicts, j.pending) == ([], 1)
    assert d.commit_offsets()[(ORDERS, 0)] == 0  # its records are read again after a restart
    await feed(d, records[-1:], first=len(records) - 1)
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is None, verdict


async def test_a_delete_followed_by_anything_but_its_tombstone_misses_it() -> None:
    d = delivery()
    await feed(d, [*mixed_topic(tombstone=False), LATER])
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is not None and "missing tombstone" in verdict.reason, verdict


async def test_a_stale_after_image_is_named() -> None:
    d = delivery()
    await feed(d, [*mixed_topic(status="created"), LATER])
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is not None and "stale after image" in verdict.reason, verdict


async def test_a_delete_the_batch_did_not_make_is_named() -> None:
    d = delivery()
    forged = [(change("d", 5), key(5)), (None, key(5))]
    await feed(d, [*mixed_topic(), *forged, LATER])
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is not None, verdict
    assert "deleted order 5, which it did not delete" in verdict.reason, verdict


async def test_a_dropped_update_is_missing() -> None:
    d = delivery()
    records = [r for r in mixed_topic() if r[1] != key(10)]
    await feed(d, [*records, LATER])
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is not None and "10" in verdict.reason, verdict


async def test_the_toast_placeholder_is_counted_under_default_and_a_violation_under_full() -> None:
    for identity, holds in (("d", True), ("f", False)):
        d = delivery()
        d.changes.identity = identity  # type: ignore[assignment]
        await feed(d, [*mixed_topic(note=UNAVAILABLE), LATER])
        j = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS)
        (verdict,) = j.verdicts
        assert (verdict.reason is None) is holds, (identity, verdict)
        assert j.unchanged_toast == 1


async def test_changes_redelivered_after_the_verdict_are_duplicates_unless_they_differ() -> None:
    d = delivery()
    await feed(d, [*mixed_topic(), LATER])
    (verdict,) = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is None, verdict
    again = [(change("u", 1), key(1)), (change("d", 2), key(2)), (None, key(2))]
    await feed(d, again, first=10)
    j = d.judge([], NOW, ORDERS)
    assert (j.duplicates, j.amendments, j.events) == (2, [], [])
    await feed(d, [(change("u", 10, status="created"), key(10))], first=20)
    (amendment,) = d.judge([], NOW, ORDERS).amendments
    assert amendment.batch_id == 7 and "'created'" in amendment.reason


async def test_changes_of_a_transaction_no_batch_ran_are_stream_violations() -> None:
    d = delivery()
    await feed(d, [(change("u", 1, xid=999, lsn=950), key(1))])
    (event,) = d.judge([candidate(MIXED)], NOW, ORDERS, complete=True).events
    assert event.reason.startswith("UPDATE of order 1; no batch of the ledger ran it"), event
