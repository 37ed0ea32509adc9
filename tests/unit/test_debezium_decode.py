"""The Debezium JSON decoder, on event bytes captured from the real connector (3.6.3).

The samples (tests/pipeline/samples/, made by tests/pipeline/capture_samples.py) hold the same
two batches, loaded with one seed, in four converter forms: with and without the embedded
schema, and amounts in decimal.handling.mode precise, string and double.
"""

from __future__ import annotations

import base64
import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from cdcfeed.proof.kafka.debezium import (
    DebeziumDecoder,
    DebeziumFormatError,
    LedgerChange,
    OrderChange,
    TransactionEvent,
    Truncate,
    decode_amount,
)

SAMPLES = Path(__file__).parent.parent / "pipeline" / "samples"
FORMS = ("schemas_precise_tx", "plain_string_tx", "plain_double", "schemas_string")
ORDERS = "cdcfeed.public.orders"
LEDGER = "cdcfeed.public.batch_control"
TRANSACTIONS = "cdcfeed.transaction"


def records(form: str, topic: str | None = None) -> list[dict[str, Any]]:
    lines = (SAMPLES / f"{form}.jsonl").read_text().splitlines()
    found = [json.loads(line) for line in lines if line]
    return [r for r in found if topic is None or r["topic"] == topic]


def value_bytes(record: dict[str, Any]) -> bytes | None:
    value = record["value"]
    return None if value is None else value.encode()


def decode_all(form: str, decoder: DebeziumDecoder | None = None) -> list[Any]:
    decoder = decoder or DebeziumDecoder()
    return [decoder.decode(r["topic"], value_bytes(r)) for r in records(form)]


def order_events(form: str) -> list[OrderChange | Truncate | None]:
    decoder = DebeziumDecoder()
    return [decoder.decode_order(value_bytes(r)) for r in records(form, ORDERS)]


@pytest.mark.parametrize("form", FORMS)
def test_orders_topic_decodes_to_snapshot_inserts_a_delete_and_its_tombstone(form: str) -> None:
    events = order_events(form)
    assert [None if e is None else (e.op, e.order_id) for e in events] == [  # type: ignore[union-attr]
        ("r", 1),
        ("r", 2),
        ("r", 3),
        ("c", 7),
        ("c", 8),
        ("c", 9),
        ("d", 9),
        None,
    ]
    snapshot, streamed, delete = events[:3], events[3:6], events[6]
    for event in snapshot:
        assert isinstance(event, OrderChange)
        assert event.snapshot and event.batch_id == 1
    for event in streamed:
        assert isinstance(event, OrderChange)
        assert not event.snapshot and event.batch_id == 3
        assert event.amount is not None and event.customer_id is not None
    # One COPY, one transaction, one WAL record: every row of the batch carries the same
    # txId and LSN (the LSN the restart-position loss hinges on).
    assert len({(e.tx_id, e.lsn) for e in streamed if isinstance(e, OrderChange)}) == 1
    assert isinstance(delete, OrderChange)
    # The before row of a delete holds the key alone: no invented batch 0 or amount 0.00.
    assert (delete.batch_id, delete.customer_id, delete.amount) == (None, None, None)
    assert delete.tx_id is not None and delete.lsn is not None


def test_every_form_decodes_the_same_rows() -> None:
    """One seed, four converter forms: identical order ids, batches, customers and amounts."""

    def rows(form: str) -> list[tuple[Any, ...]]:
        return [
            (e.op, e.order_id, e.batch_id, e.customer_id, e.amount, e.snapshot)
            for e in order_events(form)
            if isinstance(e, OrderChange)
        ]

    reference = rows("schemas_precise_tx")
    assert all(isinstance(row[4], Decimal) for row in reference[:6])
    for form in FORMS[1:]:
        assert rows(form) == reference, form


def test_amounts_keep_their_scale_in_precise_and_string_modes() -> None:
    for form in ("schemas_precise_tx", "plain_string_tx"):
        for event in order_events(form)[:6]:
            assert isinstance(event, OrderChange) and event.amount is not None
            assert event.amount.as_tuple().exponent == -2, form


@pytest.mark.parametrize("form", FORMS)
def test_ledger_topic_decodes_the_batch_rows(form: str) -> None:
    decoder = DebeziumDecoder()
    events = [decoder.decode(LEDGER, value_bytes(r)) for r in records(form, LEDGER)]
    assert all(isinstance(e, LedgerChange) for e in events)
    changes = [e for e in events if isinstance(e, LedgerChange)]
    assert [(e.op, e.batch_id, e.status, e.row_count, e.first_order_id) for e in changes] == [
        ("r", 1, "COMPLETED", 3, 1),
        ("c", 3, "IN_PROGRESS", 3, 7),
        ("u", 3, "IN_PROGRESS", 3, 7),  # start_lsn and xid set, in the COPY's transaction
        ("u", 3, "COMPLETED", 3, 7),
    ]
    assert changes[0].snapshot and not any(e.snapshot for e in changes[1:])
    # Debezium does not map pg_lsn or xid8: without include.unknown.datatypes they are absent.
    assert all((e.start_lsn, e.end_lsn, e.xid) == (None, None, None) for e in changes)
    # The ledger row the COPY's transaction updated carries that transaction's txId.
    orders = [e for e in order_events(form) if isinstance(e, OrderChange) and e.op == "c"]
    assert changes[2].tx_id == orders[0].tx_id


@pytest.mark.parametrize("form", ["schemas_precise_tx", "plain_string_tx"])
def test_transaction_topic_gives_begin_and_end_with_per_table_counts(form: str) -> None:
    decoder = DebeziumDecoder()
    events = [decoder.decode(TRANSACTIONS, value_bytes(r)) for r in records(form, TRANSACTIONS)]
    assert all(isinstance(e, TransactionEvent) for e in events)
    tx = [e for e in events if isinstance(e, TransactionEvent)]
    assert [e.status for e in tx] == ["BEGIN", "END"] * 4
    for begin, end in zip(tx[::2], tx[1::2], strict=True):
        assert begin.tx_id == end.tx_id  # the ids differ after the colon: <txId>:<lsn>
        assert begin.event_count is None and begin.event_counts == {}
        assert end.event_count == sum(end.event_counts.values())
    orders = [e for e in order_events(form) if isinstance(e, OrderChange) and e.op == "c"]
    copy_end = next(e for e in tx if e.status == "END" and e.tx_id == orders[0].tx_id)
    assert copy_end.event_counts == {"public.orders": 3, "public.batch_control": 1}
    assert copy_end.event_count == 4


def test_forms_without_transaction_metadata_have_no_transaction_topic() -> None:
    assert records("plain_double", TRANSACTIONS) == []


def test_dispatch_by_topic_and_custom_names() -> None:
    decoder = DebeziumDecoder(topic_prefix="shop", schema="sales", orders_table="o")
    assert decoder.orders_topic == "shop.sales.o"
    assert decoder.ledger_topic == "shop.sales.batch_control"
    assert decoder.transaction_topic == "shop.transaction"
    with pytest.raises(DebeziumFormatError, match="not a topic of this pipeline"):
        decoder.decode(ORDERS, b"{}")


def test_tombstones_are_none_whatever_their_form() -> None:
    decoder = DebeziumDecoder()
    assert decoder.decode(ORDERS, None) is None
    assert decoder.decode(ORDERS, b'{"schema":null,"payload":null}') is None
    assert decoder.decode(LEDGER, None) is None
    assert decoder.decode(TRANSACTIONS, None) is None


def test_the_learned_schema_shortcut_gives_what_a_full_decode_gives() -> None:
    """The second value with a known schema has only its payload decoded: same records, also
    after the schema changed (another scale) and for a value spaced differently."""
    first = records("schemas_precise_tx", ORDERS)[3]["value"]
    shortcut = DebeziumDecoder()
    full = [DebeziumDecoder().decode_order(value_bytes(r)) for r in records("schemas_precise_tx")
            if r["topic"] == ORDERS]  # fmt: skip
    assert [shortcut.decode_order(value_bytes(r)) for r in records("schemas_precise_tx", ORDERS)] \
        == full  # fmt: skip
    # Scale 3 in a new schema: the same unscaled bytes mean a tenth of the amount.
    rescaled = first.replace('"scale":"2"', '"scale":"3"')
    assert rescaled != first
    two = shortcut.decode_order(first.encode())
    three = shortcut.decode_order(rescaled.encode())
    assert isinstance(two, OrderChange) and isinstance(three, OrderChange)
    assert two.amount is not None and three.amount == two.amount / 10
    spaced = json.dumps(json.loads(first), indent=1).encode()
    assert shortcut.decode_order(spaced) == two


@pytest.mark.parametrize(
    ("value", "mode", "scale", "expected"),
    [
        (base64.b64encode((-100).to_bytes(2, "big", signed=True)).decode(), "precise", 2, "-1.00"),
        (base64.b64encode((12345).to_bytes(2, "big", signed=True)).decode(), None, 2, "123.45"),
        (base64.b64encode(bytes([0x00, 0x80])).decode(), "precise", 0, "128"),
        (base64.b64encode((2**70).to_bytes(9, "big", signed=True)).decode(), None, 2,
         str(Decimal(2**70).scaleb(-2))),
        ("123.45", None, 2, "123.45"),
        ("123.45", "string", 7, "123.45"),
        ("1234", "string", 2, "1234"),  # a string mode value without "." when told the mode
        (12.3, None, 2, "12.3"),
        (0.1, "double", 2, "0.1"),
        (7, None, 2, "7"),
        (None, None, 2, None),
    ],
)  # fmt: skip
def test_decode_amount(value: Any, mode: Any, scale: int, expected: str | None) -> None:
    result = decode_amount(value, mode, scale)
    assert result == (None if expected is None else Decimal(expected))
    if isinstance(result, Decimal) and expected is not None:
        assert str(result) == expected


def test_decimal_mode_decides_when_given() -> None:
    # A plain string "1234" is valid base64 too: without a "." the value is taken for
    # precise bytes unless the decoder is told the mode.
    plain = records("plain_string_tx", ORDERS)[3]["value"]
    payload = json.loads(plain)
    payload["after"]["amount"] = "1234"
    told = DebeziumDecoder(decimal_mode="string").decode_order(json.dumps(payload).encode())
    assert isinstance(told, OrderChange) and told.amount == Decimal(1234)
    guessed = DebeziumDecoder().decode_order(json.dumps(payload).encode())
    assert isinstance(guessed, OrderChange)
    unscaled = int.from_bytes(base64.b64decode("1234"), "big", signed=True)
    assert guessed.amount == Decimal(unscaled).scaleb(-2)


def _broken(change: Any) -> bytes:
    payload = json.loads(records("plain_string_tx", ORDERS)[3]["value"])
    change(payload)
    return json.dumps(payload).encode()


TRUNCATED = records("plain_string_tx", ORDERS)[3]["value"].encode()[:-40]


UNKNOWN_SHAPES = [  # (value, what the error says)
    (b"\x00\x00\x00\x00\x07\x02\x0e", "(Confluent wire format: Avro/Protobuf/JSON Schema, "
     "schema id 7)"),
    (b"\x02\x0eorders", "value is not JSON"),
    (b"", "an empty value"),
    (b"[1, 2]", "not a Debezium JSON event: Expected `object`, got `array`"),
    (b'{"order_id": 1}', "without op or source"),
    (_broken(lambda p: p.pop("source")), "op c without a source block"),
    (_broken(lambda p: p.update(op="x")), "unknown op 'x'"),
    (_broken(lambda p: p.update(after=None)), "op c without its after row"),
    (_broken(lambda p: p["after"].update(order_id="7")), "Expected `int`, got `str`"),
    (_broken(lambda p: p["after"].update(amount="1.2.3")), "amount '1.2.3' is not a decimal"),
    (_broken(lambda p: p["after"].update(amount="@@")), "amount '@@' is not a decimal"),
    (TRUNCATED, "value is not JSON (Input data was truncated"),
]  # fmt: skip


@pytest.mark.parametrize(("value", "message"), UNKNOWN_SHAPES)
def test_unknown_shapes_raise_one_clear_line(value: bytes, message: str) -> None:
    with pytest.raises(DebeziumFormatError) as caught:
        DebeziumDecoder().decode(ORDERS, value)
    line = str(caught.value)
    assert message in line
    assert line.startswith(f"{ORDERS}: ") and "\n" not in line


@pytest.mark.parametrize(("value", "message"), UNKNOWN_SHAPES)
def test_decode_orders_raises_what_decode_order_raises(value: bytes, message: str) -> None:
    good = value_bytes(records("schemas_string", ORDERS)[3])
    for before in ([], [good]):  # with and without a schema learned
        with pytest.raises(DebeziumFormatError, match=re.escape(message)):
            DebeziumDecoder().decode_orders([*before, value])


def test_decode_orders_gives_what_decode_order_gives() -> None:
    """Every form, mixed in one call, with a tombstone in JSON, a schema of another scale
    and a value spaced differently: what decoding each alone gives."""
    values = [value_bytes(r) for form in FORMS for r in records(form, ORDERS)]
    enveloped = records("schemas_precise_tx", ORDERS)[3]["value"]
    values += [
        b'{"schema":null,"payload":null}',
        enveloped.replace('"scale":"2"', '"scale":"3"').encode(),
        json.dumps(json.loads(enveloped), indent=1).encode(),
        enveloped.encode(),
    ]
    for mode in (None, "string", "double", "precise"):
        alone = DebeziumDecoder(decimal_mode=mode)
        readable, expected = [], []
        for value in values:
            try:
                expected.append(alone.decode_order(value))
            except DebeziumFormatError:
                continue  # an amount of a form this mode does not read
            readable.append(value)
        assert len(readable) >= len(values) // 2
        together = DebeziumDecoder(decimal_mode=mode)
        assert together.decode_orders(readable) == expected


def test_schema_shortcut_still_rejects_a_broken_payload() -> None:
    decoder = DebeziumDecoder()
    good = records("schemas_precise_tx", ORDERS)[3]["value"]
    decoder.decode_order(good.encode())  # learns the schema
    broken = good.replace('"op":"c"', '"op":7')
    with pytest.raises(DebeziumFormatError, match=re.escape("Expected `str | null`, got `int`")):
        decoder.decode_order(broken.encode())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b'{"status":"COMMIT","id":"1:2","ts_ms":1}', "status 'COMMIT', not BEGIN or END"),
        (b'{"status":"END","ts_ms":1}', "END event without its id or ts_ms"),
        (b'{"status":"BEGIN","id":"abc","ts_ms":1}', "'abc' is not <txId>:<lsn>"),
    ],
)
def test_unknown_transaction_shapes(value: bytes, message: str) -> None:
    with pytest.raises(DebeziumFormatError, match=message):
        DebeziumDecoder().decode(TRANSACTIONS, value)


def test_truncate_events() -> None:
    payload = {"op": "t", "source": {"ts_ms": 5, "txId": 9, "lsn": 100}, "ts_ms": 6}
    decoder = DebeziumDecoder()
    assert decoder.decode(ORDERS, json.dumps(payload).encode()) == Truncate(
        "public.orders", 9, 100, 5
    )
    assert decoder.decode(LEDGER, json.dumps(payload).encode()) == Truncate(
        "public.batch_control", 9, 100, 5
    )


def _ledger_value(**columns: Any) -> bytes:
    row = {"batch_id": 4, "status": "COMPLETED", "row_count": 10, "first_order_id": 31, **columns}
    payload = {"op": "u", "after": row, "source": {"ts_ms": 1, "txId": 5, "lsn": 6}}
    return json.dumps(payload).encode()


def test_ledger_lsn_and_xid_columns_when_debezium_passes_them() -> None:
    """With include.unknown.datatypes the pg_lsn/xid8 columns come as text or its base64."""
    decoder = DebeziumDecoder()
    as_text = decoder.decode(LEDGER, _ledger_value(start_lsn="0/1938A50", end_lsn="1/0", xid="731"))
    assert isinstance(as_text, LedgerChange)
    assert (as_text.start_lsn, as_text.end_lsn, as_text.xid) == (0x1938A50, 1 << 32, 731)

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    as_bytes = decoder.decode(
        LEDGER, _ledger_value(start_lsn=b64("0/1938A50"), end_lsn=b64("0/1946E18"), xid=b64("42"))
    )
    assert isinstance(as_bytes, LedgerChange)
    assert (as_bytes.start_lsn, as_bytes.end_lsn, as_bytes.xid) == (0x1938A50, 0x1946E18, 42)
    with pytest.raises(DebeziumFormatError, match="is not an LSN"):
        decoder.decode(LEDGER, _ledger_value(start_lsn="nowhere"))
    with pytest.raises(DebeziumFormatError, match="is not a transaction id"):
        decoder.decode(LEDGER, _ledger_value(xid="-3"))
