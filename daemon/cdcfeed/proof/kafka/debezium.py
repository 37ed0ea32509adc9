"""Decoder for Debezium's PostgreSQL change events as Kafka Connect's JsonConverter writes them.

One record value (bytes, as read from Kafka) becomes one small typed record:

- `OrderChange` for the orders topic (`<prefix>.<schema>.<orders>`),
- `LedgerChange` for the ledger topic (`<prefix>.<schema>.<batch_table>`),
- `TransactionEvent` for the transaction topic (`<prefix>.transaction`),
- `Truncate` for a truncate event (op `t`) on either table,
- None for a tombstone (a record without a value, which follows every delete): its key
  (`decode_order_key`) names the deleted order.

An orders update or delete says what the table's replica identity gave Debezium: the old row
(`before`) is absent from an update under REPLICA IDENTITY DEFAULT, holds the key alone in a
delete under DEFAULT (Debezium fills the other columns with their defaults: batch_id 0), and
the whole old row under FULL. A TOASTed `note` an update left alone arrives as Debezium's
placeholder (`UNAVAILABLE`) unless the table is FULL: `OrderChange.note_unavailable`.

Both converter forms are accepted: with the schema envelope (`schemas.enable=true`:
`{"schema": {...}, "payload": {...}}`) and without (`{...}` is the payload). Numeric
`amount` arrives in any `decimal.handling.mode`: `precise` (base64 of the unscaled value's
big-endian two's-complement bytes; the scale comes from the embedded schema, else the
decoder's default), `string` ("12.34") or `double` (12.34). Every amount decodes to a
`Decimal`.

The decoder is strict: bytes that are not a JSON object (Avro, Protobuf, another converter),
a change event without its `source` block, an unknown `op` or a field of the wrong type raise
`DebeziumFormatError` with one line saying what was found, because a record skipped silently
could hide a lost row.

PostgreSQL's `pg_lsn` and `xid8` columns are not among the types Debezium maps: the ledger's
`start_lsn`, `end_lsn` and `xid` are absent from its events unless the connector runs with
`include.unknown.datatypes=true`; they decode to None when absent.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from typing import Final, Literal, TypeAlias

import msgspec

from cdcfeed.proof.kafka.debezium_wire import (
    NO_SCHEMA,
    UNAVAILABLE,
    DebeziumFormatError,
    DecimalMode,
    LedgerPayload,
    LedgerValue,
    OrderKeyValue,
    OrderPayload,
    OrderRow,
    OrderValue,
    Reader,
    Schema,
    TxPayload,
    TxValue,
    amount_scale,
    decode_amount,
    is_snapshot,
    lsn_value,
    op_and_source,
    row_name,
    unavailable,
    xid_value,
)

__all__ = [
    "DEFAULT_SCALE",
    "UNAVAILABLE",
    "Before",
    "DebeziumDecoder",
    "DebeziumFormatError",
    "DecimalMode",
    "Decoded",
    "LedgerChange",
    "Op",
    "OrderChange",
    "TransactionEvent",
    "Truncate",
    "decode_amount",
]

DEFAULT_SCALE: Final = 2
"""The scale of `amount` (numeric(10,2)) when a precise value comes without its schema."""

Op: TypeAlias = Literal["c", "u", "d", "r"]
Before: TypeAlias = Literal["none", "key", "row"]
"""What an event's old row holds: nothing, the key alone, or the whole row."""
_STREAMED: Final = frozenset({"false", "", False})  # source.snapshot of a streamed change


# -- What the decoder returns -------------------------------------------------------------


class OrderChange(msgspec.Struct, frozen=True, gc=False):
    """One change event of the orders table.

    `tx_id` is `source.txId`: PostgreSQL's 32-bit xid (compare with the ledger's xid8 modulo
    2**32). `lsn` is `source.lsn`, the change's WAL position. For a delete only the key
    columns are certain (`before` holds the replica identity); the others are None.

    `status`, `updated_at` and `note_unavailable` are of the row after the change (None and
    False for a delete); `before` says what the old row held, `before_status` its status
    when it held the whole row.
    """

    op: Op
    order_id: int
    batch_id: int | None
    customer_id: int | None
    amount: Decimal | None
    tx_id: int | None
    lsn: int | None
    snapshot: bool
    source_ts_ms: int
    ts_ms: int | None
    status: str | None = None
    updated_at: str | None = None
    note_unavailable: bool = False
    before: Before = "none"
    before_status: str | None = None


class LedgerChange(msgspec.Struct, frozen=True, gc=False):
    """One change event of the ledger table (the row after the change; before for a delete)."""

    op: Op
    batch_id: int
    status: str | None
    row_count: int | None
    first_order_id: int | None
    start_lsn: int | None
    end_lsn: int | None
    xid: int | None
    tx_id: int | None
    lsn: int | None
    snapshot: bool
    source_ts_ms: int
    ts_ms: int | None


class Truncate(msgspec.Struct, frozen=True, gc=False):
    """A truncate event (op `t`) of the orders or the ledger table."""

    table: str
    tx_id: int | None
    lsn: int | None
    source_ts_ms: int


class TransactionEvent(msgspec.Struct, frozen=True, gc=False):
    """A BEGIN or END event of the transaction topic (`provide.transaction.metadata`).

    `id` is Debezium's "<txId>:<lsn>"; `tx_id` its 32-bit xid part, equal to the data events'
    `source.txId`. An END carries the total `event_count` and `event_counts` per data
    collection ("schema.table" -> events); a BEGIN has neither (None and {}).
    """

    status: Literal["BEGIN", "END"]
    id: str
    tx_id: int
    event_count: int | None
    event_counts: dict[str, int]
    ts_ms: int


Decoded: TypeAlias = OrderChange | LedgerChange | TransactionEvent | Truncate | None


# -- Decoding ------------------------------------------------------------------------------


class DebeziumDecoder:
    """Decodes the values of one pipeline's topics.

    `decimal_mode` None infers each amount's form (see `decode_amount`); set it when known.
    `default_scale` is the precise amount's scale when a value comes without its schema.
    """

    def __init__(
        self,
        *,
        topic_prefix: str = "cdcfeed",
        schema: str = "public",
        orders_table: str = "orders",
        ledger_table: str = "batch_control",
        decimal_mode: DecimalMode | None = None,
        default_scale: int = DEFAULT_SCALE,
    ) -> None:
        self.orders_topic: Final = f"{topic_prefix}.{schema}.{orders_table}"
        self.ledger_topic: Final = f"{topic_prefix}.{schema}.{ledger_table}"
        self.transaction_topic: Final = f"{topic_prefix}.transaction"
        self.orders_collection: Final = f"{schema}.{orders_table}"
        self.ledger_collection: Final = f"{schema}.{ledger_table}"
        self.decimal_mode = decimal_mode
        self.default_scale = default_scale
        self._orders = Reader(OrderValue, OrderPayload)
        self._ledger = Reader(LedgerValue, LedgerPayload)
        self._tx = Reader(TxValue, TxPayload)
        self._key = msgspec.json.Decoder(OrderKeyValue)
        self._schema = msgspec.json.Decoder(Schema)
        # Embedded schemas repeat on every record: the amount's scale once per distinct one.
        self._scales: dict[bytes, int] = {}
        self._last_schema, self._last_scale = NO_SCHEMA, default_scale

    def decode(self, topic: str, value: bytes | None) -> Decoded:
        """One record's value from `topic`; None for a tombstone."""
        if topic == self.orders_topic:
            return self.decode_order(value, topic)
        if topic == self.transaction_topic:
            return self.decode_transaction(value, topic)
        if topic == self.ledger_topic:
            return self.decode_ledger(value, topic)
        raise DebeziumFormatError(topic, "not a topic of this pipeline")

    def decode_order(self, value: bytes | None, topic: str = "") -> OrderChange | Truncate | None:
        if value is None:
            return None
        topic = topic or self.orders_topic
        payload, schema = self._orders.read(topic, value)
        return None if payload is None else self._order_change(topic, payload, schema)

    def decode_orders(
        self, values: Iterable[bytes | None], topic: str = ""
    ) -> list[OrderChange | Truncate | None]:
        """`decode_order` of each value, the same results faster: what nearly every value is,
        a streamed insert, is decoded inline, its payload alone (after the embedded schema
        seen last, or the whole value without one), and anything else the long way."""
        topic = topic or self.orders_topic
        reader = self._orders
        payload_of, whole = reader.payload_decoder.decode, reader.decoder.decode
        prefix, schema = reader.prefix, reader.schema
        cut = len(prefix)
        mode, default_scale = self.decimal_mode, self.default_scale
        scaled, schema_scale = NO_SCHEMA, default_scale  # the amount's scale in this schema
        changes: list[OrderChange | Truncate | None] = []
        append = changes.append
        for value in values:
            if value is None:
                append(None)
                continue
            payload: OrderPayload | None = None
            embedded = NO_SCHEMA
            try:
                if not cut:
                    outer = whole(value)
                    if outer.payload is msgspec.UNSET:  # no envelope: the value is the payload
                        payload = outer  # type: ignore[assignment]  # an OrderValue
                elif value.startswith(prefix) and value.endswith(b"}"):
                    payload, embedded = payload_of(value[cut:-1]), schema
            except msgspec.DecodeError:
                pass  # the long way says what is wrong
            if payload is None:
                payload, embedded = reader.read(topic, value)
                prefix, schema = reader.prefix, reader.schema  # learned from this one
                cut = len(prefix)
                if payload is None:
                    append(None)
                    continue
            source, row = payload.source, payload.after
            if (
                payload.op != "c"
                or source is None
                or row is None
                or not (source.snapshot is None or source.snapshot in _STREAMED)
            ):
                append(self._order_change(topic, payload, embedded))
                continue
            amount = row.amount
            try:
                if type(amount) is not str:
                    decimal = decode_amount(amount, mode, default_scale)
                else:
                    scale = default_scale
                    if embedded:
                        if embedded is not scaled:
                            schema_scale, scaled = self._scale_of(embedded), embedded
                        scale = schema_scale
                    if mode == "string" or (mode is None and "." in amount):
                        decimal = Decimal(amount)
                    else:
                        decimal = decode_amount(amount, mode, scale)
            except (ValueError, ArithmeticError):
                append(self._order_change(topic, payload, embedded))  # raises, saying why
                continue
            append(
                OrderChange(
                    "c", row.order_id, row.batch_id, row.customer_id, decimal, source.txId,
                    source.lsn, False, source.ts_ms, payload.ts_ms, row.status, row.updated_at,
                    unavailable(row.note),
                )
            )  # fmt: skip
        return changes

    def _order_change(
        self, topic: str, payload: OrderPayload, schema: msgspec.Raw
    ) -> OrderChange | Truncate:
        op, source = op_and_source(topic, payload.op, payload.source)
        if op == "t":
            return Truncate(self.orders_collection, source.txId, source.lsn, source.ts_ms)
        row = payload.before if op == "d" else payload.after
        if row is None:
            raise DebeziumFormatError(topic, f"op {op} without its {row_name(op)} row")
        snapshot = op == "r" or is_snapshot(source.snapshot)
        if op == "d":
            if not row.batch_id:
                # Without REPLICA IDENTITY FULL a delete's before row holds the key alone;
                # Debezium fills the other columns with defaults (0, "0.00", the status
                # column's 'created') that are no row's values.
                return OrderChange(
                    op, row.order_id, None, None, None, source.txId, source.lsn, snapshot,
                    source.ts_ms, payload.ts_ms, before="key",
                )  # fmt: skip
            return OrderChange(
                op, row.order_id, row.batch_id, row.customer_id, self._amount(topic, row, schema),
                source.txId, source.lsn, snapshot, source.ts_ms, payload.ts_ms, before="row",
                before_status=row.status,
            )  # fmt: skip
        before: Before = "none"
        before_status = None
        old = payload.before
        if old is not None:
            before = "row" if old.batch_id else "key"
            before_status = old.status if old.batch_id else None
        return OrderChange(
            op, row.order_id, row.batch_id, row.customer_id, self._amount(topic, row, schema),
            source.txId, source.lsn, snapshot, source.ts_ms, payload.ts_ms, row.status,
            row.updated_at, unavailable(row.note), before, before_status,
        )  # fmt: skip

    def _amount(self, topic: str, row: OrderRow, schema: msgspec.Raw) -> Decimal | None:
        scale = self.default_scale
        if schema and isinstance(row.amount, str):
            scale = self._scale_of(schema)
        try:
            return decode_amount(row.amount, self.decimal_mode, scale)
        except (ValueError, ArithmeticError) as exc:
            raise DebeziumFormatError(
                topic, f"order {row.order_id}: amount {row.amount!r} is not a decimal ({exc})"
            ) from None

    def decode_order_key(self, key: bytes | None, topic: str = "") -> int | None:
        """The order id an orders record's key names (a tombstone's: the deleted order), in
        either converter form; None without a key."""
        if key is None:
            return None
        try:
            document = self._key.decode(key)
        except msgspec.DecodeError as exc:
            raise DebeziumFormatError(
                topic or self.orders_topic,
                f"record key {bytes(key[:40])!r} is not an orders key ({exc})",
            ) from None
        if document.payload is not None:
            return document.payload.order_id
        if document.order_id is None:
            raise DebeziumFormatError(
                topic or self.orders_topic, f"record key {bytes(key[:40])!r} has no order_id"
            )
        return document.order_id

    def decode_ledger(self, value: bytes | None, topic: str = "") -> LedgerChange | Truncate | None:
        if value is None:
            return None
        topic = topic or self.ledger_topic
        payload, _ = self._ledger.read(topic, value)
        if payload is None:
            return None
        op, source = op_and_source(topic, payload.op, payload.source)
        if op == "t":
            return Truncate(self.ledger_collection, source.txId, source.lsn, source.ts_ms)
        row = payload.before if op == "d" else payload.after
        if row is None:
            raise DebeziumFormatError(topic, f"op {op} without its {row_name(op)} row")
        return LedgerChange(
            op,
            row.batch_id,
            row.status,
            row.row_count,
            row.first_order_id,
            lsn_value(topic, row.start_lsn),
            lsn_value(topic, row.end_lsn),
            xid_value(topic, row.xid),
            source.txId,
            source.lsn,
            op == "r" or is_snapshot(source.snapshot),
            source.ts_ms,
            payload.ts_ms,
        )

    def decode_transaction(self, value: bytes | None, topic: str = "") -> TransactionEvent | None:
        if value is None:
            return None
        topic = topic or self.transaction_topic
        payload, _ = self._tx.read(topic, value)
        if payload is None:
            return None
        status: Literal["BEGIN", "END"]
        if payload.status == "BEGIN":
            status = "BEGIN"
        elif payload.status == "END":
            status = "END"
        else:
            raise DebeziumFormatError(
                topic, f"transaction event with status {payload.status!r}, not BEGIN or END"
            )
        if payload.id is None or payload.ts_ms is None:
            raise DebeziumFormatError(topic, f"{status} event without its id or ts_ms")
        xid, _, _ = payload.id.partition(":")
        if not xid.isdigit():
            raise DebeziumFormatError(topic, f"transaction id {payload.id!r} is not <txId>:<lsn>")
        counts = {c.data_collection: c.event_count for c in payload.data_collections or ()}
        return TransactionEvent(
            status, payload.id, int(xid), payload.event_count, counts, payload.ts_ms
        )

    def _scale_of(self, schema: msgspec.Raw) -> int:
        if schema is self._last_schema:
            return self._last_scale
        key = bytes(schema)
        scale = self._scales.get(key)
        if scale is None:
            scale = amount_scale(self._schema.decode(schema), self.default_scale)
            if len(self._scales) > 64:  # schemas change rarely; never grow without bound
                self._scales.clear()
            self._scales[key] = scale
        self._last_schema, self._last_scale = schema, scale
        return scale
