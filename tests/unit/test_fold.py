"""proof.fold: change events from any source folded into what the judge weighs."""

from __future__ import annotations

import pytest

from cdcfeed.proof.events import ChangeEvent, Observation, TransactionEnd
from cdcfeed.proof.fold import Fold
from tests.pgoutput_builders import begin, commit
from tests.unit.test_verify_units import ORDERS_RELATION, insert, read


def orders(
    order_id: int, batch_id: int = 7, xid: int = 700, lsn: int = 0x180, **kw: int
) -> ChangeEvent:
    return ChangeEvent("orders", "c", order_id, batch_id, xid, lsn, **kw)


def fold(*events: ChangeEvent, transactional: bool = False) -> Fold:
    result = Fold(transactional=transactional)
    for event in events:
        result.change(event)
    return result


def test_ids_arriving_out_of_order_merge_into_ranges() -> None:
    f = fold(*(orders(i) for i in (5, 9, 3, 4, 12, 8, 20, 6, 10, 11, 7)))
    (o,) = f.take(7)
    assert o.order_ranges == ((3, 12), (20, 20))
    assert (o.rows, o.min_order_id, o.max_order_id) == (11, 3, 20)
    assert o.sum_order_id == sum(range(3, 13)) + 20
    assert f.take(7) == [] and f.batches == []


def test_lsns_bracket_the_changes_unless_the_end_says_where_the_commit_lies() -> None:
    f = fold(orders(1, lsn=0x300), orders(2, lsn=0x100), orders(3, lsn=0x200))
    assert f.take(7) == [Observation(7, 0x100, 0x300, 700, 3, 1, 3, 6)]
    f = fold(orders(1, lsn=0x300), orders(2, lsn=0x100))
    f.end(TransactionEnd(700, 0x380, 0x3B0))
    assert f.take(7) == [Observation(7, 0x380, 0x3B0, 700, 2, 1, 2, 3)]


def test_one_observation_per_batch_and_transaction() -> None:
    f = fold(orders(1), orders(2, batch_id=8), orders(3, xid=701, lsn=0x400), orders(4))
    assert f.batches == [7, 8]
    first, second = f.take(7)
    assert (first.xid, first.order_ranges, second.xid, second.order_ranges) == (
        700,
        ((1, 1), (4, 4)),
        701,
        ((3, 3),),
    )
    assert [o.order_ranges for o in f.take(8)] == [((2, 2),)]


def test_a_redelivered_copy_is_counted_not_folded() -> None:
    f = fold(*(orders(i, fingerprint=i * 31) for i in (1, 2, 3, 2, 3)))
    (o,) = f.take(7)
    assert (o.rows, o.sum_order_id, o.duplicates, f.duplicates) == (3, 6, 2, 2)
    assert f.events == []
    # Without a fingerprint, the same transaction and LSN make the same delivery.
    f = fold(orders(1), orders(2), orders(1))
    (o,) = f.take(7)
    assert (o.rows, o.duplicates, f.events) == (2, 1, [])


@pytest.mark.parametrize(
    ("again", "expected"),
    [
        (orders(2, fingerprint=99), "with other values"),
        (orders(2, xid=701, fingerprint=62), "first in xid 700, again in xid 701"),
        (orders(2, lsn=0x190, fingerprint=62), "first at LSN 0/180, again at 0/190"),
        (orders(2, xid=701), "first in xid 700, again in xid 701"),
    ],
)
def test_a_copy_that_differs_is_a_stream_event(again: ChangeEvent, expected: str) -> None:
    first = orders(2, fingerprint=62) if again.fingerprint is not None else orders(2)
    f = fold(orders(1, fingerprint=31) if again.fingerprint else orders(1), first, again)
    (event,) = f.events
    assert (event.batch_id, event.xid, event.commit_lsn) == (7, again.xid, again.lsn)
    assert event.reason.startswith("order 2 delivered twice, differently: ")
    assert expected in event.reason, event.reason
    assert f.duplicates == 0
    (o,) = f.take(7)  # the first delivery stands
    assert (o.xid, o.rows, o.order_ranges) == (700, 2, ((1, 2),))


def test_snapshot_reads_and_ledger_changes_are_not_batch_rows() -> None:
    f = fold(
        ChangeEvent("orders", "r", 1, 7, 600, 0x80),
        ChangeEvent("orders", "r", 2, 7, 600, 0x80),
        ChangeEvent("ledger", "u", None, 7, 700, 0x180),
        orders(3),
    )
    assert f.snapshot_rows == 2
    (o,) = f.take(7)
    assert o.order_ranges == ((3, 3),)


def test_changes_cdcfeed_never_makes_are_stream_events() -> None:
    f = fold(
        ChangeEvent("orders", "u", 5, 7, 700, 0x180),
        ChangeEvent("orders", "d", 6, None, 700, 0x180),
        ChangeEvent("orders", "t", None, None, 700, 0x180),
    )
    assert [(e.batch_id, e.reason) for e in f.events] == [
        (7, "UPDATE of order 5; cdcfeed only inserts orders (transaction xid 700, LSN 0/180)"),
        (None, "DELETE of order 6; cdcfeed never deletes orders (transaction xid 700, LSN 0/180)"),
        (None, "TRUNCATE of orders (transaction xid 700, LSN 0/180)"),
    ]
    assert f.batches == []


def test_an_insert_needs_its_order_and_batch_id() -> None:
    with pytest.raises(ValueError, match="lacks its order or batch id"):
        fold(ChangeEvent("orders", "c", 1, None, 700, 0x180))


def test_the_end_declares_per_table_counts() -> None:
    f = fold(orders(1), orders(2), orders(3, batch_id=8, xid=701))
    f.end(TransactionEnd(700, None, None, declared_orders=3, declared_ledger=1))
    (o,) = f.take(7)
    assert (o.declared_rows, o.declared_ledger_rows) == (3, 1)
    assert (o.commit_lsn, o.commit_end_lsn) == (0x180, 0x180)
    (other,) = f.take(8)
    assert (other.declared_rows, other.declared_ledger_rows) == (None, None)


def test_an_end_before_its_changes_still_counts() -> None:
    f = Fold()
    f.end(TransactionEnd(700, None, None, declared_orders=5))
    f.change(orders(1))
    assert [o.declared_rows for o in f.take(7)] == [5]
    f.change(orders(2))  # the end was used up with the batch it declared
    assert [o.declared_rows for o in f.take(7)] == [None]


def test_transactional_flush_and_discard() -> None:
    f = fold(orders(1), ChangeEvent("orders", "d", 9, None, 700, 0), transactional=True)
    assert (f.observations, f.events) == ([], [])
    f.end(TransactionEnd(700, 0x180, 0x1B0))
    f.flush()
    assert f.observations == [Observation(7, 0x180, 0x1B0, 700, 1, 1, 1, 1)]
    assert [e.reason for e in f.events] == [
        "DELETE of order 9; cdcfeed never deletes orders (transaction xid 700, commit 0/180)"
    ]
    assert f.events[0].commit_lsn == 0x180
    f.change(orders(2, xid=701))
    f.change(ChangeEvent("orders", "t", None, None, 701, 0x200))
    f.discard()
    f.flush()
    assert (len(f.observations), len(f.events), f.batches) == (1, 1, [])


def test_the_slot_source_hands_its_ranges_to_the_judge() -> None:
    reader = read(
        begin(700),
        ORDERS_RELATION,
        *(insert(order_id, 7) for order_id in (12, 10, 11, 13, 20)),
        commit(0x100, 0x130),
    )
    (o,) = reader.observations
    assert (o.order_ranges, o.duplicates, o.declared_rows) == (((10, 13), (20, 20)), 0, None)


RUNS = [  # (batch, [(order id, xid, lsn, fingerprint)]) fed in order
    [(7, [(1, 700, 0x300, 1), (2, 700, 0x100, 1), (3, 700, 0x200, 1)])],  # one step
    [(7, [(1, 700, 0x100, 1), (2, 700, 0x100, 1)]), (7, [(3, 700, 0x180, 1)])],  # extends
    [(7, [(5, 700, 0x100, 1), (6, 700, 0x100, 1)]), (7, [(9, 700, 0x180, 2)])],  # a gap
    [(7, [(1, 700, 0x100, 1), (3, 700, 0x100, 1), (2, 700, 0x100, 1)])],  # out of order
    [(7, [(1, 700, 0x100, 1), (2, 701, 0x200, 1)])],  # two transactions
    [(7, [(1, 700, 0x100, 1), (2, 700, 0x100, 1)]), (7, [(2, 700, 0x100, 1)])],  # a copy
    [(7, [(1, 700, 0x100, 1), (2, 700, 0x100, 1)]), (7, [(2, 700, 0x100, 5)])],  # differs
    [(7, [(1, 700, 0x100, 1)]), (8, [(2, 700, 0x100, 1)]), (7, [(3, 700, 0x100, 1)])],
]


@pytest.mark.parametrize("runs", RUNS)
def test_a_run_folds_as_its_rows_one_by_one(runs: list[tuple[int, list[tuple[int, ...]]]]) -> None:
    by_run, by_row = Fold(), Fold()
    for batch_id, rows in runs:
        ids, xids, lsns, fingerprints = (list(column) for column in zip(*rows, strict=True))
        by_run.insert_run(batch_id, ids, xids, lsns, fingerprints)
        for order_id, xid, lsn, fingerprint in rows:
            by_row.insert(order_id, batch_id, xid, lsn, fingerprint)
    assert (by_run.events, by_run.duplicates) == (by_row.events, by_row.duplicates)
    assert by_run.batches == by_row.batches
    for batch_id in by_row.batches:
        assert by_run.take(batch_id) == by_row.take(batch_id)
