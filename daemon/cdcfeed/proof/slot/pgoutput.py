"""Decoder for the ``pgoutput`` logical replication protocol, version 1.

Each row that ``pg_logical_slot_get_binary_changes`` (or ``..._peek_...``) returns for a
``pgoutput`` slot carries exactly one protocol message in its ``data`` column;
:func:`decode` turns that into one of the frozen dataclasses of
:mod:`~cdcfeed.proof.slot.pgoutput_messages`, which this module exports too.

``verify`` builds its proof of delivery on this output, so the decoder is strict: an
unknown message type, a truncated message or trailing bytes raise :class:`PgOutputError`
instead of being skipped, because a silently skipped message could hide lost rows.

Reference: PostgreSQL documentation, "Logical Replication Message Formats".
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from cdcfeed.proof.slot.pgoutput_messages import (
    COLUMN_FLAG_KEY,
    MESSAGE_FLAG_TRANSACTIONAL,
    PG_EPOCH,
    TRUNCATE_CASCADE,
    TRUNCATE_RESTART_IDENTITY,
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    OldTupleKind,
    Origin,
    PgOutputError,
    Relation,
    Truncate,
    TupleData,
    TupleValue,
    Type,
    Unchanged,
    Update,
    pg_timestamp_to_datetime,
)

__all__ = [
    "COLUMN_FLAG_KEY",
    "MESSAGE_FLAG_TRANSACTIONAL",
    "PG_EPOCH",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "UNCHANGED",
    "Begin",
    "Column",
    "Commit",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "OldTupleKind",
    "Origin",
    "PgOutputError",
    "Relation",
    "Truncate",
    "TupleData",
    "TupleValue",
    "Type",
    "Unchanged",
    "Update",
    "decode",
    "pg_timestamp_to_datetime",
]

# Network byte order throughout. LSNs, xids and OIDs are unsigned; timestamps, type
# modifiers and lengths are signed on the wire.
_BEGIN: Final = struct.Struct("!QqI")
_COMMIT: Final = struct.Struct("!BQQq")
_U64: Final = struct.Struct("!Q")
_U32: Final = struct.Struct("!I")
_I32: Final = struct.Struct("!i")
_U16: Final = struct.Struct("!H")
_U8: Final = struct.Struct("!B")
_U8_U16: Final = struct.Struct("!BH")
_U32_U8: Final = struct.Struct("!IB")
_U32_I32: Final = struct.Struct("!Ii")
_U8_U64: Final = struct.Struct("!BQ")
_U32_U8_U16: Final = struct.Struct("!IBH")

_NAMES: Final = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
}

# Types a newer protocol version or option would send; named so the error says what
# was misconfigured rather than just "unknown".
_NEWER_PROTOCOL: Final = {
    ord("S"): "Stream Start (protocol version 2)",
    ord("E"): "Stream Stop (protocol version 2)",
    ord("c"): "Stream Commit (protocol version 2)",
    ord("A"): "Stream Abort (protocol version 2)",
    ord("b"): "Begin Prepare (protocol version 3)",
    ord("P"): "Prepare (protocol version 3)",
    ord("K"): "Commit Prepared (protocol version 3)",
    ord("r"): "Rollback Prepared (protocol version 3)",
    ord("p"): "Stream Prepare (protocol version 3)",
}


class _Reader:
    """Cursor over one message. Bounds are checked here so callers never see struct.error."""

    __slots__ = ("buf", "end", "kind", "pos")

    def __init__(self, buf: bytes, kind: str) -> None:
        self.buf = buf
        self.pos = 1
        self.end = len(buf)
        self.kind = kind

    def truncated(self, what: str) -> PgOutputError:
        return PgOutputError(
            f"truncated {self.kind} message: {what} at offset {self.pos} "
            f"runs past the end ({self.end} bytes)"
        )

    def unpack(self, fmt: struct.Struct, what: str) -> tuple[int, ...]:
        pos = self.pos
        if pos + fmt.size > self.end:
            raise self.truncated(what)
        self.pos = pos + fmt.size
        return fmt.unpack_from(self.buf, pos)

    def byte(self, what: str) -> int:
        pos = self.pos
        if pos >= self.end:
            raise self.truncated(what)
        self.pos = pos + 1
        return self.buf[pos]

    def string(self, what: str) -> str:
        pos = self.pos
        nul = self.buf.find(b"\0", pos)
        if nul < 0:
            raise self.truncated(f"{what} (no NUL terminator)")
        self.pos = nul + 1
        return self.text(pos, nul, what)

    def text(self, start: int, stop: int, what: str) -> str:
        # Slicing bytes then decoding measured faster than str(memoryview) for the short
        # values orders carry.
        try:
            return self.buf[start:stop].decode()
        except UnicodeDecodeError as exc:
            raise self.not_utf8(start, what, exc) from None

    def not_utf8(self, start: int, what: str, exc: UnicodeDecodeError) -> PgOutputError:
        return PgOutputError(
            f"{self.kind} message: {what} at offset {start} is not valid UTF-8 ({exc.reason})"
        )

    def take(self, length: int, what: str) -> bytes:
        pos = self.pos
        if length < 0:
            raise PgOutputError(f"{self.kind} message: negative length {length} for {what}")
        if pos + length > self.end:
            raise self.truncated(what)
        self.pos = pos + length
        return self.buf[pos : pos + length]

    def tuple_data(self) -> TupleData:
        # The hot path (one call per changed row): bounds and struct calls are inlined.
        buf = self.buf
        end = self.end
        pos = self.pos
        if pos + 2 > end:
            raise self.truncated("TupleData column count")
        (count,) = _U16.unpack_from(buf, pos)
        pos += 2
        unpack_len = _I32.unpack_from
        values: list[TupleValue] = []
        append = values.append
        for index in range(count):
            if pos >= end:
                self.pos = pos
                raise self.truncated(f"TupleData column {index} kind")
            kind = buf[pos]
            pos += 1
            if kind == 0x74 or kind == 0x62:  # 't' text, 'b' binary
                if pos + 4 > end:
                    self.pos = pos
                    raise self.truncated(f"TupleData column {index} length")
                (length,) = unpack_len(buf, pos)
                pos += 4
                stop = pos + length
                if length < 0 or stop > end:
                    self.pos = pos
                    if length < 0:
                        raise PgOutputError(
                            f"{self.kind} message: negative length {length} "
                            f"for TupleData column {index}"
                        )
                    raise self.truncated(f"TupleData column {index} value of {length} bytes")
                if kind == 0x74:
                    try:
                        append(buf[pos:stop].decode())
                    except UnicodeDecodeError as exc:
                        raise self.not_utf8(pos, f"TupleData column {index}", exc) from None
                else:
                    append(buf[pos:stop])
                pos = stop
            elif kind == 0x6E:  # 'n'
                append(None)
            elif kind == 0x75:  # 'u'
                append(UNCHANGED)
            else:
                self.pos = pos - 1
                raise PgOutputError(
                    f"{self.kind} message: unknown TupleData kind {_show(kind)} "
                    f"for column {index} at offset {pos - 1}"
                )
        self.pos = pos
        return tuple(values)

    def finish(self) -> None:
        if self.pos != self.end:
            raise PgOutputError(
                f"{self.end - self.pos} unexpected trailing byte(s) after {self.kind} message "
                f"at offset {self.pos} (is the slot using proto_version 1?)"
            )


def _show(byte: int) -> str:
    return repr(chr(byte)) if 0x20 <= byte < 0x7F else f"0x{byte:02x}"


def _old_kind(reader: _Reader, marker: int, expected: str) -> OldTupleKind:
    if marker == 0x4B:
        return "K"
    if marker == 0x4F:
        return "O"
    reader.pos -= 1
    raise PgOutputError(
        f"{reader.kind} message: expected {expected} at offset {reader.pos}, got {_show(marker)}"
    )


def _begin(r: _Reader) -> Begin:
    final_lsn, ts, xid = r.unpack(_BEGIN, "Begin body")
    return Begin(final_lsn, pg_timestamp_to_datetime(ts), xid)


def _commit(r: _Reader) -> Commit:
    flags, commit_lsn, end_lsn, ts = r.unpack(_COMMIT, "Commit body")
    return Commit(flags, commit_lsn, end_lsn, pg_timestamp_to_datetime(ts))


def _origin(r: _Reader) -> Origin:
    (lsn,) = r.unpack(_U64, "origin commit LSN")
    return Origin(lsn, r.string("origin name"))


def _relation(r: _Reader) -> Relation:
    (relation_id,) = r.unpack(_U32, "relation id")
    namespace = r.string("namespace")
    name = r.string("relation name")
    replident, count = r.unpack(_U8_U16, "replica identity and column count")
    columns = []
    for index in range(count):
        flags = r.byte(f"column {index} flags")
        column_name = r.string(f"column {index} name")
        type_oid, type_modifier = r.unpack(_U32_I32, f"column {index} type")
        columns.append(Column(flags, column_name, type_oid, type_modifier))
    return Relation(relation_id, namespace, name, chr(replident), tuple(columns))


def _type(r: _Reader) -> Type:
    (type_oid,) = r.unpack(_U32, "type OID")
    namespace = r.string("type namespace")
    return Type(type_oid, namespace, r.string("type name"))


def _insert(r: _Reader) -> Insert:
    relation_id, marker = r.unpack(_U32_U8, "relation id and new tuple marker")
    if marker != 0x4E:  # 'N'
        r.pos -= 1
        raise PgOutputError(f"Insert message: expected 'N' at offset {r.pos}, got {_show(marker)}")
    return Insert(relation_id, r.tuple_data())


def _update(r: _Reader) -> Update:
    relation_id, marker = r.unpack(_U32_U8, "relation id and tuple marker")
    old: TupleData | None = None
    old_kind: OldTupleKind | None = None
    if marker != 0x4E:  # 'N'
        old_kind = _old_kind(r, marker, "'K', 'O' or 'N'")
        old = r.tuple_data()
        marker = r.byte("new tuple marker")
        if marker != 0x4E:
            r.pos -= 1
            raise PgOutputError(
                f"Update message: expected 'N' at offset {r.pos}, got {_show(marker)}"
            )
    return Update(relation_id, r.tuple_data(), old, old_kind)


def _delete(r: _Reader) -> Delete:
    relation_id, marker = r.unpack(_U32_U8, "relation id and old tuple marker")
    old_kind = _old_kind(r, marker, "'K' or 'O'")
    return Delete(relation_id, r.tuple_data(), old_kind)


def _truncate(r: _Reader) -> Truncate:
    count, options = r.unpack(_U32_U8, "relation count and options")
    size = 4 * count
    if r.pos + size > r.end:
        raise r.truncated(f"{count} relation ids")
    ids = struct.unpack_from(f"!{count}I", r.buf, r.pos)
    r.pos += size
    return Truncate(options, ids)


def _message(r: _Reader) -> LogicalMessage:
    flags, lsn = r.unpack(_U8_U64, "flags and LSN")
    prefix = r.string("prefix")
    (length,) = r.unpack(_I32, "content length")
    return LogicalMessage(flags, lsn, prefix, r.take(length, "content"))


_DECODERS: Final[dict[int, Callable[[_Reader], Message]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
}


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode one pgoutput protocol version 1 message.

    Raises :class:`PgOutputError` for an empty, truncated or malformed message, for an
    unknown message type, and for bytes left over after the message.
    """
    # bytes gives find() for NUL-terminated strings and zero-copy unpack_from; asyncpg
    # already hands bytea over as bytes, so this copies only for other buffers.
    buf = data if type(data) is bytes else bytes(data)
    if not buf:
        raise PgOutputError("empty pgoutput message")
    tag = buf[0]
    decoder = _DECODERS.get(tag)
    if decoder is None:
        newer = _NEWER_PROTOCOL.get(tag)
        if newer is not None:
            raise PgOutputError(
                f"unsupported pgoutput message type {_show(tag)}: {newer}; "
                "read the slot with proto_version 1 and without streaming or two_phase"
            )
        raise PgOutputError(f"unknown pgoutput message type {_show(tag)}")
    reader = _Reader(buf, _NAMES[tag])
    message = decoder(reader)
    reader.finish()
    return message
