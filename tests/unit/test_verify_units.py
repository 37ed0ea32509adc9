"""verify's pure parts: folding pgoutput into per-batch summaries, the verdict reasons, and the
verdicts the judge gives from them."""

from __future__ import annotations

import struct

import pytest

from cdcfeed.proof.events import LedgerBatch, Observation
from cdcfeed.proof.judge import Verdict, judge_again, judge_seen, judge_unseen, reasons_against
from cdcfeed.proof.slot.stream import StreamError, StreamReader
from tests import pgoutput_builders as pg
from tests.pgoutput_builders import begin, commit, relation, truncate

ORDERS = ("public", "orders")
ORDERS_ID, LEDGER_ID = 16400, 16410


def insert(order_id: int, batch_id: int) -> bytes:
    return pg.insert(ORDERS_ID, str(order_id), str(batch_id), "1", "10.00", "2026-01-01")


def delete(order_id: int) -> bytes:
    return pg.delete(ORDERS_ID, str(order_id), *[None] * 4)


ORDERS_RELATION = relation(
    ORDERS_ID, "orders", "order_id", "batch_id", "customer_id", "amount", "created_at"
)
LEDGER_RELATION = relation(LEDGER_ID, "batch_control", "batch_id", "status")


def read(*messages: bytes, position: int = 0) -> StreamReader:
    reader = StreamReader(ORDERS, position)
    for message in messages:
        reader.feed(message)
    reader.finish()
    return reader


def test_a_transaction_folds_into_one_summary_per_batch() -> None:
    reader = read(
        begin(700),
        ORDERS_RELATION,
        LEDGER_RELATION,
        *(insert(order_id, 7) for order_id in (12, 10, 11, 13)),
        insert(99, 8),
        pg.insert(LEDGER_ID, "7", "COMPLETED"),
        commit(0x100, 0x130),
    )
    assert reader.observations == [
        Observation(7, 0x100, 0x130, 700, 4, 10, 13, 46),
        Observation(8, 0x100, 0x130, 700, 1, 99, 99, 99),
    ]
    assert reader.events == []
    assert reader.last_end == 0x130
    assert reader.messages == 10


def test_transactions_before_the_position_were_recorded_already() -> None:
    reader = read(
        begin(1),
        ORDERS_RELATION,
        insert(1, 1),
        commit(0x100, 0x130),
        begin(2),
        insert(2, 2),
        commit(0x200, 0x230),
        position=0x130,
    )
    assert [o.batch_id for o in reader.observations] == [2]
    assert reader.last_end == 0x230


def test_changes_cdcfeed_never_makes_are_events() -> None:
    reader = read(
        begin(5),
        ORDERS_RELATION,
        LEDGER_RELATION,
        delete(42),
        truncate(LEDGER_ID),
        truncate(LEDGER_ID, ORDERS_ID),
        commit(0x500, 0x530),
    )
    assert [(e.batch_id, e.xid, e.commit_lsn) for e in reader.events] == [
        (None, 5, 0x500),
        (None, 5, 0x500),
    ]
    assert reader.events[0].reason.startswith("DELETE of order 42;")
    assert reader.events[1].reason.startswith("TRUNCATE of orders (transaction xid 5")


@pytest.mark.parametrize(
    "messages",
    [
        [ORDERS_RELATION, insert(1, 1)],  # a change outside a transaction
        [begin(1), insert(1, 1), commit(1, 2)],  # a change before its Relation
        [begin(1), begin(2)],
        [commit(1, 2)],
        [begin(1)],  # the stream ends inside a transaction
        [b"S" + struct.pack("!I", 1)],  # protocol version 2 is refused, not skipped
    ],
)
def test_a_stream_that_is_not_pgoutput_v1_is_an_error(messages: list[bytes]) -> None:
    with pytest.raises(StreamError):
        read(*messages)


BATCH = LedgerBatch(
    batch_id=7,
    status="COMPLETED",
    row_count=4,
    first_order_id=10,
    start_lsn=0x100,
    end_lsn=0x200,
    xid=(3 << 32) | 700,  # xid8 with epoch 3: pgoutput sends the low 32 bits
)


def seen(**changes: int) -> Observation:
    values = dict(
        batch_id=7,
        commit_lsn=0x180,
        commit_end_lsn=0x1B0,
        xid=700,
        rows=4,
        min_order_id=10,
        max_order_id=13,
        sum_order_id=46,
    )
    return Observation(**{**values, **changes})


def test_a_whole_batch_in_its_transaction_and_bracket_holds() -> None:
    assert reasons_against(7, BATCH, [seen()], judged_before=False) == []
    # The commit record may end exactly at end_lsn.
    assert reasons_against(7, BATCH, [seen(commit_end_lsn=0x200)], judged_before=False) == []


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        ([seen(rows=3, max_order_id=12, sum_order_id=33)], "the stream carried 3 rows"),
        ([seen(sum_order_id=45)], "not each id of 10..13 once"),
        ([seen(xid=701)], "transaction xid 701 is not the ledger's xid"),
        ([seen(commit_lsn=0x100)], "lies outside its bracket (0/100, 0/200]"),
        ([seen(commit_end_lsn=0x201)], "lies outside its bracket"),
        (
            [seen(rows=3, max_order_id=12, sum_order_id=33), seen(commit_lsn=0x300, rows=1)],
            "its rows arrived in 2 transactions",
        ),
    ],
)
def test_each_broken_part_of_the_invariant_is_named(
    observations: list[Observation], expected: str
) -> None:
    reasons = reasons_against(7, BATCH, observations, judged_before=False)
    assert any(expected in reason for reason in reasons), reasons


def test_rows_of_failed_unknown_and_verified_batches() -> None:
    failed = LedgerBatch(7, "FAILED", 4, 10, 0x100, None, None)
    assert reasons_against(7, failed, [seen()], judged_before=False) == [
        "FAILED in the ledger, yet 4 of its rows reached the stream (xid 700)"
    ]
    (unknown,) = reasons_against(7, None, [seen()], judged_before=False)
    assert "which the ledger lacks" in unknown
    (later,) = reasons_against(7, BATCH, [seen(rows=1)], judged_before=True)
    assert later.startswith("after it was verified, transaction xid 700")


# --- the judge's verdicts ----------------------------------------------------------------


def test_a_whole_completed_batch_is_ok() -> None:
    verdict = judge_seen(7, BATCH, [seen()])
    assert verdict == Verdict(7, "COMPLETED", 4, 700, 0x180, None)
    assert (verdict.result, verdict.violation) == ("ok", None)


def test_a_broken_completed_batch_is_a_violation_naming_every_reason() -> None:
    observations = [seen(rows=3, max_order_id=12, sum_order_id=33), seen(commit_lsn=0x300, rows=1)]
    verdict = judge_seen(7, BATCH, observations)
    reasons = reasons_against(7, BATCH, observations, judged_before=False)
    assert len(reasons) > 1
    assert (verdict.rows, verdict.xid, verdict.commit_lsn) == (4, 700, 0x180)
    assert verdict.result == "violation"
    assert verdict.violation is not None
    assert verdict.violation.reason == verdict.reason == "; ".join(reasons)


def test_rows_of_a_failed_batch_are_a_violation() -> None:
    failed = LedgerBatch(7, "FAILED", 4, 10, 0x100, None, None)
    verdict = judge_seen(7, failed, [seen()])
    assert (verdict.status, verdict.result) == ("FAILED", "violation")
    assert verdict.reason == "FAILED in the ledger, yet 4 of its rows reached the stream (xid 700)"


def test_rows_with_a_batch_id_the_ledger_lacks_are_a_violation() -> None:
    verdict = judge_seen(9, None, [seen(batch_id=9)])
    assert (verdict.batch_id, verdict.status, verdict.result) == (9, None, "violation")
    assert verdict.reason == "4 orders rows (xid 700) carry this batch id, which the ledger lacks"


def test_a_verdict_on_observed_rows_needs_an_observation() -> None:
    with pytest.raises(ValueError, match="needs an observation"):
        judge_seen(7, BATCH, [])


def test_rows_after_the_verdict_amend_it() -> None:
    amendment = judge_again(7, BATCH, [seen(rows=1, commit_lsn=0x300)])
    assert amendment is not None
    assert amendment.line() == (
        "batch 7: after it was verified, transaction xid 700 (commit 0/300) carried 1 more of "
        "its rows"
    )
    assert judge_again(7, BATCH, []) is None


HINT = "the slot read past it without its transaction (is public.orders in publication pub?)"


def test_a_completed_batch_read_past_without_its_rows_is_missing() -> None:
    verdict = judge_unseen(7, "COMPLETED", 4, 0x200, HINT)
    assert (verdict.status, verdict.rows, verdict.xid, verdict.commit_lsn) == (
        "COMPLETED",
        0,
        None,
        None,
    )
    assert verdict.result == "violation"
    assert verdict.reason == (
        "missing from the stream: COMPLETED with 4 rows and end_lsn 0/200, but the slot read "
        "past it without its transaction (is public.orders in publication pub?)"
    )


def test_a_failed_batch_without_rows_is_ok() -> None:
    verdict = judge_unseen(7, "FAILED", 4, None, HINT)
    assert verdict == Verdict(7, "FAILED", 0, None, None, None)
    assert verdict.violation is None
