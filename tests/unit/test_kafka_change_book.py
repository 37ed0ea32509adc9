"""The Kafka verifier's updates and deletes across restarts, replica identity switches and
deadlines: changes of batches an earlier run judged, what is remembered of judged
transactions, the identity a change is held to, and a delete whose tombstone may come next.
Debezium's JSON as the decoder reads it (test_kafka_changes)."""

from __future__ import annotations

import pytest

from cdcfeed.proof.events import LedgerBatch, OrderChange
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.held import Changes
from cdcfeed.proof.kafka import changes as changes_module
from cdcfeed.proof.kafka.changes import ChangeBook
from cdcfeed.proof.kafka.debezium import DebeziumDecoder
from cdcfeed.proof.kafka.debezium import OrderChange as Decoded
from cdcfeed.proof.kafka.redelivery import JudgedBatch
from tests.unit.test_kafka_changes import BATCH_8, LATER, MIXED, XID, change, feed, key, mixed_topic
from tests.unit.test_kafka_delivery import NOW, ORDERS, Rec, candidate, delivery, order

TP = (ORDERS, 0)


def decoded(op: str, order_id: int, **options: object) -> Decoded:
    (found,) = DebeziumDecoder().decode_orders([change(op, order_id, **options)], ORDERS)  # type: ignore[arg-type]
    assert isinstance(found, Decoded)
    return found


# --- changes of batches an earlier run judged -----------------------------------------------


def test_a_change_read_again_of_a_batch_judged_before_is_dropped() -> None:
    fold = Fold()
    book = ChangeBook(fold)
    book.change(TP, 0, -1, decoded("u", 1), new=False)
    book.learn({XID: MIXED})
    book.orphans(set(), [], True)
    assert fold.events == [], fold.events
    assert book.take_counts() == (0, [])
    assert book.xids == set() and book.firsts[TP] == {}
    assert XID in book.judged and book.judged[XID] is not None


def test_a_change_redelivered_of_a_batch_judged_before_is_a_duplicate_unless_it_differs() -> None:
    fold = Fold()
    book = ChangeBook(fold)
    book.change(TP, 10, -1, decoded("u", 1), new=True)
    book.change(TP, 11, 750, decoded("d", 2), new=True)  # awaiting its tombstone
    book.change(TP, 12, 750, decoded("u", 10, status="created"), new=True)
    book.learn({XID: MIXED})
    book.orphans(set(), [], True)
    assert fold.events == []
    duplicates, (amendment,) = book.take_counts()
    assert duplicates == 2
    assert amendment.batch_id == 7 and "'created'" in amendment.reason, amendment
    assert book.xids == set()


async def test_after_a_restart_the_changes_of_a_batch_judged_before_are_no_violation() -> None:
    d = delivery()
    d.resume([(ORDERS, 0, 10, None)], 600)  # the earlier run judged batch 7, read up to 10

    async def judged_before(ids: set[int]) -> dict[int, JudgedBatch]:
        return {7: JudgedBatch(MIXED, 2)} if 7 in ids else {}

    records = mixed_topic()
    recs = [Rec(i, 1_000, value, k) for i, (value, k) in enumerate(records)]
    await d.feed(ORDERS, 0, recs, judged_before, NOW)
    assert set(d.unclaimed([])) == {XID}  # the runner looks it up...
    d.changes.learn({XID: MIXED})  # ...and finds it judged
    j = d.judge([], NOW, ORDERS, complete=True)
    assert (j.verdicts, j.events, j.amendments, j.duplicates) == ([], [], [], 0), j
    assert d.commit_offsets()[TP] == len(records)
    # Debezium delivering them again later: duplicates, as in the run that judged them.
    again = [(change("u", 1), key(1)), (change("d", 2), key(2)), (None, key(2))]
    await feed(d, again, first=20)
    j = d.judge([], NOW, ORDERS, complete=True)
    assert (j.events, j.amendments, j.duplicates) == ([], [], 2), j


# --- what is remembered of judged transactions ----------------------------------------------


async def test_an_insert_only_batch_leaves_no_transaction_remembered() -> None:
    d = delivery()
    insert_only = LedgerBatch(9, "COMPLETED", 1, 40, 700, 800, 777)
    await feed(d, [(order(40, 9, 777, 750), key(40)), LATER])
    (verdict,) = d.judge([candidate(insert_only), candidate(BATCH_8)], NOW, ORDERS).verdicts
    assert verdict.reason is None, verdict
    assert 777 not in d.changes.judged


def test_the_judged_transactions_remembered_are_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(changes_module, "_MAX_JUDGED", 2, raising=False)
    book = ChangeBook(Fold())
    for xid in range(1, 6):
        book.learn({xid: MIXED})
        book.take_counts()
    assert sorted(book.judged) == [4, 5]


# --- the replica identity a change is held to -----------------------------------------------


def test_a_copy_read_across_an_identity_switch_is_a_duplicate() -> None:
    held = Changes(XID)
    first = OrderChange("u", 1, XID, 750, "paid", "none", identity="d")
    assert held.add(first) is False
    assert held.add(OrderChange("u", 1, XID, 750, "paid", "none", identity="f")) is True
    assert held.twice == set() and held.duplicates == 1
    assert held.identity == "d"  # the laxer of the two stands


async def test_full_holds_only_the_changes_after_the_switch_was_read() -> None:
    d = delivery()
    d.changes.read_identity("d", 0)
    d.changes.read_identity("f", 820)  # ALTER TABLE ... FULL between batch 7 (..800) and the read
    late = LedgerBatch(9, "COMPLETED", 0, 50, 830, 880, 603, 0, 1, None, (3,))
    later = [(change("d", 3, xid=603, lsn=850), key(3)), (None, key(3))]
    await feed(d, [*mixed_topic(), *later, LATER])
    j = d.judge([candidate(MIXED), candidate(late), candidate(BATCH_8)], NOW, ORDERS)
    verdicts = {v.batch_id: v.reason for v in j.verdicts}
    assert verdicts[7] is None, verdicts  # its key-only delete was written under DEFAULT
    assert verdicts[9] is not None and "carry the key only" in verdicts[9], verdicts


async def test_changes_held_across_a_switch_to_default_are_held_to_default() -> None:
    d = delivery()
    d.changes.read_identity("f", 500)
    await feed(d, [*mixed_topic(), LATER])  # batch 7, 700..800: written under DEFAULT
    d.changes.read_identity("d", 1_000)  # ALTER TABLE ... DEFAULT, read after they were
    j = d.judge([candidate(MIXED), candidate(BATCH_8)], NOW, ORDERS)
    verdicts = {v.batch_id: v.reason for v in j.verdicts}
    assert verdicts[7] is None, verdicts  # key-only before images and placeholders: DEFAULT's


# --- a delete whose tombstone may come next ----------------------------------------------------


async def test_a_batch_whose_delete_awaits_its_tombstone_is_pending_until_due() -> None:
    d = delivery(due_after=30)
    records = mixed_topic()
    await feed(d, records[:-1])  # the delete is the last record read on its partition
    due_soon = candidate(MIXED, NOW - 10)
    j = d.judge([due_soon], NOW, ORDERS, deadlines=True)
    assert (j.verdicts, j.pending) == ([], 1), j
    await feed(d, records[-1:], first=len(records) - 1)
    (verdict,) = d.judge([due_soon], NOW, ORDERS, deadlines=True).verdicts
    assert verdict.reason is None, verdict


async def test_a_tombstone_still_missing_when_its_batch_is_due_is_a_violation() -> None:
    d = delivery(due_after=30)
    records = mixed_topic()
    await feed(d, records[:-1])  # the tombstone never comes
    (verdict,) = d.judge([candidate(MIXED, NOW - 1_000)], NOW, ORDERS, deadlines=True).verdicts
    assert verdict.reason is not None and "missing tombstone" in verdict.reason, verdict
