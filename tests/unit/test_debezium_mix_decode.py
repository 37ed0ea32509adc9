"""The Debezium decoder on the change mix: updates, deletes, tombstones and TOASTed values,
on event bytes captured from the real connector (3.6.3) under REPLICA IDENTITY DEFAULT and
FULL (tests/pipeline/samples/mix_*.jsonl, made by tests/pipeline/capture_samples.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from cdcfeed.proof.kafka.debezium import (
    UNAVAILABLE,
    DebeziumDecoder,
    DebeziumFormatError,
    OrderChange,
)
from tests.unit.test_debezium_decode import ORDERS, records, value_bytes

DEFAULT, FULL = "mix_default_schemas_precise", "mix_full_plain_string"
TOASTED = {1, 3}  # the orders inserted with a 4 KB note


def changes(form: str) -> list[OrderChange | None]:
    decoder = DebeziumDecoder()
    out = [decoder.decode_order(value_bytes(r)) for r in records(form, ORDERS)]
    assert all(c is None or isinstance(c, OrderChange) for c in out)
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("form", [DEFAULT, FULL])
def test_the_mix_decodes_to_inserts_updates_a_delete_and_its_tombstone(form: str) -> None:
    events = changes(form)
    assert [None if e is None else (e.op, e.order_id) for e in events] == [
        ("c", 1), ("c", 2), ("c", 3), ("c", 10),
        ("u", 1), ("u", 2), ("u", 10), ("d", 3), None,
    ]  # fmt: skip
    inserts, updates = events[:4], events[4:7]
    for insert in inserts:
        assert insert is not None
        assert (insert.status, insert.updated_at, insert.before) == ("created", None, "none")
        assert not insert.note_unavailable  # an insert carries its TOASTed value
    for update in updates:
        assert update is not None
        assert update.status == ("cancelled" if update.order_id % 10 == 0 else "paid")
        assert update.updated_at is not None and update.batch_id == 1
        assert update.amount is not None and update.customer_id is not None
    # One transaction for the updates and the delete.
    assert len({e.tx_id for e in events[4:8] if e is not None}) == 1


def test_under_default_an_update_has_no_old_row_and_a_delete_its_key_alone() -> None:
    events = changes(DEFAULT)
    updates, delete = events[4:7], events[7]
    for update in updates:
        assert update is not None
        assert (update.before, update.before_status) == ("none", None)
        # The note it left alone is Debezium's placeholder where it was TOASTed.
        assert update.note_unavailable is (update.order_id in TOASTED)
    assert delete is not None
    assert (delete.before, delete.batch_id, delete.before_status) == ("key", None, None)
    assert (delete.customer_id, delete.amount, delete.status) == (None, None, None)


def test_under_full_the_old_row_is_whole_and_the_toasted_value_carried() -> None:
    events = changes(FULL)
    updates, delete = events[4:7], events[7]
    for update in updates:
        assert update is not None
        assert (update.before, update.before_status) == ("row", "created")
        assert not update.note_unavailable
    assert delete is not None
    assert (delete.before, delete.before_status, delete.batch_id) == ("row", "created", 1)
    assert delete.status is None


@pytest.mark.parametrize("form", [DEFAULT, FULL])
def test_decode_orders_gives_what_decode_order_gives_on_the_mix(form: str) -> None:
    values = [value_bytes(r) for r in records(form, ORDERS)]
    assert DebeziumDecoder().decode_orders(values) == [
        DebeziumDecoder().decode_order(v) for v in values
    ]


@pytest.mark.parametrize("form", [DEFAULT, FULL])
def test_a_tombstones_key_names_the_deleted_order(form: str) -> None:
    decoder = DebeziumDecoder()
    keyed = records(form, ORDERS)
    assert [decoder.decode_order_key(r["key"].encode()) for r in keyed] == [
        1,
        2,
        3,
        10,
        1,
        2,
        10,
        3,
        3,
    ]
    assert decoder.decode_order_key(None) is None


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (b'{"id": 3}', "no order_id"),
        (b"[1]", "not an orders key"),
        (b"\x00\x01", "not an orders key"),
    ],
)
def test_a_key_that_names_no_order_raises_one_line(key: bytes, says: str) -> None:
    with pytest.raises(DebeziumFormatError, match=says):
        DebeziumDecoder().decode_order_key(key)


def _update_with_note(note: Any) -> bytes:
    """The FULL sample's update of order 1 with its note set to `note`."""
    events = [json.loads(r["value"]) for r in records(FULL, ORDERS) if r["value"] is not None]
    (event,) = [e for e in events if e["op"] == "u" and e["after"]["order_id"] == 1]
    event["after"]["note"] = note
    return json.dumps(event).encode()


@pytest.mark.parametrize(
    ("note", "unavailable"),
    [
        (UNAVAILABLE, True),
        # A bytes column in binary.handling.mode base64 or hex carries the placeholder's bytes.
        (base64.b64encode(UNAVAILABLE.encode()).decode(), True),
        (UNAVAILABLE.encode().hex(), True),
        (UNAVAILABLE + "x", False),
        ("x" * 4096, False),
        (None, False),
    ],
)
def test_the_placeholder_is_recognised_in_every_form(note: Any, unavailable: bool) -> None:
    value = _update_with_note(note)
    for decoded in (
        DebeziumDecoder().decode_order(value),
        DebeziumDecoder().decode_orders([value])[0],
    ):
        assert isinstance(decoded, OrderChange)
        assert decoded.note_unavailable is unavailable
