"""proof.fold and the change mix: updates and deletes kept per transaction until their batch is
known, then handed out as one summary per transaction."""

from __future__ import annotations

from typing import Any

from cdcfeed.proof.events import ChangeObservation, OrderChange, TransactionEnd
from cdcfeed.proof.fold import Fold
from tests.unit.test_fold import orders


def update(order_id: int, xid: int = 700, status: str = "paid", **kw: Any) -> OrderChange:
    return OrderChange("u", order_id, xid, 0x180, status, **{"before": "key", **kw})


def delete(order_id: int, xid: int = 700, **kw: Any) -> OrderChange:
    return OrderChange("d", order_id, xid, 0x180, None, **{"before": "key", **kw})


def test_a_transactions_changes_become_ranges_per_status_and_op() -> None:
    f = Fold()
    for change in (update(3), update(1), update(2), update(10, status="cancelled"), delete(5)):
        f.order_change(change)
    f.order_change(delete(6, note="none"))
    f.order_change(update(40, xid=701))
    assert sorted(f.change_xids) == [700, 701]
    c = f.take_changes(700, 7)
    assert c is not None
    assert c.statuses == (("cancelled", ((10, 10),)), ("paid", ((1, 3),)))
    assert (c.updated, c.deleted, c.updates, c.deletes) == (((1, 3), (10, 10)), ((5, 6),), 4, 2)
    assert (c.batch_id, c.xid, c.commit_lsn, c.commit_end_lsn) == (7, 700, 0x180, 0x180)
    assert c.key_only == ((1, 3), (5, 6), (10, 10))
    assert f.take_changes(700, 7) is None
    assert f.change_xids == [701]


def test_toast_before_images_and_tombstones_are_counted() -> None:
    f = Fold()
    f.order_change(update(1, note="unchanged", identity="f"))
    f.order_change(update(2, note="resolved", before="row", identity="f"))
    f.order_change(update(3, note="value", before="row", identity="f"))
    f.order_change(delete(4, tombstone=False, identity="f"))
    f.order_change(delete(5, tombstone=True, before="row", identity="f"))
    c = f.take_changes(700, 7)
    assert c is not None
    assert (c.unchanged_toast, c.resolved_toast, c.identity) == (1, 1, "f")
    assert (c.key_only, c.missing_tombstones) == (((1, 1), (4, 4)), ((4, 4),))


def test_a_copy_is_a_duplicate_and_another_change_of_the_same_order_is_named() -> None:
    f = Fold()
    f.order_change(update(1))
    f.order_change(update(1))
    f.order_change(update(2))
    f.order_change(delete(2))
    c = f.take_changes(700, 7)
    assert c is not None
    assert (c.duplicates, f.duplicates, c.twice, c.updated) == (1, 1, ((2, 2),), ((1, 2),))


def test_the_end_of_the_transaction_places_its_changes() -> None:
    f = Fold()
    f.change(orders(1))
    f.order_change(update(9))
    f.end(TransactionEnd(700, 0x190, 0x1A0, declared_orders=2, declared_ledger=2))
    (o,) = f.take(7)
    assert o.declared_rows == 2
    # The inserts taken first leave the end to the changes of the same transaction.
    c = f.take_changes(700, 7)
    assert c is not None
    assert (c.commit_lsn, c.commit_end_lsn, c.declared_rows, c.declared_ledger_rows) == (
        0x190,
        0x1A0,
        2,
        2,
    )


def test_changes_of_a_transaction_no_batch_ran_are_stream_events() -> None:
    f = Fold()
    f.order_change(update(5))
    f.order_change(delete(6))
    f.orphan(700)
    assert [(e.batch_id, e.reason) for e in f.events] == [
        (None, "UPDATE of order 5; no batch of the ledger ran it (transaction xid 700, LSN 0/180)"),
        (None, "DELETE of order 6; no batch of the ledger ran it (transaction xid 700, LSN 0/180)"),
    ]
    assert f.change_xids == []
    f.orphan(700)  # nothing held: nothing more
    assert len(f.events) == 2


def test_transactional_a_claimed_transactions_changes_are_its_batchs() -> None:
    f = Fold(transactional=True)
    f.change(orders(1))
    f.order_change(update(9))
    f.order_change(delete(8))
    f.claim(700, 7)
    f.end(TransactionEnd(700, 0x190, 0x1A0))
    f.flush()
    assert f.events == []
    assert f.changes == [
        ChangeObservation(
            7,
            700,
            0x190,
            0x1A0,
            statuses=(("paid", ((9, 9),)),),
            deleted=((8, 8),),
            key_only=((8, 9),),
        )
    ]
    assert [o.batch_id for o in f.observations] == [7]


def test_transactional_unclaimed_changes_are_events_in_arrival_order() -> None:
    f = Fold(transactional=True)
    f.order_change(delete(42, xid=5))
    f.change(orders(1, xid=5))
    f.end(TransactionEnd(5, 0x500, 0x530))
    f.flush()
    assert f.changes == []
    assert [e.reason for e in f.events] == [
        "DELETE of order 42; no batch of the ledger ran it (transaction xid 5, commit 0/500)"
    ]
    # A discarded transaction (recorded by an earlier read) leaves nothing behind.
    f.order_change(update(1, xid=6))
    f.claim(6, 9)
    f.discard()
    f.flush()
    assert (len(f.changes), len(f.events)) == (0, 1)
