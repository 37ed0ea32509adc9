"""The verifier's side of the database: its slot, its state tables, on a connection of its own.

Not pooled: the verifier holds its slot's verify lock (a session advisory lock) for as long
as it reads. Every method runs named statements from the catalog and translates driver
errors; the verifier never sees a connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from loguru import logger

from cdcfeed.config import DatabaseSettings
from cdcfeed.database.catalog import statements
from cdcfeed.database.connect import close_connection, connect
from cdcfeed.database.errors import describe_error, raise_translated, translated
from cdcfeed.database.names import SCHEMA_LOCK_KEY, Names, quote_ident
from cdcfeed.database.schema import ensure_publication
from cdcfeed.errors import CdcfeedError, UserError

_PREFETCH = 2_000


class VerifySession:
    def __init__(self, conn: asyncpg.Connection, names: Names) -> None:
        self._conn = conn
        self.names = names
        self._statements = statements(names)
        self._q = self._statements.cdc
        self.orders_relation = names.orders_relation
        self.ledger_relation = (names.schema, names.batches)
        self.qualified_batches = self._q.qualified_batches

    @classmethod
    async def open(
        cls, settings: DatabaseSettings, names: Names, *, patient: bool = False
    ) -> VerifySession:
        """A session on a new connection; `patient` as in `connect`."""
        conn = await connect(settings, "cdcfeed verify", patient=patient)
        return cls(conn, names)

    async def close(self) -> None:
        """Closes the connection, and with it the verify lock; never raises."""
        await close_connection(self._conn)

    @asynccontextmanager
    async def transaction(self, isolation: str | None = None) -> AsyncIterator[None]:
        try:
            async with self._conn.transaction(isolation=isolation):  # type: ignore[arg-type]
                yield
        except CdcfeedError:
            raise
        except Exception as exc:
            raise_translated(exc)

    # --- preparing ---------------------------------------------------------------------------

    @translated
    async def create_state(self) -> bool:
        """Creates verify's state tables; False when the database holds no ledger."""
        async with self._conn.transaction():
            await self._conn.execute(self._statements.lock_schema, SCHEMA_LOCK_KEY)
            if await self._conn.fetchval(self._q.ledger_exists, self.qualified_batches) is None:
                return False
            await self._conn.execute(self._q.verify_ddl)
        return True

    @translated
    async def try_lock(self, slot: str) -> bool:
        """Takes the slot's verify lock for the life of the session, if no one holds it."""
        return bool(await self._conn.fetchval(self._q.try_lock, slot))

    @translated
    async def publication(self, publication: str) -> tuple[bool, list[str]] | None:
        """(FOR ALL TABLES?, the tables it covers as schema.table), or None when missing."""
        record = await self._conn.fetchrow(self._q.publication, publication)
        return None if record is None else (record[0], list(record[1]))

    @translated
    async def ensure_publication(self, publication: str) -> bool:
        return await ensure_publication(self._conn, self.names, publication)

    @translated
    async def slot(self, slot: str) -> dict[str, Any] | None:
        record = await self._conn.fetchrow(self._q.slot, slot)
        return None if record is None else dict(record)

    @translated
    async def create_slot(self, slot: str) -> bool:
        """Creates a pgoutput slot and forgets what an earlier slot of its name saw; False
        when another verify created it meanwhile."""
        try:
            await self._conn.fetchval(self._q.create_slot, slot)
        except asyncpg.DuplicateObjectError:
            return False
        except asyncpg.ObjectNotInPrerequisiteStateError as exc:
            raise UserError(
                "cdc.verify_slot",
                f"cannot create a logical slot ({describe_error(exc)}); the server needs "
                "wal_level=logical and a free max_replication_slots entry",
            ) from None
        except asyncpg.InsufficientPrivilegeError as exc:
            raise UserError(
                "database.dsn",
                f"the role may not create replication slots ({describe_error(exc)}); "
                "it needs the REPLICATION attribute",
            ) from None
        # A new slot starts a new proof: what an earlier slot of this name saw is void.
        async with self._conn.transaction():
            for statement in self._q.forget_slot:
                await self._conn.execute(statement, slot)
        logger.info(f"created replication slot {slot} (pgoutput) for verify")
        return True

    @translated
    async def progress(self, slot: str) -> tuple[int, int, int, list[int]] | None:
        """(scope, position, checked, waiting) of the slot's verification, if started."""
        record = await self._conn.fetchrow(self._q.progress, slot)
        return None if record is None else (record[0], record[1], record[2], list(record[3]))

    @translated
    async def start_progress(self, slot: str, publication: str, lsn: int) -> None:
        await self._conn.execute(self._q.start_progress, slot, publication, lsn)

    # --- reading the stream ------------------------------------------------------------------

    @translated
    async def flush_lsn(self) -> int:
        lsn: int = await self._conn.fetchval(self._q.flush_lsn)
        return lsn

    @translated
    async def insert_lsn(self) -> int:
        lsn: int = await self._conn.fetchval(self._q.insert_lsn)
        return lsn

    async def changes(
        self, slot: str, upto: int, limit: int, publication: str
    ) -> AsyncGenerator[bytes, None]:
        """The slot's pgoutput messages up to `upto` (whole transactions, about `limit`),
        peeked, not consumed. Inside a `transaction()`: the cursor needs one."""
        try:
            await self._conn.execute(self._q.no_statement_timeout)
            # pgoutput reads publication_names as a list of identifiers: unquoted, MyPub
            # would be mypub, and a comma or a quote would split or break it.
            names = quote_ident(publication)
            async for record in self._conn.cursor(
                self._q.peek, slot, upto, limit, names, prefetch=_PREFETCH
            ):
                yield record[0]
        except CdcfeedError:
            raise
        except Exception as exc:
            raise_translated(exc)

    @translated
    async def record_pending(self, slot: str, rows: Sequence[tuple[int, ...]]) -> None:
        await self._conn.executemany(self._q.record_pending, [(slot, *row) for row in rows])

    @translated
    async def record_pending_changes(
        self, slot: str, rows: Sequence[tuple[int, int, int, int, dict[str, Any]]]
    ) -> None:
        """(batch_id, commit_lsn, commit_end_lsn, xid, what it changed) per transaction."""
        await self._conn.executemany(
            self._q.record_pending_changes,
            [(slot, *row[:4], json.dumps(row[4])) for row in rows],
        )

    @translated
    async def record_stream_violation(
        self, slot: str, batch_id: int | None, xid: int | None, commit_lsn: int, reason: str
    ) -> None:
        await self._conn.execute(
            self._q.record_stream_violation, slot, batch_id, xid, commit_lsn, reason
        )

    @translated
    async def set_position(self, slot: str, position: int, publication: str) -> None:
        await self._conn.execute(self._q.set_position, slot, position, publication)

    @translated
    async def advance_slot(self, slot: str, position: int) -> None:
        await self._conn.fetchval(self._q.advance_slot, slot, position)

    # --- verdicts ----------------------------------------------------------------------------

    @translated
    async def in_progress_since(self, scope: int) -> list[int]:
        return list(await self._conn.fetchval(self._q.in_progress_since, scope))

    @translated
    async def ready_pending(self, slot: str, limit: int) -> list[dict[str, Any]]:
        return [
            _with_change_ids(dict(r))
            for r in await self._conn.fetch(self._q.ready_pending, slot, limit)
        ]

    @translated
    async def pending_changes_of(
        self, slot: str, batch_ids: list[int]
    ) -> list[tuple[int, dict[str, Any]]]:
        """(batch_id, what it changed) per transaction, as `record_pending_changes` took it."""
        records = await self._conn.fetch(self._q.pending_changes_of, slot, batch_ids)
        return [(r["batch_id"], json.loads(r["changes"])) for r in records]

    @translated
    async def pending_of(self, slot: str, batch_ids: list[int]) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(self._q.pending_of, slot, batch_ids)]

    @translated
    async def drop_pending(self, slot: str, batch_ids: list[int]) -> None:
        for statement in self._q.drop_pending:
            await self._conn.execute(statement, slot, batch_ids)

    @translated
    async def record_verdict(
        self,
        slot: str,
        batch_id: int,
        status: str | None,
        result: str,
        rows: int,
        xid: int | None,
        commit_lsn: int | None,
        reason: str | None,
        changes: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> None:
        """`changes`: updated, deleted, unchanged and resolved TOAST values (the change mix)."""
        await self._conn.execute(
            self._q.record_verdict,
            slot,
            batch_id,
            status,
            result,
            rows,
            xid,
            commit_lsn,
            reason,
            *changes,
        )

    @translated
    async def amend_verdict(self, verdict_id: int, reason: str) -> None:
        await self._conn.execute(self._q.amend_verdict, verdict_id, reason)

    @translated
    async def unobserved(
        self, slot: str, scope: int, checked: int, waiting: list[int], position: int, limit: int
    ) -> list[tuple[int, str, int, int | None, int | None]]:
        """Settled batches the stream did not carry: (batch_id, status, row_count, end_lsn,
        updates and deletes of a batch of the change mix, None for an insert-only one)."""
        records = await self._conn.fetch(
            self._q.unobserved, slot, scope, checked, waiting, position, limit
        )
        out = []
        for r in records:
            mixed = r["updated_ids"] is not None or r["deleted_ids"] is not None
            changes = (r["updated"] or 0) + (r["deleted"] or 0) if mixed else None
            out.append((r[0], r[1], r[2], r[3], changes))
        return out

    @translated
    async def set_checked(self, slot: str, position: int, waiting: list[int]) -> None:
        await self._conn.execute(self._q.set_checked, slot, position, waiting)

    # --- the report --------------------------------------------------------------------------

    @translated
    async def totals(self, slot: str) -> dict[str, int]:
        record = await self._conn.fetchrow(self._q.totals, slot)
        assert record is not None
        return dict(record)

    @translated
    async def waiting(self, slot: str, checked: int, scope: int, waiting: list[int]) -> int:
        count: int = await self._conn.fetchval(self._q.waiting, slot, checked, scope, waiting)
        return count

    @translated
    async def changed_batches(self, slot: str, limit: int) -> list[dict[str, Any]]:
        """The latest verdicts of batches that updated or deleted, newest first."""
        return [dict(r) for r in await self._conn.fetch(self._q.changed_batches, slot, limit)]

    @translated
    async def violations(self, slot: str, limit: int) -> list[tuple[int | None, str]]:
        records = await self._conn.fetch(self._q.violations, slot, limit)
        return [(r["batch_id"], r["reason"]) for r in records]


def _with_change_ids(row: dict[str, Any]) -> dict[str, Any]:
    """The ledger's updated_ids and deleted_ids (JSON, see `_CHANGE_COLUMNS`) as lists."""
    for key in ("updated_ids", "deleted_ids"):
        value = row.get(key)
        row[key] = None if value is None else json.loads(value)
    return row
