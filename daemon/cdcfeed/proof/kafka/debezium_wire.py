"""The wire side of the Debezium decoder: the JSON shapes it reads and the envelope reader.

Split from `debezium` to keep each file short; `debezium` is the module to import.
"""

from __future__ import annotations

import binascii
import re
from decimal import Decimal
from typing import Final, Generic, Literal, Protocol, TypeAlias, TypeVar, cast

import msgspec

from cdcfeed.errors import CdcfeedError

_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class DebeziumFormatError(CdcfeedError):
    """A record that is not a Debezium JSON change event this decoder knows. One line."""

    def __init__(self, topic: str, message: str) -> None:
        super().__init__(f"{topic}: {message}")
        self.topic = topic
        self.message = message


# The wire shapes: fields the decoder does not name are skipped unread.

DecimalMode: TypeAlias = Literal["precise", "string", "double"]
Scalar: TypeAlias = str | int | float | None
Amount: TypeAlias = str | float | int | None


class Source(msgspec.Struct, gc=False):
    ts_ms: int
    snapshot: str | bool | None = None
    txId: int | None = None  # Debezium's field name
    lsn: int | None = None


class OrderRow(msgspec.Struct, gc=False):
    order_id: int
    batch_id: int | None = None
    customer_id: int | None = None
    amount: Amount = None
    status: str | None = None
    updated_at: str | None = None
    # Kept as the raw JSON: a TOASTed note is kilobytes that only need telling apart from
    # Debezium's placeholder for a value it did not get, never decoding.
    note: msgspec.Raw = msgspec.Raw(b"")


class LedgerRow(msgspec.Struct, gc=False):
    batch_id: int
    status: str | None = None
    row_count: int | None = None
    first_order_id: int | None = None
    start_lsn: Scalar = None
    end_lsn: Scalar = None
    xid: Scalar = None


class OrderPayload(msgspec.Struct, gc=False):
    op: str | None = None
    source: Source | None = None
    before: OrderRow | None = None
    after: OrderRow | None = None
    ts_ms: int | None = None


class LedgerPayload(msgspec.Struct, gc=False):
    op: str | None = None
    source: Source | None = None
    before: LedgerRow | None = None
    after: LedgerRow | None = None
    ts_ms: int | None = None


class OrderKey(msgspec.Struct, gc=False):
    order_id: int


class OrderKeyValue(msgspec.Struct, gc=False):
    """An orders record's key, in either converter form (as the values, see below)."""

    order_id: int | None = None
    payload: OrderKey | None = None


class Collection(msgspec.Struct, gc=False):
    data_collection: str
    event_count: int


class TxPayload(msgspec.Struct, gc=False):
    status: str | None = None
    id: str | None = None
    event_count: int | None = None
    data_collections: list[Collection] | None = None
    ts_ms: int | None = None


NO_SCHEMA: Final = msgspec.Raw(b"")

UNAVAILABLE: Final = "__debezium_unavailable_value"
"""Debezium's default `unavailable.value.placeholder`: a TOASTed value the change did not
carry (an update that left it alone, without REPLICA IDENTITY FULL)."""
# As the JSON of a text column, and of a bytes column in binary.handling.mode base64 or hex.
_UNAVAILABLE_JSON: Final = frozenset(
    b'"' + form + b'"'
    for form in (
        UNAVAILABLE.encode(),
        binascii.b2a_base64(UNAVAILABLE.encode(), newline=False),
        UNAVAILABLE.encode().hex().encode(),
    )
)
_UNAVAILABLE_LONGEST: Final = max(map(len, _UNAVAILABLE_JSON))


def unavailable(raw: msgspec.Raw) -> bool:
    """Whether a column's raw JSON is Debezium's placeholder for a value it did not get."""
    return len(raw) <= _UNAVAILABLE_LONGEST and bytes(raw) in _UNAVAILABLE_JSON


# A value with the schema envelope has "schema" and "payload"; one without is the payload
# itself. One struct holds both forms: decoding never needs a second pass. A payload that is
# there and null is a tombstone written as JSON ({"schema": null, "payload": null}).
class OrderValue(OrderPayload, gc=False):
    schema: msgspec.Raw = NO_SCHEMA
    payload: OrderPayload | msgspec.UnsetType | None = msgspec.UNSET


class LedgerValue(LedgerPayload, gc=False):
    schema: msgspec.Raw = NO_SCHEMA
    payload: LedgerPayload | msgspec.UnsetType | None = msgspec.UNSET


class TxValue(TxPayload, gc=False):
    schema: msgspec.Raw = NO_SCHEMA
    payload: TxPayload | msgspec.UnsetType | None = msgspec.UNSET


class Field(msgspec.Struct, gc=False):
    field: str = ""
    type: str = ""
    parameters: dict[str, str] | None = None
    fields: list[Field] | None = None


class Schema(msgspec.Struct, gc=False):
    fields: list[Field] = []


_P = TypeVar("_P", OrderPayload, LedgerPayload, TxPayload)
_SCHEMA_HEAD: Final = b'{"schema":'
_PAYLOAD_HEAD: Final = b',"payload":'


class _Enveloped(Protocol[_P]):
    schema: msgspec.Raw
    payload: _P | msgspec.UnsetType | None


class Reader(Generic[_P]):
    """Reads one topic's values into their payload, in either converter form.

    With schemas enabled, every value repeats the same schema (about 3 KB) before a payload a
    fifth of that size. Once a value has shown it, a value starting with exactly the same
    bytes has only its payload decoded: a byte comparison instead of a parse. Anything else
    (another schema, other spacing) takes the full decode, which is always right.
    """

    def __init__(self, value_type: type[_Enveloped[_P]], payload_type: type[_P]) -> None:
        self.decoder: msgspec.json.Decoder[_Enveloped[_P]] = msgspec.json.Decoder(value_type)
        self.payload_decoder: msgspec.json.Decoder[_P | None] = msgspec.json.Decoder(
            payload_type | None
        )
        self.prefix = b""
        self.schema = NO_SCHEMA

    def read(self, topic: str, value: bytes) -> tuple[_P | None, msgspec.Raw]:
        """The payload (None: a tombstone written as JSON) and the embedded schema, if any."""
        prefix = self.prefix
        try:
            if prefix and value.startswith(prefix) and value.endswith(b"}"):
                return self.payload_decoder.decode(value[len(prefix) : -1]), self.schema
            outer = self.decoder.decode(value)
        except msgspec.DecodeError as exc:
            raise not_understood(topic, value, exc) from None
        if outer.payload is msgspec.UNSET:
            return cast(_P, outer), NO_SCHEMA
        if outer.schema and outer.payload is not None:
            learned = _SCHEMA_HEAD + bytes(outer.schema) + _PAYLOAD_HEAD
            if value.startswith(learned):
                self.prefix, self.schema = learned, outer.schema
        return outer.payload, outer.schema


def amount_scale(schema: Schema, default: int) -> int:
    for envelope_field in schema.fields:
        if envelope_field.field not in ("after", "before"):
            continue
        for column in envelope_field.fields or ():
            if column.field == "amount":
                scale = (column.parameters or {}).get("scale")
                return int(scale) if scale is not None else default
    return default


def lsn_value(topic: str, value: Scalar) -> int | None:
    """A pg_lsn column: absent, an int, or its text "X/Y" (include.unknown.datatypes)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _LSN_TEXT.fullmatch(value)
        if match:
            return (int(match[1], 16) << 32) | int(match[2], 16)
        text = _text_of_base64(value)
        if text is not None and (match := _LSN_TEXT.fullmatch(text)):
            return (int(match[1], 16) << 32) | int(match[2], 16)
    raise DebeziumFormatError(topic, f"LSN column value {value!r} is not an LSN")


def xid_value(topic: str, value: Scalar) -> int | None:
    """An xid8 column: absent, an int, or its decimal text (possibly base64 of it)."""
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        text = _text_of_base64(value)
        if text is not None and text.isdigit():
            return int(text)
    raise DebeziumFormatError(topic, f"xid column value {value!r} is not a transaction id")


def _text_of_base64(value: str) -> str | None:
    try:
        return binascii.a2b_base64(value, strict_mode=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def not_understood(topic: str, value: bytes, exc: msgspec.DecodeError) -> DebeziumFormatError:
    head = bytes(value[:1])
    if not head:
        return DebeziumFormatError(topic, "an empty value: not a Debezium JSON event")
    if head == b"\x00":
        return DebeziumFormatError(
            topic,
            f"value starts with byte 0x00 (Confluent wire format: Avro/Protobuf/JSON Schema, "
            f"schema id {int.from_bytes(value[1:5], 'big')}): cdcfeed reads JsonConverter "
            f"output only",
        )
    try:
        msgspec.json.decode(value)
    except msgspec.DecodeError as not_json:
        return DebeziumFormatError(
            topic,
            f"value is not JSON ({not_json}; starts with {bytes(value[:8])!r}): cdcfeed reads "
            f"JsonConverter output only",
        )
    return DebeziumFormatError(topic, f"not a Debezium JSON event: {exc}")


def decode_amount(value: Amount, mode: DecimalMode | None, scale: int) -> Decimal | None:
    """An `amount` in any decimal.handling.mode as a Decimal.

    `mode` None infers it from the value: a number is `double`; a string with a "." is
    `string` (Debezium writes numeric(p,s>0) as plain text with its scale); any other string
    is `precise` base64 (its alphabet has no ".").
    """
    if value is None:
        return None
    if isinstance(value, str):
        if mode == "string" or (mode is None and "." in value):
            return Decimal(value)
        raw = binascii.a2b_base64(value, strict_mode=True)
        return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-scale)
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


_NOT_SNAPSHOT: Final = frozenset({"false", ""})
_OPS: Final[dict[str, Literal["c", "u", "d", "r", "t"]]] = {
    "c": "c", "u": "u", "d": "d", "r": "r", "t": "t"
}  # fmt: skip


def op_and_source(
    topic: str, op: str | None, source: Source | None
) -> tuple[Literal["c", "u", "d", "r", "t"], Source]:
    if source is None:
        if op is None:
            raise DebeziumFormatError(
                topic, "a JSON value without op or source: not a Debezium change event"
            )
        raise DebeziumFormatError(topic, f"op {op} without a source block")
    known = _OPS.get(op or "")
    if known is None:
        raise DebeziumFormatError(topic, f"unknown op {op!r}")
    return known, source


def row_name(op: str) -> str:
    return "before" if op == "d" else "after"


def is_snapshot(flag: str | bool | None) -> bool:
    if flag is None or flag is False:
        return False
    return flag is True or flag not in _NOT_SNAPSHOT
