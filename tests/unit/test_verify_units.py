"""verify's pure parts: folding pgoutput into per-batch summaries, and the verdict reasons."""

from __future__ import annotations

import struct

import pytest

from cdcfeed.proof.events import LedgerBatch, Observation
from cdcfeed.proof.judge import reasons_against
from cdcfeed.proof.sources.slot import StreamError, StreamReader

ORDERS = ("public", "orders")
ORDERS_ID, LEDGER_ID = 16400, 16410


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _tuple(*values: str | None) -> bytes:
    out = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        else:
            out.append(b"t" + struct.pack("!i", len(value.encode())) + value.encode())
    return b"".join(out)


def relation(relation_id: int, name: str, *columns: str) -> bytes:
    body = b"".join(b"\x00" + _cstr(c) + struct.pack("!Ii", 20, -1) for c in columns)
    header = struct.pack("!I", relation_id) + _cstr("public") + _cstr(name)
    return b"R" + header + struct.pack("!BH", ord("d"), len(columns)) + body


def begin(xid: int, final_lsn: int = 0) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, 0, xid)


def commit(lsn: int, end: int) -> bytes:
    return b"C" + struct.pack("!BQQq", 0, lsn, end, 0)


def insert(order_id: int, batch_id: int, relation_id: int = ORDERS_ID) -> bytes:
    values = _tuple(str(order_id), str(batch_id), "1", "10.00", "2026-01-01")
    return b"I" + struct.pack("!IB", relation_id, ord("N")) + values


def delete(order_id: int) -> bytes:
    return b"D" + struct.pack("!IB", ORDERS_ID, ord("K")) + _tuple(str(order_id), *[None] * 4)


def truncate(*relation_ids: int) -> bytes:
    ids = struct.pack(f"!{len(relation_ids)}I", *relation_ids)
    return b"T" + struct.pack("!IB", len(relation_ids), 0) + ids


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
        b"I" + struct.pack("!IB", LEDGER_ID, ord("N")) + _tuple("7", "COMPLETED"),
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
