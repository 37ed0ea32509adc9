"""The judge's reasons that need what only some sources carry: the order ids as ranges, and the
counts a transaction's END declares."""

from __future__ import annotations

from dataclasses import replace

from cdcfeed.proof.events import LedgerBatch, Observation
from cdcfeed.proof.judge import judge_seen, reasons_against

BATCH = LedgerBatch(7, "COMPLETED", 500, 1, 0x100, 0x200, 700)


def part(*ranges: tuple[int, int], xid: int = 700, **changes: int | None) -> Observation:
    rows = sum(high - low + 1 for low, high in ranges)
    total = sum((low + high) * (high - low + 1) // 2 for low, high in ranges)
    observation = Observation(
        7, 0x180, 0x1B0, xid, rows, ranges[0][0], ranges[-1][1], total, order_ranges=ranges
    )
    return replace(observation, **changes)


def test_the_whole_block_in_ranges_holds() -> None:
    assert reasons_against(7, BATCH, [part((1, 500))], judged_before=False) == []
    # Ranges from two deliveries of overlapping ids merge (a redelivery is no loss).
    halves = [part((1, 300)), part((200, 500), xid=700)]
    assert not any("missing" in r for r in reasons_against(7, BATCH, halves, False))


def test_missing_ids_are_named_as_ranges() -> None:
    verdict = judge_seen(7, BATCH, [part((1, 49), (121, 500))])
    assert verdict.reason == (
        "the stream carried 429 rows, the ledger says 500; missing order ids 50..120 (71 of 500)"
    )


def test_missing_ids_across_transactions_and_at_the_edges() -> None:
    seen = [part((3, 99), (101, 250)), part((251, 498), xid=701, commit_lsn=0x1C0)]
    (missing,) = [r for r in reasons_against(7, BATCH, seen, False) if r.startswith("missing")]
    assert missing == "missing order ids 1..2, 100, 499..500 (5 of 500)"


def test_many_missing_ranges_are_counted_past_the_first_ten() -> None:
    every_other = tuple((i, i) for i in range(1, 501, 2))
    reasons = reasons_against(7, BATCH, [part(*every_other)], False)
    (missing,) = [r for r in reasons if r.startswith("missing")]
    assert missing == (
        "missing order ids 2, 4, 6, 8, 10, 12, 14, 16, 18, 20 and 240 more ranges (250 of 500)"
    )


def test_ids_outside_the_block_are_named() -> None:
    reasons = reasons_against(7, BATCH, [part((1, 500), (601, 610))], False)
    assert "its order ids span 1..610, its block is 1..500" in reasons
    assert "order ids outside its block: 601..610 (10)" in reasons


def test_without_ranges_from_every_transaction_no_ids_are_named() -> None:
    # A stored observation keeps counters only: the judge says what those tell.
    seen = [part((1, 49)), replace(part((121, 500)), order_ranges=())]
    assert not any("missing order ids" in r for r in reasons_against(7, BATCH, seen, False))


def test_the_end_declares_another_count() -> None:
    assert reasons_against(7, BATCH, [part((1, 500), declared_rows=500)], False) == []
    reasons = reasons_against(7, BATCH, [part((1, 500), declared_rows=501)], False)
    assert reasons == ["the transaction END declares 501 orders events, the ledger says 500"]
    ledger = part((1, 500), declared_rows=500, declared_ledger_rows=2)
    assert reasons_against(7, BATCH, [ledger], False) == [
        "the transaction END declares 2 ledger events, not 1"
    ]
    assert reasons_against(7, BATCH, [part((1, 500), declared_ledger_rows=1)], False) == []
