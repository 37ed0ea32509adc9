"""The slot as a source of the change mix: pgoutput's Update and Delete of orders, the claim of
the batch's ledger row in the same transaction, before images and unchanged TOAST values."""

from __future__ import annotations

import json
from dataclasses import replace

from cdcfeed.metrics import Metrics
from cdcfeed.proof.events import ChangeObservation, LedgerBatch
from cdcfeed.proof.judge import judge_seen
from cdcfeed.proof.slot.pgoutput import UNCHANGED, TupleValue
from cdcfeed.proof.slot.report import ChangedBatch, Report
from cdcfeed.proof.slot.state import _changes, _stored
from cdcfeed.proof.slot.stream import StreamReader
from tests import pgoutput_builders as pg
from tests.pgoutput_builders import begin, commit, relation

ORDERS = ("public", "orders")
LEDGER = ("cdcfeed", "batch_control")
ORDERS_ID, LEDGER_ID = 16400, 16410
COLUMNS = (
    (1, "order_id", 20, -1),
    "batch_id",
    "customer_id",
    "amount",
    "created_at",
    "status",
    "updated_at",
    "note",
)
NOTE = "x" * 4096


def orders_relation(identity: str = "d") -> bytes:
    return relation(ORDERS_ID, "orders", *COLUMNS, identity=identity)


LEDGER_RELATION = relation(
    LEDGER_ID, "batch_control", "batch_id", "status", "xid", namespace="cdcfeed"
)


def row(order_id: int, status: str = "created", note: TupleValue = NOTE) -> tuple[TupleValue, ...]:
    return (str(order_id), "1", "3", "10.00", "2026-01-01", status, None, note)


def key(order_id: int) -> tuple[TupleValue, ...]:
    return (str(order_id), *[None] * 7)


def claim(batch_id: int, xid: int) -> bytes:
    return pg.update(LEDGER_ID, (str(batch_id), "IN_PROGRESS", str(xid)))


def read(*messages: bytes) -> StreamReader:
    reader = StreamReader(ORDERS, 0, LEDGER)
    for message in messages:
        reader.feed(message)
    reader.finish()
    return reader


def test_default_identity_key_only_before_images_and_unchanged_toast() -> None:
    reader = read(
        orders_relation(),
        LEDGER_RELATION,
        begin(700),
        claim(7, 700),
        pg.insert(ORDERS_ID, *row(50)),
        # No old tuple: DEFAULT sends none when the key is unchanged; the note is 'u'.
        pg.update(ORDERS_ID, row(10, "cancelled", UNCHANGED)),
        pg.update(ORDERS_ID, row(11, "paid", None)),
        pg.delete(ORDERS_ID, *key(12)),
        commit(0x100, 0x130),
    )
    assert reader.events == []
    assert [o.batch_id for o in reader.observations] == [1]  # the insert's own batch id
    assert reader.changes == [
        ChangeObservation(
            7,
            700,
            0x100,
            0x130,
            statuses=(("cancelled", ((10, 10),)), ("paid", ((11, 11),))),
            deleted=((12, 12),),
            key_only=((10, 12),),
            identity="d",
            unchanged_toast=1,
        )
    ]


def test_full_identity_old_rows_resolve_the_unchanged_value() -> None:
    reader = read(
        orders_relation("f"),
        LEDGER_RELATION,
        begin(700),
        claim(7, 700),
        pg.update(ORDERS_ID, row(10, "cancelled", UNCHANGED), row(10), kind="O"),
        pg.update(ORDERS_ID, row(11, "paid", NOTE), row(11), kind="O"),
        pg.delete(ORDERS_ID, *row(12), kind="O"),
        commit(0x100, 0x130),
    )
    (changes,) = reader.changes
    assert (changes.identity, changes.key_only) == ("f", ())
    assert (changes.unchanged_toast, changes.resolved_toast) == (0, 1)
    assert (changes.updates, changes.deletes) == (2, 1)


def test_a_claim_names_the_transactions_own_xid_in_any_epoch() -> None:
    reader = read(
        orders_relation(),
        LEDGER_RELATION,
        begin(700),
        claim(8, 701),  # another transaction's xid: not a claim of this one
        claim(7, (3 << 32) | 700),
        pg.delete(ORDERS_ID, *key(12)),
        commit(0x100, 0x130),
    )
    assert [c.batch_id for c in reader.changes] == [7]


def test_changes_no_batch_claimed_are_stream_events() -> None:
    reader = read(
        orders_relation(),
        LEDGER_RELATION,
        begin(5),
        pg.update(ORDERS_ID, row(1, "paid")),
        pg.delete(ORDERS_ID, *key(2)),
        commit(0x500, 0x530),
    )
    assert reader.changes == []
    assert [(e.batch_id, e.reason) for e in reader.events] == [
        (
            None,
            "UPDATE of order 1; no batch of the ledger ran it (transaction xid 5, commit 0/500)",
        ),
        (
            None,
            "DELETE of order 2; no batch of the ledger ran it (transaction xid 5, commit 0/500)",
        ),
    ]


def test_orders_older_than_the_change_mix() -> None:
    old_orders = relation(ORDERS_ID, "orders", "order_id", "batch_id", "customer_id")
    reader = read(
        old_orders,
        LEDGER_RELATION,
        begin(700),
        claim(7, 700),
        pg.update(ORDERS_ID, ("1", "1", "2")),
        commit(0x100, 0x130),
    )
    (changes,) = reader.changes
    assert changes.statuses == ((None, ((1, 1),)),)


def test_what_the_state_keeps_of_a_transactions_changes_reads_back_the_same() -> None:
    changes = ChangeObservation(
        7,
        700,
        0x100,
        0x130,
        statuses=(("paid", ((1, 3), (9, 9))), (None, ((5, 5),))),
        deleted=((12, 14),),
        key_only=((1, 3),),
        identity="f",
        unchanged_toast=2,
        resolved_toast=1,
        twice=((3, 3),),
    )
    stored = json.loads(json.dumps(_stored(changes)))  # as jsonb gives it back
    assert _changes(7, stored) == changes


def test_the_report_shows_the_change_mix_only_when_there_is_one() -> None:
    plain = Report("s", "p", "0/0", 2, 2, 0, 100, 0, 0, [])
    assert "changes:" not in plain.as_text()
    assert plain.as_dict()["changes"]["updated"] == 0
    batch = ChangedBatch(7, "ok", 60, 25, 15, 25, 0)
    mixed = replace(plain, updated=25, deleted=15, unchanged_toast=25, changed_batches=[batch])
    lines = mixed.as_text().splitlines()
    assert lines[3:] == [
        "changes: 100 inserted, 25 updated, 15 deleted; unchanged TOAST values: 25 "
        "unresolved, 0 resolved from the before image",
        "  batch 7: 60 inserted, 25 updated, 15 deleted, unchanged TOAST 25 (0 resolved): ok",
    ]
    assert mixed.as_dict()["changed_batches"] == [
        {
            "batch_id": 7,
            "result": "ok",
            "inserted": 60,
            "updated": 25,
            "deleted": 15,
            "unchanged_toast": 25,
            "resolved_toast": 0,
        }
    ]


def test_a_verdicts_changes_are_counted_by_op_and_toast() -> None:
    metrics = Metrics()
    metrics.verdict_changes("slot", "ok", (60, 25, 15), (25, 0))
    metrics.verdict_changes("slot", "violation", (1, 0, 0), (0, 3))

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("cdcfeed_verified_changes_total", source="slot", op="update", result="ok") == 25
    assert value("cdcfeed_verified_changes_total", source="slot", op="insert", result="ok") == 60
    assert (
        value("cdcfeed_verified_changes_total", source="slot", op="insert", result="violation") == 1
    )
    assert value("cdcfeed_unchanged_toast_total", source="slot", resolved="false") == 25
    assert value("cdcfeed_unchanged_toast_total", source="slot", resolved="true") == 3
    assert value("cdcfeed_unchanged_toast_total", source="kafka", resolved="true") == 0


def test_a_stale_after_image_read_from_the_slot_is_named_by_the_judge() -> None:
    reader = read(
        orders_relation(),
        LEDGER_RELATION,
        begin(700),
        claim(7, 700),
        pg.update(ORDERS_ID, row(21, "paid")),
        pg.update(ORDERS_ID, row(22, "created")),  # the old status: an update lost its write
        pg.update(ORDERS_ID, row(30, "paid")),  # order ids ending in 0 are cancelled
        commit(0x100, 0x130),
    )
    batch = LedgerBatch(7, "COMPLETED", 0, 1, 0x90, 0x200, 700, 3, 0, (21, 22, 30), ())
    verdict = judge_seen(7, batch, [], reader.changes)
    assert verdict.reason == (
        "stale after image: status 'created', not the one an update gives, for order ids 22 "
        "(1); stale after image: status 'paid', not the one an update gives, for order ids 30 "
        "(1)"
    )
