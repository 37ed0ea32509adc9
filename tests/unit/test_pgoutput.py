"""Tests for the pgoutput (protocol version 1) decoder.

Two kinds of input: messages built by hand with struct, to reach every branch and error,
and `data` rows captured from a real PostgreSQL 15.18 server via
pg_logical_slot_get_binary_changes(..., 'proto_version', '1', 'publication_names', 'pub'),
so the decoder is held to what the server actually sends, not only to our reading of the
docs.
"""

from __future__ import annotations

import dataclasses
import struct
from datetime import UTC, datetime, timedelta

import pytest

from cdcfeed.lsn import int_to_lsn, lsn_to_int
from cdcfeed.proof.slot.pgoutput import (
    PG_EPOCH,
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    PgOutputError,
    Relation,
    Truncate,
    TupleValue,
    Type,
    Unchanged,
    Update,
    decode,
    pg_timestamp_to_datetime,
)
from tests.pgoutput_builders import (
    begin,
    commit,
    cstr,
    delete,
    insert,
    relation,
    truncate,
    tuple_data,
)

# --- builders ---------------------------------------------------------------------------


def micros(moment: datetime) -> int:
    return (moment - PG_EPOCH) // timedelta(microseconds=1)


T0 = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
MIXED: tuple[TupleValue, ...] = ("42", None, UNCHANGED, b"\x00\x01\xff", "", "grüße ☃")

HAND_BUILT: list[tuple[str, bytes, Message]] = [
    (
        "begin",
        begin(4_000_000_000, final_lsn=0x16B374D848, commit_time=micros(T0)),
        Begin(final_lsn=0x16B374D848, commit_time=T0, xid=4_000_000_000),
    ),
    (
        "commit",
        commit(0x100, 0x200, commit_time=micros(T0)),
        Commit(flags=0, commit_lsn=0x100, end_lsn=0x200, commit_time=T0),
    ),
    (
        "origin",
        b"O" + struct.pack("!Q", 0xABCDEF) + cstr("upstream"),
        Origin(commit_lsn=0xABCDEF, name="upstream"),
    ),
    (
        "relation",
        relation(
            16389,
            "orders",
            (1, "order_id", 20, -1),
            (0, "amount", 1700, 655366),
            namespace="sales",
            identity="f",
        ),
        Relation(
            relation_id=16389,
            namespace="sales",
            name="orders",
            replica_identity="f",
            columns=(Column(1, "order_id", 20, -1), Column(0, "amount", 1700, 655366)),
        ),
    ),
    (
        "relation-pg-catalog-no-columns",
        relation(0xFFFFFFFF, "t", namespace="", identity="n"),
        Relation(0xFFFFFFFF, "", "t", "n", ()),
    ),
    (
        "type",
        b"Y" + struct.pack("!I", 16385) + cstr("public") + cstr("mood"),
        Type(type_oid=16385, namespace="public", name="mood"),
    ),
    (
        "insert-all-kinds",
        insert(7, *MIXED),
        Insert(relation_id=7, new=MIXED),
    ),
    (
        "insert-zero-columns",
        insert(7),
        Insert(relation_id=7, new=()),
    ),
    (
        "update-without-old",
        b"U" + struct.pack("!I", 7) + b"N" + tuple_data("1", UNCHANGED),
        Update(relation_id=7, new=("1", UNCHANGED), old=None, old_kind=None),
    ),
    (
        "update-old-key",
        b"U" + struct.pack("!I", 7) + b"K" + tuple_data("1", None) + b"N" + tuple_data("2", "x"),
        Update(relation_id=7, new=("2", "x"), old=("1", None), old_kind="K"),
    ),
    (
        "update-old-full",
        b"U" + struct.pack("!I", 7) + b"O" + tuple_data("1", "a") + b"N" + tuple_data("1", "b"),
        Update(relation_id=7, new=("1", "b"), old=("1", "a"), old_kind="O"),
    ),
    (
        "delete-key",
        delete(7, "3", None),
        Delete(relation_id=7, old=("3", None), old_kind="K"),
    ),
    (
        "delete-full",
        delete(7, "3", b"\x00", kind="O"),
        Delete(relation_id=7, old=("3", b"\x00"), old_kind="O"),
    ),
    (
        "truncate",
        truncate(10, 11, 0xFFFFFFFE, options=1),
        Truncate(options=1, relation_ids=(10, 11, 0xFFFFFFFE)),
    ),
    (
        "message-transactional",
        b"M" + struct.pack("!BQ", 1, 0x5000) + cstr("cdcfeed") + struct.pack("!i", 5) + b"hello",
        LogicalMessage(flags=1, lsn=0x5000, prefix="cdcfeed", content=b"hello"),
    ),
    (
        "message-empty-content",
        b"M" + struct.pack("!BQ", 0, 0x5000) + cstr("") + struct.pack("!i", 0),
        LogicalMessage(flags=0, lsn=0x5000, prefix="", content=b""),
    ),
]


# Captured from PostgreSQL 15.18. Schema: orders(order_id bigint pk, batch_id bigint,
# customer_id int, amount numeric(10,2), created_at timestamptz, note text, m mood) where
# mood is an enum; full_t(id int pk, v text) with REPLICA IDENTITY FULL;
# "Odd Schema Tab"(id int pk, "ü col" varchar(20)); big(id int pk, n int, doc text
# STORAGE EXTERNAL).
COMMIT_TIME = datetime(2026, 11, 25, 17, 25, 4, 350986, tzinfo=UTC)


ORDERS_RELATION = Relation(
    relation_id=16389,
    namespace="public",
    name="orders",
    replica_identity="d",
    columns=(
        Column(1, "order_id", 20, -1),
        Column(0, "batch_id", 20, -1),
        Column(0, "customer_id", 23, -1),
        Column(0, "amount", 1700, 655366),  # numeric(10,2): (10 << 16 | 2) + VARHDRSZ
        Column(0, "created_at", 1184, -1),
        Column(0, "note", 25, -1),
        Column(0, "m", 16385, -1),
    ),
)
ORDER_41 = ("41", "7", "100", "12.34", "2024-01-02 03:04:05.678901+00", None, "happy")
ORDER_42 = ("42", *ORDER_41[1:])

REAL_SERVER: list[tuple[str, str, Message]] = [
    (
        "begin",
        "42000000000153ef600003041be053d70a000002e4",
        Begin(final_lsn=lsn_to_int("0/153EF60"), commit_time=COMMIT_TIME, xid=740),
    ),
    (
        "type",
        "59000040017075626c6963006d6f6f6400",
        Type(type_oid=16385, namespace="public", name="mood"),
    ),
    (
        "relation-orders",
        "52000040057075626c6963006f726465727300640007016f726465725f69640000000014ffffffff0062"
        "617463685f69640000000014ffffffff00637573746f6d65725f69640000000017ffffffff00616d6f75"
        "6e7400000006a4000a000600637265617465645f617400000004a0ffffffff006e6f74650000000019ff"
        "ffffff006d0000004001ffffffff",
        ORDERS_RELATION,
    ),
    (
        "insert-order",
        "49000040054e0007740000000234317400000001377400000003313030740000000531322e3334740000"
        "001d323032342d30312d30322030333a30343a30352e3637383930312b30306e74000000056861707079",
        Insert(relation_id=16389, new=ORDER_41),
    ),
    (
        "update-key-change",
        "55000040054b0007740000000234316e6e6e6e6e6e4e00077400000002343274000000013774000000033130"
        "30740000000531322e3334740000001d323032342d30312d30322030333a30343a30352e3637383930312b"
        "30306e74000000056861707079",
        Update(
            relation_id=16389,
            new=ORDER_42,
            old=("41", None, None, None, None, None, None),
            old_kind="K",
        ),
    ),
    (
        "delete-key",
        "44000040054b0007740000000234326e6e6e6e6e6e",
        Delete(relation_id=16389, old=("42", None, None, None, None, None, None), old_kind="K"),
    ),
    (
        "commit",
        "4300000000000153ef60000000000153ef900003041be053d70a",
        Commit(
            flags=0,
            commit_lsn=lsn_to_int("0/153EF60"),
            end_lsn=lsn_to_int("0/153EF90"),
            commit_time=COMMIT_TIME,
        ),
    ),
    (
        "relation-replica-identity-full",
        "520000400c7075626c69630066756c6c5f74006600020169640000000017ffffffff017600000000"
        "19ffffffff",
        Relation(16396, "public", "full_t", "f", (Column(1, "id", 23, -1), Column(1, "v", 25, -1))),
    ),
    (
        "update-old-full",
        "550000400c4f00027400000001317400000001614e0002740000000131740000000162",
        Update(relation_id=16396, new=("1", "b"), old=("1", "a"), old_kind="O"),
    ),
    (
        "delete-old-full-with-null",
        "440000400c4f00027400000001326e",
        Delete(relation_id=16396, old=("2", None), old_kind="O"),
    ),
    (
        "relation-quoted-utf8-varchar",
        "52000040137075626c6963004f646420536368656d6120546162006400020169640000000017ffffffff"
        "00c3bc20636f6c000000041300000018",
        Relation(
            16403,
            "public",
            "Odd Schema Tab",
            "d",
            (Column(1, "id", 23, -1), Column(0, "ü col", 1043, 24)),
        ),
    ),
    (
        "insert-utf8",
        "49000040134e0002740000000131740000000b6772c3bcc39f6520e29883",
        Insert(relation_id=16403, new=("1", "grüße ☃")),
    ),
    (
        "truncate-restart-identity-cascade",
        "5400000002030000400c00004013",
        Truncate(options=3, relation_ids=(16396, 16403)),
    ),
    (
        "origin",
        "4f0000000000abcdef757073747265616d00",
        Origin(commit_lsn=lsn_to_int("0/ABCDEF"), name="upstream"),
    ),
    (
        "message-transactional",
        "4d0100000000015349d063646366656564000000000568656c6c6f",
        LogicalMessage(flags=1, lsn=lsn_to_int("0/15349D0"), prefix="cdcfeed", content=b"hello"),
    ),
    (
        "message-non-transactional",
        "4d000000000001534a406e6f6e7478000000000200ff",
        LogicalMessage(flags=0, lsn=lsn_to_int("0/1534A40"), prefix="nontx", content=b"\x00\xff"),
    ),
    (
        "insert-binary-option",
        "490000400c4e0002620000000400000008620000000362696e",
        Insert(relation_id=16396, new=(b"\x00\x00\x00\x08", b"bin")),
    ),
    (
        "update-unchanged-toast",
        "550000401f4e000374000000013174000000013175",
        Update(relation_id=16415, new=("1", "1", UNCHANGED)),
    ),
]

ALL_MESSAGES: list[tuple[str, bytes, Message]] = HAND_BUILT + [
    (f"real-{name}", bytes.fromhex(hexdata), expected) for name, hexdata, expected in REAL_SERVER
]
_IDS = [name for name, _, _ in ALL_MESSAGES]


# --- decoding ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "expected"), ALL_MESSAGES, ids=_IDS)
def test_decodes(name: str, data: bytes, expected: Message) -> None:
    assert decode(data) == expected


@pytest.mark.parametrize(("name", "data", "expected"), ALL_MESSAGES, ids=_IDS)
def test_accepts_memoryview_and_bytearray(name: str, data: bytes, expected: Message) -> None:
    padded = memoryview(b"xx" + data + b"yy")[2:-2]
    assert decode(padded) == expected
    assert decode(bytearray(data)) == expected


def test_value_types() -> None:
    message = decode(HAND_BUILT[6][1])
    assert isinstance(message, Insert)
    number, null, unchanged, binary, empty, text = message.new
    assert type(number) is str
    assert null is None
    assert unchanged is UNCHANGED
    assert isinstance(unchanged, Unchanged)
    assert type(binary) is bytes
    assert empty == ""
    assert text == "grüße ☃"
    assert repr(UNCHANGED) == "UNCHANGED"


def test_commit_time_is_aware_utc() -> None:
    message = decode(HAND_BUILT[0][1])
    assert isinstance(message, Begin)
    assert message.commit_time.tzinfo is UTC
    assert pg_timestamp_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_timestamp_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def test_infinite_timestamp_is_rejected() -> None:
    data = b"B" + struct.pack("!QqI", 1, 2**63 - 1, 1)
    with pytest.raises(PgOutputError, match="out of range"):
        decode(data)


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate_flags(options: int, cascade: bool, restart: bool) -> None:
    message = decode(b"T" + struct.pack("!IBI", 1, options, 99))
    assert message == Truncate(options, (99,))
    assert isinstance(message, Truncate)
    assert message.cascade is cascade
    assert message.restart_identity is restart


def test_truncate_zero_relations() -> None:
    assert decode(b"T" + struct.pack("!IB", 0, 0)) == Truncate(0, ())


def test_message_transactional_flag() -> None:
    assert LogicalMessage(1, 0, "p", b"").transactional
    assert not LogicalMessage(0, 0, "p", b"").transactional


def test_relation_helpers() -> None:
    assert ORDERS_RELATION.column_names[:2] == ("order_id", "batch_id")
    assert [c.is_key for c in ORDERS_RELATION.columns] == [True] + [False] * 6
    row = ORDERS_RELATION.as_dict(ORDER_41)
    assert row["batch_id"] == "7"
    assert row["note"] is None
    with pytest.raises(PgOutputError, match=r"2 columns but relation public\.orders"):
        ORDERS_RELATION.as_dict(("1", "2"))


def test_messages_are_frozen_with_slots() -> None:
    message = decode(HAND_BUILT[0][1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.xid = 1  # type: ignore[misc, union-attr]
    assert not hasattr(message, "__dict__")
    assert hash(message) == hash(decode(HAND_BUILT[0][1]))


# --- errors -----------------------------------------------------------------------------


def test_error_is_an_exception() -> None:
    assert issubclass(PgOutputError, Exception)


@pytest.mark.parametrize("tag", [b"X", b"\x00", b"\xff", b"n", b"k", b"w"])
def test_unknown_message_type(tag: bytes) -> None:
    with pytest.raises(PgOutputError, match="unknown pgoutput message type"):
        decode(tag + b"\x00" * 32)


@pytest.mark.parametrize("tag", [b"S", b"E", b"c", b"A", b"b", b"P", b"K", b"r", b"p"])
def test_newer_protocol_message_type_is_named(tag: bytes) -> None:
    with pytest.raises(PgOutputError, match=r"protocol version [23]"):
        decode(tag + b"\x00" * 32)


def test_empty_input() -> None:
    with pytest.raises(PgOutputError, match="empty"):
        decode(b"")


@pytest.mark.parametrize(("name", "data", "expected"), ALL_MESSAGES, ids=_IDS)
def test_every_truncation_is_rejected(name: str, data: bytes, expected: Message) -> None:
    for cut in range(1, len(data)):
        with pytest.raises(PgOutputError, match="truncated"):
            decode(data[:cut])


@pytest.mark.parametrize(("name", "data", "expected"), ALL_MESSAGES, ids=_IDS)
def test_trailing_bytes_are_rejected(name: str, data: bytes, expected: Message) -> None:
    with pytest.raises(PgOutputError, match="trailing"):
        decode(data + b"\x00")


def test_unknown_tuple_kind() -> None:
    data = b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!H", 2) + b"n" + b"x"
    with pytest.raises(PgOutputError, match="unknown TupleData kind 'x' for column 1 at offset 9"):
        decode(data)


def test_negative_value_length() -> None:
    data = b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!H", 1) + b"t" + struct.pack("!i", -1)
    with pytest.raises(PgOutputError, match="negative length -1"):
        decode(data)


def test_negative_message_content_length() -> None:
    data = b"M" + struct.pack("!BQ", 0, 1) + cstr("p") + struct.pack("!i", -5)
    with pytest.raises(PgOutputError, match="negative length -5"):
        decode(data)


def test_huge_value_length_is_truncation() -> None:
    data = (
        b"I"
        + struct.pack("!I", 7)
        + b"N"
        + struct.pack("!H", 1)
        + b"b"
        + struct.pack("!i", 2**31 - 1)
    )
    with pytest.raises(PgOutputError, match="truncated"):
        decode(data + b"abc")


def test_invalid_utf8_text_value() -> None:
    data = b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!H", 1) + b"t" + struct.pack("!i", 1)
    with pytest.raises(PgOutputError, match="not valid UTF-8"):
        decode(data + b"\xff")


def test_invalid_utf8_name() -> None:
    with pytest.raises(PgOutputError, match="not valid UTF-8"):
        decode(b"Y" + struct.pack("!I", 1) + b"\xc3\0" + cstr("t"))


@pytest.mark.parametrize(
    "data",
    [
        b"I" + struct.pack("!I", 7) + b"K" + tuple_data("1"),
        b"U" + struct.pack("!I", 7) + b"X" + tuple_data("1"),
        b"U" + struct.pack("!I", 7) + b"K" + tuple_data("1") + b"K" + tuple_data("2"),
        b"D" + struct.pack("!I", 7) + b"N" + tuple_data("1"),
    ],
    ids=["insert-not-N", "update-bad-marker", "update-second-not-N", "delete-N"],
)
def test_bad_tuple_marker(data: bytes) -> None:
    with pytest.raises(PgOutputError, match="expected"):
        decode(data)


# --- LSN text ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1", 1),
        ("0/FFFFFFFF", 0xFFFFFFFF),
        ("1/0", 0x100000000),
        ("16/B374D848", 0x16B374D848),
        ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
        ("80000000/0", 2**63),
    ],
)
def test_lsn_round_trip(text: str, value: int) -> None:
    assert lsn_to_int(text) == value
    assert int_to_lsn(value) == text
    assert lsn_to_int(int_to_lsn(value)) == value


def test_lsn_parse_is_case_insensitive_and_accepts_leading_zeros() -> None:
    assert lsn_to_int("16/b374d848") == 0x16B374D848
    assert lsn_to_int("00000016/0000000A") == 0x160000000A


def test_lsn_round_trip_many() -> None:
    value = 1
    for _ in range(200):
        value = (value * 6364136223846793005 + 1442695040888963407) % 2**64
        assert lsn_to_int(int_to_lsn(value)) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0",
        "/",
        "0/",
        "/0",
        "0/0/0",
        "G/0",
        "0x1/0",
        "1/-1",
        " 1/0",
        "1/0 ",
        "1_0/0",
        "+1/0",
        "123456789/0",
        "0/123456789",
        "\uff11/0",
    ],
)
def test_lsn_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        lsn_to_int(text)


@pytest.mark.parametrize("value", [-1, 2**64])
def test_lsn_format_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        int_to_lsn(value)
