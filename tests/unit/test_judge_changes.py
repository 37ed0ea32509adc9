"""The judge and the change mix: a batch's updates and deletes against its ledger row's ids, the
lifecycle, the replica identity's promises and the transaction END's count."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cdcfeed.proof.events import ChangeObservation, LedgerBatch, Observation
from cdcfeed.proof.judge import judge_again, judge_seen, judge_unseen, reasons_against

# Inserted 1..6; updated 21, 22 (paid) and 30 (cancelled); deleted 24 and 25.
BATCH = LedgerBatch(
    7, "COMPLETED", 6, 1, 0x100, 0x200, 700, 3, 2, updated_ids=(21, 22, 30), deleted_ids=(24, 25)
)
INSERTS = Observation(7, 0x180, 0x1B0, 700, 6, 1, 6, 21, order_ranges=((1, 6),))
CHANGES = ChangeObservation(
    7,
    700,
    0x180,
    0x1B0,
    statuses=(("cancelled", ((30, 30),)), ("paid", ((21, 22),))),
    deleted=((24, 25),),
    key_only=((21, 22), (24, 25), (30, 30)),
)


def reasons(*changes: ChangeObservation, batch: LedgerBatch = BATCH) -> list[str]:
    return reasons_against(7, batch, [INSERTS], False, changes)


def test_the_ledgers_changes_exactly_hold() -> None:
    verdict = judge_seen(7, BATCH, [INSERTS], [CHANGES])
    assert verdict.reason is None
    assert (verdict.rows, verdict.updated, verdict.deleted) == (6, 3, 2)


def test_a_dropped_update_and_a_stray_delete_are_named() -> None:
    dropped = replace(CHANGES, statuses=(("cancelled", ((30, 30),)), ("paid", ((21, 21),))))
    assert reasons(dropped) == [
        "the stream carried 2 updates, the ledger says 3",
        "updates missing from the stream: order ids 22 (1 of 3 it updated)",
    ]
    stray = replace(CHANGES, deleted=((23, 25),))
    assert reasons(stray) == [
        "the stream carried 3 deletes, the ledger says 2",
        "deleted order 23, which it did not delete",
    ]
    many = replace(CHANGES, deleted=((24, 29),))
    assert "deleted orders 26..29 (4), which it did not delete" in reasons(many)


def test_a_ledger_id_the_stream_never_changed_is_missing() -> None:
    tampered = replace(BATCH, updated_ids=(21, 22, 30, 40))
    assert reasons(CHANGES, batch=tampered) == [
        "updates missing from the stream: order ids 40 (1 of 4 it updated)"
    ]


def test_a_stale_after_image_is_named() -> None:
    stale = replace(CHANGES, statuses=(("created", ((21, 21),)), ("paid", ((22, 22), (30, 30)))))
    assert reasons(stale) == [
        "stale after image: status 'created', not the one an update gives, for order ids 21 (1)",
        "stale after image: status 'paid', not the one an update gives, for order ids 30 (1)",
    ]


def test_replica_identity_full_promises_the_old_row_and_the_toasted_value() -> None:
    default = replace(CHANGES, unchanged_toast=2)
    assert reasons(default) == []  # what DEFAULT promises: counted, not a violation
    assert judge_seen(7, BATCH, [INSERTS], [default]).unchanged_toast == 2
    full = replace(CHANGES, identity="f", key_only=((24, 25),), unchanged_toast=1)
    assert reasons(full) == [
        "before images of order ids 24..25 (2) carry the key only, though REPLICA IDENTITY "
        "FULL promises the whole old row",
        "1 after images lack the TOASTed note, though REPLICA IDENTITY FULL promises it",
    ]
    resolved = replace(CHANGES, identity="f", key_only=(), resolved_toast=2)
    assert reasons(resolved) == []
    assert judge_seen(7, BATCH, [INSERTS], [resolved]).stored_changes == (3, 2, 0, 2)


def test_tombstones_and_twice_changed_orders() -> None:
    odd = replace(CHANGES, missing_tombstones=((25, 25),), twice=((21, 21),))
    assert reasons(odd) == [
        "transaction xid 700 changed order ids 21 (1) more than once",
        "missing tombstone after the deletes of order ids 25 (1)",
    ]


def test_the_end_declares_inserts_updates_and_deletes_and_two_ledger_events() -> None:
    declared = replace(CHANGES, declared_rows=11, declared_ledger_rows=2)
    assert reasons(declared) == []
    wrong = replace(CHANGES, declared_rows=6, declared_ledger_rows=1)
    assert reasons(wrong) == [
        "the transaction END declares 6 orders events, the ledger says 11",
        "the transaction END declares 1 ledger events, not 2",
    ]


def test_the_transaction_and_its_commit_are_the_ledgers() -> None:
    elsewhere = replace(CHANGES, xid=701, commit_lsn=0x280, commit_end_lsn=0x290)
    assert reasons(elsewhere) == [
        "transaction xid 701 is not the ledger's xid 700 (low 32 bits 700)",
        "commit 0/280 of xid 701 lies outside its bracket (0/100, 0/200]",
    ]
    split = replace(CHANGES, statuses=(), deleted=())
    rest = replace(CHANGES, xid=700, key_only=())
    assert reasons(split, rest)[0] == (
        "its updates and deletes arrived in 2 transactions (xids 700, 700), not one"
    )


def test_a_batch_that_only_changed_is_judged_on_its_changes() -> None:
    only = replace(BATCH, row_count=0)
    verdict = judge_seen(7, only, [], [CHANGES])
    assert (verdict.reason, verdict.xid, verdict.rows, verdict.updated) == (None, 700, 0, 3)
    assert judge_seen(7, BATCH, [], [CHANGES]).reason == (
        "the stream carried 0 rows, the ledger says 6; missing order ids 1..6 (6 of 6)"
    )
    with pytest.raises(ValueError):
        judge_seen(7, BATCH, [], [])


def test_changes_of_failed_unknown_and_judged_batches() -> None:
    failed = replace(BATCH, status="FAILED")
    assert reasons_against(7, failed, [], False, [CHANGES]) == [
        "FAILED in the ledger, yet its transaction xid 700 (commit 0/180) made 3 updates "
        "and 2 deletes of orders"
    ]
    assert reasons_against(7, None, [], False, [CHANGES]) == [
        "transaction xid 700 (commit 0/180) made 3 updates and 2 deletes of orders as this "
        "batch, which the ledger lacks"
    ]
    again = judge_again(7, BATCH, [], [CHANGES])
    assert again is not None and again.reason == (
        "after it was verified, transaction xid 700 (commit 0/180) made 3 updates and 2 "
        "deletes of orders more as this batch"
    )


def test_an_unseen_batch_of_the_mix() -> None:
    assert judge_unseen(7, "COMPLETED", 0, 0x200, "hint", changes=0).reason is None
    assert judge_unseen(7, "COMPLETED", 0, 0x200, "hint", changes=3).reason == (
        "missing from the stream: COMPLETED with 0 rows and 3 changes and end_lsn 0/200, but hint"
    )
    # An insert-only batch of no rows is judged as before.
    assert judge_unseen(7, "COMPLETED", 0, 0x200, "hint").reason is not None


def test_an_insert_only_batch_is_judged_as_before() -> None:
    plain = LedgerBatch(7, "COMPLETED", 6, 1, 0x100, 0x200, 700)
    assert not plain.mixed and plain.changes == 6
    assert reasons_against(7, plain, [replace(INSERTS, declared_ledger_rows=1)], False) == []
    assert reasons_against(7, plain, [INSERTS], False, [CHANGES]) == [
        "the stream carried 3 updates, the ledger says 0",
        "updated orders 21..22, 30 (3), which it did not update",
        "the stream carried 2 deletes, the ledger says 0",
        "deleted orders 24..25 (2), which it did not delete",
    ]


def test_a_ledger_row_of_the_mix_converts() -> None:
    row = {
        "batch_id": 7,
        "status": "COMPLETED",
        "row_count": 6,
        "first_order_id": 1,
        "start_lsn": 0x100,
        "end_lsn": 0x200,
        "xid": "700",
        "updated": 3,
        "deleted": 2,
        "updated_ids": [21, 22, 30],
        "deleted_ids": [24, 25],
    }
    assert LedgerBatch.from_row(row) == BATCH
    older = {k: v for k, v in row.items() if k not in ("updated", "deleted")}
    older.update(updated_ids=None, deleted_ids=None)
    plain = LedgerBatch.from_row(older)
    assert plain is not None and not plain.mixed and (plain.updated, plain.deleted) == (0, 0)
