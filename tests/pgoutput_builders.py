"""pgoutput protocol version 1 messages built by hand with struct, byte by byte as the server
sends them, for tests of the decoder and of what is built on it."""

from __future__ import annotations

import struct

from cdcfeed.proof.slot.pgoutput import UNCHANGED, TupleValue

# A column as (flags, name, type OID, type modifier); a bare name is a bigint, not a key.
ColumnSpec = str | tuple[int, str, int, int]


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: TupleValue) -> bytes:
    out = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        elif isinstance(value, str):
            raw = value.encode()
            out.append(b"t" + struct.pack("!i", len(raw)) + raw)
        else:
            assert isinstance(value, bytes)
            out.append(b"b" + struct.pack("!i", len(value)) + value)
    return b"".join(out)


def begin(xid: int, final_lsn: int = 0, commit_time: int = 0) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, commit_time, xid)


def commit(lsn: int, end: int, commit_time: int = 0, flags: int = 0) -> bytes:
    return b"C" + struct.pack("!BQQq", flags, lsn, end, commit_time)


def relation(
    relation_id: int,
    name: str,
    *columns: ColumnSpec,
    namespace: str = "public",
    identity: str = "d",
) -> bytes:
    body = b""
    for column in columns:
        flags, column_name, type_oid, type_modifier = (
            (0, column, 20, -1) if isinstance(column, str) else column
        )
        body += bytes([flags]) + cstr(column_name) + struct.pack("!Ii", type_oid, type_modifier)
    header = struct.pack("!I", relation_id) + cstr(namespace) + cstr(name)
    return b"R" + header + struct.pack("!BH", ord(identity), len(columns)) + body


def insert(relation_id: int, *new: TupleValue) -> bytes:
    return b"I" + struct.pack("!IB", relation_id, ord("N")) + tuple_data(*new)


def delete(relation_id: int, *old: TupleValue, kind: str = "K") -> bytes:
    return b"D" + struct.pack("!IB", relation_id, ord(kind)) + tuple_data(*old)


def truncate(*relation_ids: int, options: int = 0) -> bytes:
    ids = struct.pack(f"!{len(relation_ids)}I", *relation_ids)
    return b"T" + struct.pack("!IB", len(relation_ids), options) + ids


def update(
    relation_id: int,
    new: tuple[TupleValue, ...],
    old: tuple[TupleValue, ...] | None = None,
    kind: str = "K",
) -> bytes:
    """An Update: the old tuple ('K' key or 'O' whole row) only when given, then the new one."""
    head = b"U" + struct.pack("!I", relation_id)
    if old is not None:
        head += kind.encode() + tuple_data(*old)
    return head + b"N" + tuple_data(*new)
