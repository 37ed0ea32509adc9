"""The Kafka source's pure part: when a batch is due, what the consumer may commit, and how a
restart reads again what an earlier run read. No broker, no database."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

import pytest

from cdcfeed.proof.events import LedgerBatch
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.kafka.debezium import DebeziumDecoder
from cdcfeed.proof.kafka.delivery import Delivery
from cdcfeed.proof.kafka.digest import Digest, Digests, fingerprint
from cdcfeed.proof.kafka.records import Candidate
from cdcfeed.proof.kafka.redelivery import JudgedBatch

ORDERS = "cdcfeed.public.orders"
TX = "cdcfeed.transaction"
NOW = 1_000_000.0


@dataclass(frozen=True)
class Rec:
    offset: int
    timestamp: int
    value: bytes | None
    key: bytes | None = None


def order(order_id: int, batch_id: int, xid: int, lsn: int, op: str = "c", amount: str = "1.00"):
    row = {"order_id": order_id, "batch_id": batch_id, "customer_id": 7, "amount": amount}
    source = {"ts_ms": 0, "snapshot": "true" if op == "r" else "false", "txId": xid, "lsn": lsn}
    payload = {"before": row if op == "d" else None, "after": None if op == "d" else row}
    return json.dumps({**payload, "source": source, "op": op, "ts_ms": 0}).encode()


def end(xid: int, orders: int, ledger: int = 1) -> bytes:
    collections = [
        {"data_collection": "public.orders", "event_count": orders},
        {"data_collection": "public.batch_control", "event_count": ledger},
    ]
    return json.dumps(
        {"status": "END", "id": f"{xid}:1", "event_count": orders + ledger,
         "data_collections": collections, "ts_ms": 0}
    ).encode()  # fmt: skip


def batch(
    batch_id: int,
    rows: int,
    first: int,
    start: int,
    end_lsn: int,
    xid: int,
    status: str = "COMPLETED",
):
    return LedgerBatch(batch_id, status, rows, first, start, end_lsn, xid)


def candidate(b: LedgerBatch, completed: float | None = NOW - 1) -> Candidate:
    return Candidate(b, completed)


def delivery(partitions: int = 1, transactions: bool = False, due_after: float = 300) -> Delivery:
    d = Delivery(DebeziumDecoder(), transactions=transactions, due_after=due_after)
    d.orders_partitions = set(range(partitions))
    return d


async def nothing_judged(ids: set[int]) -> dict[int, JudgedBatch]:
    return {}


async def feed(
    d: Delivery,
    partition: int,
    values: list[bytes | None],
    first: int = 0,
    topic: str = ORDERS,
    lookup=nothing_judged,
) -> None:
    records = [Rec(first + i, 1_000, v) for i, v in enumerate(values)]
    await d.feed(topic, partition, records, lookup, NOW)


B1 = batch(1, 4, 1, 100, 200, 501)
B2 = batch(2, 2, 5, 300, 400, 502)


async def test_a_partial_batch_is_pending_until_every_partition_moved_past_it() -> None:
    d = delivery(partitions=2)
    await feed(d, 0, [order(1, 1, 501, 150), order(3, 1, 501, 150)])
    await feed(d, 1, [order(2, 1, 501, 150)])
    j = d.judge([candidate(B1)], NOW, ORDERS)
    assert (j.verdicts, j.pending, j.oldest_pending) == ([], 1, 1.0)
    # Partition 0 moves past, partition 1 does not yet: still pending.
    await feed(d, 0, [order(5, 2, 502, 350)], first=2)
    assert d.judge([candidate(B1), candidate(B2)], NOW, ORDERS).pending == 2
    await feed(d, 1, [order(6, 2, 502, 350)], first=1)
    j = d.judge([candidate(B1), candidate(B2)], NOW, ORDERS)
    reasons = {v.batch_id: v.reason for v in j.verdicts}
    assert reasons[2] is None  # whole: judged at once
    assert "missing order ids 4 (1 of 4)" in (reasons[1] or "")
    assert j.pending == 0


async def test_a_batch_without_rows_is_missing_once_the_pipeline_passed_it() -> None:
    d = delivery()
    b3 = batch(3, 10, 20, 420, 450, 503)
    await feed(d, 0, [order(5, 2, 502, 350), order(6, 2, 502, 350)])
    j = d.judge([candidate(B2), candidate(b3)], NOW, ORDERS)
    assert [v.batch_id for v in j.verdicts] == [2] and j.pending == 1
    await feed(d, 0, [order(40, 4, 504, 500)], first=2)
    j = d.judge([candidate(b3), candidate(batch(4, 5, 40, 480, 520, 504))], NOW, ORDERS)
    (verdict,) = j.verdicts
    assert verdict.reason == (
        "missing from the stream: COMPLETED with 10 rows and end_lsn 0/1C2, but every "
        f"partition of {ORDERS} delivered changes past it without its rows"
    )


async def test_the_deadline_and_failed_batches() -> None:
    d = delivery()
    await feed(d, 0, [order(1, 1, 501, 150)])
    late = candidate(B1, completed=NOW - 301)
    # While the verifier reads a backlog, the deadline proves nothing.
    assert d.judge([late], NOW, ORDERS, deadlines=False).pending == 1
    (verdict,) = d.judge([late], NOW, ORDERS).verdicts
    assert "missing order ids 2..4 (3 of 4)" in (verdict.reason or "")
    failed = batch(3, 5, 9, 500, 600, 503, status="FAILED")
    (verdict,) = d.judge([candidate(failed)], NOW, ORDERS).verdicts
    assert verdict.batch_id == 3 and verdict.reason is None
    # Its rows arrive later: the verdict is amended.
    await feed(d, 0, [order(9, 3, 503, 550)], first=1)
    j = d.judge([], NOW, ORDERS)
    (amendment,) = j.amendments
    assert amendment.batch_id == 3 and "FAILED in the ledger" in amendment.reason


async def test_with_transaction_metadata_a_whole_batch_waits_for_its_end() -> None:
    d = delivery(transactions=True)
    b = batch(2, 2, 5, 300, 400, 2**32 + 502)  # the ledger's xid8 carries an epoch
    await feed(d, 0, [order(5, 2, 502, 350), order(6, 2, 502, 350)])
    assert d.judge([candidate(b)], NOW, ORDERS).pending == 1
    await feed(d, 0, [end(502, orders=3)], topic=TX)
    (verdict,) = d.judge([candidate(b)], NOW, ORDERS).verdicts
    assert verdict.reason == "the transaction END declares 3 orders events, the ledger says 2"


async def test_what_is_not_judged_and_what_is_judged_at_once() -> None:
    d = delivery()
    old = batch(1, 4, 1, 10, 20, 500)  # before the first change the topic carried
    running = batch(3, 4, 9, 360, 0, 503, status="IN_PROGRESS")
    await feed(d, 0, [order(5, 2, 502, 350), order(90, 77, 577, 351)])
    j = d.judge([candidate(old), candidate(running, None), candidate(B2)], NOW, ORDERS)
    reasons = {v.batch_id: v.reason for v in j.verdicts}
    assert sorted(reasons) == [77]  # the ledger lacks it
    assert "which the ledger lacks" in (reasons[77] or "")
    assert j.pending == 1  # batch 2 (one row of two); IN_PROGRESS waits uncounted


async def test_commits_hold_at_the_first_record_of_an_unjudged_batch() -> None:
    d = delivery(partitions=2)
    await feed(d, 0, [order(1, 1, 501, 150), order(2, 1, 501, 150), order(5, 2, 502, 350)])
    await feed(d, 1, [order(3, 1, 501, 150)], first=10)
    d.judge([candidate(B1), candidate(B2)], NOW, ORDERS)
    assert d.commit_offsets() == {(ORDERS, 0): 0, (ORDERS, 1): 10}
    await feed(d, 1, [order(4, 1, 501, 150), order(6, 2, 502, 350)], first=11)
    j = d.judge([candidate(B1), candidate(B2)], NOW, ORDERS)
    assert sorted(v.batch_id for v in j.verdicts) == [1, 2]
    assert d.commit_offsets() == {(ORDERS, 0): 3, (ORDERS, 1): 13}
    assert d.positions() == [(ORDERS, 0, 3, 350), (ORDERS, 1, 13, 350)]


async def test_a_restart_refolds_unjudged_batches_only_and_counts_nothing_twice() -> None:
    # The earlier run stored position 5 (with its verdict on batch 1) and read batch 2's first row;
    # it committed offset 3: the first record of unjudged batch 2.
    d = delivery()
    d.resume([(ORDERS, 0, 5, 350)], scope=150)
    judged = {1: JudgedBatch(B1, 4)}

    async def lookup(ids: set[int]) -> dict[int, JudgedBatch]:
        return {i: judged[i] for i in ids if i in judged}

    tombstone = None
    await feed(d, 0, [order(5, 2, 502, 350), tombstone], first=3, lookup=lookup)
    # New records: a copy of batch 1's row 4 (a duplicate), one that differs (a violation),
    # the rest of batch 2 and a copy of its first row.
    await feed(
        d, 0,
        [order(4, 1, 501, 150), order(4, 1, 999, 150), order(6, 2, 502, 350),
         order(5, 2, 502, 350), tombstone],
        first=5, lookup=lookup,
    )  # fmt: skip
    j = d.judge([candidate(B1), candidate(B2)], NOW, ORDERS)
    assert [(v.batch_id, v.rows, v.reason) for v in j.verdicts] == [(2, 2, None)]
    (amendment,) = j.amendments
    assert amendment.batch_id == 1 and "transaction xid 999" in amendment.reason
    assert (j.duplicates, j.tombstones) == (2, 1)  # batch 1's copy, batch 2's copy; new only


async def test_a_copy_that_differs_read_again_is_reported_once() -> None:
    d = delivery()
    await feed(d, 0, [order(5, 2, 502, 350), order(5, 2, 502, 350, amount="9.99")])
    (event,) = d.judge([], NOW, ORDERS).events
    assert "delivered twice, differently" in event.reason
    again = delivery()
    again.resume([(ORDERS, 0, 2, 350)], scope=350)
    await feed(again, 0, [order(5, 2, 502, 350), order(5, 2, 502, 350, amount="9.99")])
    assert again.judge([], NOW, ORDERS).events == []


@pytest.mark.parametrize("op", ["u", "d"])
async def test_changes_cdcfeed_never_makes_are_stream_violations(op: str) -> None:
    d = delivery()
    await feed(d, 0, [order(5, 2, 502, 350, op=op)])
    (event,) = d.judge([], NOW, ORDERS).events
    assert event.reason.startswith("UPDATE of order 5" if op == "u" else "DELETE of order 5")


async def test_snapshot_reads_are_counted_apart() -> None:
    d = delivery()
    await feed(d, 0, [order(1, 1, 501, 90, op="r"), order(2, 1, 501, 90, op="r")])
    j = d.judge([candidate(B1)], NOW, ORDERS)
    assert (j.snapshot_events, j.verdicts, d.scope) == (2, [], 90)


# --- redeliveries after the verdict: the digest of what was delivered ---------------------


def test_a_digest_keeps_each_ids_first_delivery_and_survives_its_bytes() -> None:
    firsts = {
        7: (501, 150, fingerprint(1, Decimal("1.00"))),
        5: (501, 150, 11),
        6: (501, 160, 12),
        9: (502, 160, 13),  # a gap before it, another transaction
    }
    digest = Digest.of(firsts)
    assert (list(digest.lows), list(digest.highs)) == ([5, 9], [7, 9])
    # txId and LSN along the ids: (501, 150), (501, 160), (501, 150), (502, 160).
    assert (list(digest.run_starts), list(digest.run_lsns)) == ([0, 1, 2, 3], [150, 160, 150, 160])
    stored = Digest.from_bytes(digest.to_bytes())
    for d in (digest, stored):
        assert [d.get(i) for i in (4, 5, 6, 7, 8, 9, 10)] == [
            None, (501, 150, 11), (501, 160, 12), firsts[7], None, (502, 160, 13), None,
        ]  # fmt: skip
    with pytest.raises(ValueError):
        Digest.from_bytes(b"nope" + digest.to_bytes()[4:])


def test_fingerprints_are_of_values_and_the_same_in_every_process() -> None:
    assert fingerprint(7, Decimal("1.00")) == fingerprint(7, Decimal("1.0"))
    assert fingerprint(7, Decimal("1.00")) != fingerprint(8, Decimal("1.00"))
    assert fingerprint(7, Decimal("1.00")) != fingerprint(7, Decimal("1.01"))
    # Stored with verdicts: Python's numeric hash is defined by the language, not per process.
    assert fingerprint(7, Decimal("12.34")) == 3_087_092_427
    assert fingerprint(None, None) == fingerprint(None, None) < 2**32


def test_digests_are_kept_for_the_latest_rows_judged() -> None:
    def rows(n: int) -> Digest:
        return Digest.of({i: (1, 1, 0) for i in range(n)})

    kept = Digests(limit=10)
    for batch_id, n in enumerate([4, 4, 4, 4]):
        kept.add(batch_id, rows(n))
    # The latest batches covering the last 10 rows: 1 (partly), 2 and 3.
    assert [kept.get(b) is not None for b in range(4)] == [False, True, True, True]
    kept.add(9, rows(50))  # the latest, whatever its size
    assert len(kept) == 1 and kept.rows == 50


async def _judged_whole(d: Delivery) -> None:
    """Batch 2 (ids 5, 6; xid 502; LSNs 350, 360) delivered whole and judged."""
    await feed(d, 0, [order(5, 2, 502, 350), order(6, 2, 502, 360)])
    j = d.judge([candidate(B2)], NOW, ORDERS)
    assert [(v.batch_id, v.reason) for v in j.verdicts] == [(2, None)]
    ((batch_id, digest),) = j.digests
    assert batch_id == 2 and digest.get(6) == (502, 360, fingerprint(7, Decimal("1.00")))


async def test_after_the_verdict_an_identical_copy_is_a_duplicate_a_differing_one_not() -> None:
    d = delivery()
    await _judged_whole(d)
    await feed(d, 0, [order(5, 2, 502, 350)], first=2)
    j = d.judge([], NOW, ORDERS)
    assert (j.duplicates, j.amendments) == (1, [])
    # Other values, another LSN (still inside the bracket), another txId: each a violation.
    await feed(
        d, 0,
        [order(5, 2, 502, 350, amount="9.99"), order(6, 2, 502, 350), order(5, 2, 777, 350)],
        first=3,
    )  # fmt: skip
    j = d.judge([], NOW, ORDERS)
    (amendment,) = j.amendments
    assert j.duplicates == 0 and amendment.batch_id == 2
    reason = amendment.reason
    after = "delivered twice, differently, after the batch's verdict"
    assert f"order 5 {after}: with other values" in reason
    assert f"order 6 {after}: first at LSN 0/168, again at 0/15E" in reason
    assert "first in xid 502, again in xid 777" in reason


async def test_a_restarted_verifier_tells_copies_apart_by_the_stored_digest() -> None:
    first = delivery()
    await _judged_whole(first)
    stored = first.redeliveries.digests.get(2)
    assert stored is not None
    stored_bytes = stored.to_bytes()

    async def lookup(ids: set[int]) -> dict[int, JudgedBatch]:
        return {2: JudgedBatch(B2, 2, Digest.from_bytes(stored_bytes))} if 2 in ids else {}

    d = delivery()
    d.resume([(ORDERS, 0, 2, 360)], scope=350)
    await feed(
        d, 0, [order(6, 2, 502, 360), order(5, 2, 502, 350, amount="9.99")],
        first=2, lookup=lookup,
    )  # fmt: skip
    j = d.judge([], NOW, ORDERS)
    assert j.duplicates == 1
    (amendment,) = j.amendments
    assert "order 5 delivered twice, differently" in amendment.reason


async def test_past_the_digests_kept_a_copy_is_judged_by_the_ledger_alone() -> None:
    d = Delivery(DebeziumDecoder(), transactions=False, due_after=300, digest_rows=2)
    d.orders_partitions = {0}
    await _judged_whole(d)
    b3 = batch(3, 2, 7, 400, 500, 503)
    await feed(d, 0, [order(7, 3, 503, 450), order(8, 3, 503, 450)], first=2)
    d.judge([candidate(b3)], NOW, ORDERS)
    assert d.redeliveries.digests.get(2) is None  # batch 3's rows filled the two kept
    # Other values, same id, txId and bracket: counted, as the ledger cannot tell.
    await feed(d, 0, [order(5, 2, 502, 350, amount="9.99"), order(5, 2, 502, 450)], first=4)
    j = d.judge([], NOW, ORDERS)
    assert j.duplicates == 1
    (amendment,) = j.amendments  # the LSN outside batch 2's bracket still shows
    assert amendment.batch_id == 2 and "after it was verified" in amendment.reason


# --- restarts: what the stored state proves before the re-read reaches it -----------------


async def test_a_restart_judges_nothing_missing_before_its_re_read_reaches_it() -> None:
    # Run 1: batch 1's rows, a whole batch 2, batch 3's rows, a later change; 1 and 3 are
    # IN_PROGRESS at the step, so the commit holds at batch 1's first record (offset 0).
    w_running = batch(1, 2, 1, 100, 0, 501, status="IN_PROGRESS")
    x_running = batch(3, 2, 9, 500, 0, 503, status="IN_PROGRESS")
    d = delivery()
    await feed(d, 0, [order(1, 1, 501, 150), order(2, 1, 501, 150), order(5, 2, 502, 350),
                      order(6, 2, 502, 350), order(9, 3, 503, 550), order(10, 3, 503, 550),
                      order(90, 77, 577, 900)])  # fmt: skip
    j = d.judge(
        [candidate(w_running, None), candidate(B2), candidate(x_running, None)], NOW, ORDERS
    )
    assert sorted(v.batch_id for v in j.verdicts) == [2, 77]
    commit, stored = d.commit_offsets(), d.positions()
    assert commit == {(ORDERS, 0): 0}
    assert stored == [(ORDERS, 0, 7, None)]  # nothing was read below the committed offset
    # Run 2: the ledger settled 1 and 3 meanwhile; the first step comes after the re-read
    # fetched two records only. Batch 3 is not due: nothing read yet proves it passed.
    judged = {2: JudgedBatch(B2, 2), 77: JudgedBatch(None, 1)}

    async def lookup(ids: set[int]) -> dict[int, JudgedBatch]:
        return {i: judged[i] for i in ids if i in judged}

    w, x = batch(1, 2, 1, 100, 200, 501), batch(3, 2, 9, 500, 600, 503)
    e = delivery()
    e.resume(stored, scope=150)
    await feed(e, 0, [order(1, 1, 501, 150), order(2, 1, 501, 150)], lookup=lookup)
    j = e.judge([candidate(w), candidate(x)], NOW, ORDERS, deadlines=False)
    assert ([(v.batch_id, v.reason) for v in j.verdicts], j.pending) == ([(1, None)], 1)
    rest = [order(5, 2, 502, 350), order(6, 2, 502, 350), order(9, 3, 503, 550),
            order(10, 3, 503, 550), order(90, 77, 577, 900)]  # fmt: skip
    await feed(e, 0, rest, first=2, lookup=lookup)
    j = e.judge([candidate(x)], NOW, ORDERS, deadlines=False)
    assert [(v.batch_id, v.reason) for v in j.verdicts] == [(3, None)]


async def test_the_high_lsn_stored_is_the_one_below_the_committed_offset() -> None:
    d = delivery()
    b3 = batch(3, 2, 9, 500, 600, 503)
    await feed(d, 0, [order(5, 2, 502, 350), order(6, 2, 502, 350), order(9, 3, 503, 550)])
    d.judge([candidate(B2), candidate(b3)], NOW, ORDERS)  # 2 whole; 3 pending, held at 2
    assert (d.commit_offsets(), d.moved_past) == ({(ORDERS, 0): 2}, 550)
    assert d.positions() == [(ORDERS, 0, 3, 350)]  # read to 550, but 350 below offset 2
    e = delivery()
    e.resume(d.positions(), scope=350)
    assert e.moved_past == 350


async def test_the_end_of_an_unjudged_batch_read_before_its_rows_holds_the_commit() -> None:
    # The END of batch 2's transaction (declaring 3 orders events, the ledger says 2) is read
    # before any of its rows, after the END of a transaction that is no batch's.
    b = batch(2, 2, 5, 300, 400, 502)
    d = delivery(transactions=True)
    await feed(d, 0, [end(999, orders=0), end(502, orders=3)], topic=TX)
    await feed(d, 0, [order(1, 1, 501, 150)])  # a row of a batch the ledger lacks: the scope
    assert d.judge([candidate(b)], NOW, ORDERS, complete=True).pending == 1
    assert d.commit_offsets() == {(TX, 0): 1, (ORDERS, 0): 1}
    # A restart reads the END again from the committed offset: the count is checked.
    e = delivery(transactions=True)
    e.resume(d.positions(), scope=150)
    await feed(e, 0, [end(502, orders=3)], first=1, topic=TX)
    await feed(e, 0, [order(5, 2, 502, 350), order(6, 2, 502, 350)], first=1)
    (verdict,) = e.judge([candidate(b)], NOW, ORDERS, complete=True).verdicts
    assert verdict.reason == "the transaction END declares 3 orders events, the ledger says 2"
    assert e.commit_offsets() == {(TX, 0): 2, (ORDERS, 0): 3}  # judged: its END holds no more


async def test_ends_no_unjudged_batch_owns_are_dropped_once_the_candidates_say_so() -> None:
    d = delivery(transactions=True)
    await feed(d, 0, [end(999, orders=0)], topic=TX)
    d.judge([], NOW, ORDERS)  # the candidates may not be all: kept, and held
    assert d.commit_offsets() == {(TX, 0): 0}
    d.judge([], NOW, ORDERS, complete=True)
    assert d.commit_offsets() == {(TX, 0): 1}


async def test_a_fetch_of_inserts_only_folds_as_any_other(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inserts alone take the bulk path; a tombstone among them, the row by row one."""
    rows = [order(i, 1 + (i - 1) // 3, 900 + (i - 1) // 3, 100 + i) for i in range(1, 8)]
    rows += [order(9, 3, 902, 200), order(8, 3, 902, 190), order(9, 3, 902, 200)]
    rows += [order(10, 3, 903, 210), order(2, 1, 900, 102, amount="2.00")]
    bulk, by_row = delivery(), delivery()
    runs: list[int] = []
    insert_run = Fold.insert_run

    def counted(fold: Fold, batch_id: int, *columns: list[int]) -> None:
        runs.append(batch_id)
        insert_run(fold, batch_id, *columns)

    monkeypatch.setattr(Fold, "insert_run", counted)
    await feed(bulk, 0, list(rows))
    assert runs == [1, 2, 3, 1]
    await feed(by_row, 0, [*rows, None])
    assert runs == [1, 2, 3, 1]
    ledger = [
        batch(1, 3, 1, 100, 199, 900),
        batch(2, 3, 4, 100, 199, 901),
        batch(3, 4, 7, 150, 299, 902),
    ]
    judged = [d.judge([candidate(b) for b in ledger], NOW, ORDERS) for d in (bulk, by_row)]
    assert judged[0].tombstones == 0 and judged[1].tombstones == 1
    judged[1].tombstones = 0
    digests = [[(b, digest.to_bytes()) for b, digest in j.digests] for j in judged]
    assert digests[0] == digests[1] and len(digests[0]) == 3
    judged[0].digests = judged[1].digests = []
    assert judged[0] == judged[1]
    assert judged[0].events and judged[0].verdicts
    assert bulk.commit_offsets() == {(ORDERS, 0): 12} and by_row.commit_offsets() == {
        (ORDERS, 0): 13
    }
    assert (bulk.held, bulk.high_lsn, bulk.scope) == (by_row.held, by_row.high_lsn, by_row.scope)
