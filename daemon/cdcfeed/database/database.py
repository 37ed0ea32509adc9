"""`Database`: the pool, the statement catalog and the translation of driver errors, in one.

Callers ask for what they mean (reserve ids, settle a batch, renew a lease); every method
borrows a pooled connection for its statements and gives it back. Driver errors leave as
`DatabaseUnavailable` (retry), `DatabaseRefused` (the server said no), or as themselves
(a bug).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Literal, TypeVar

import asyncpg

from cdcfeed.config import DatabaseSettings
from cdcfeed.database.catalog import Statements, statements
from cdcfeed.database.connect import close_pool, create_pool
from cdcfeed.database.errors import describe_error, raise_translated, translated
from cdcfeed.database.ledger import (
    Allocation,
    Changes,
    Connection,
    Ledger,
    Settled,
    Settlement,
)
from cdcfeed.database.names import ORDER_COLUMNS, STAGED_COLUMNS, STAGING_TABLE, Names
from cdcfeed.database.privileges import (
    Purpose,
    check_privileges,
    current_role,
    grant_statements,
    lacking,
    missing_relations,
    needs_for,
    schema_relations,
    ungranted,
)
from cdcfeed.database.schema import ensure_publication, init_schema
from cdcfeed.database.server import ServerSettings, read_server_settings
from cdcfeed.database.slots import SlotSnapshot, read_slots
from cdcfeed.errors import BatchAborted, CdcfeedError, PrivilegeRefused, SchemaMissing

T = TypeVar("T")

# How long the ROLLBACK after a failed or cancelled COPY may take before the connection is
# closed instead.
ROLLBACK_WAIT_SECONDS = 1.0


class Database:
    def __init__(self, pool: asyncpg.Pool, names: Names) -> None:
        self._pool = pool
        self.names = names
        self._q: Statements = statements(names)
        # Whether batches update and delete (a change mix): what the loading role needs.
        self._changes = False

    @classmethod
    @asynccontextmanager
    async def open(
        cls, settings: DatabaseSettings, names: Names, size: int, application_name: str
    ) -> AsyncIterator[Database]:
        """A pool opened with bounded retries (a UserError when the database stays away),
        closed with a timeout and terminate() as the fallback."""
        pool = await create_pool(settings, size, application_name)
        try:
            yield cls(pool, names)
        finally:
            await close_pool(pool)

    @translated
    async def _run(self, operation: Callable[[Ledger], Awaitable[T]]) -> T:
        async with self._pool.acquire() as conn:
            try:
                return await operation(Ledger(conn, self._q))
            except asyncpg.InsufficientPrivilegeError as exc:
                raise await self._explained(conn, exc) from exc

    async def _explained(self, conn: Connection, exc: BaseException) -> BaseException:
        """A privilege refusal naming what the loading role lacks and the GRANT, when the
        catalog tells (a revoke mid-run, say); the server's own words otherwise."""
        try:
            explained = await check_privileges(
                conn, self.names, "load", describe_error(exc), self._changes
            )
        except Exception:
            explained = None
        return explained or PrivilegeRefused(describe_error(exc))

    # --- the batch protocol ------------------------------------------------------------------

    async def reserve_ids(self, rows: int, batches: int, changes: int = 0) -> list[Allocation]:
        """Step 1: batch ids and order-id blocks for `batches` batches, committed; with
        `changes`, a window of that many order ids to change for each."""
        return await self._run(lambda ledger: ledger.reserve(rows, batches, changes))

    @asynccontextmanager
    async def batch_session(self) -> AsyncIterator[BatchSession]:
        """One pooled connection for steps 3 to 5 of one batch."""
        try:
            async with self._pool.acquire() as conn:
                yield BatchSession(conn, self._q)
        except CdcfeedError:
            raise
        except Exception as exc:
            raise_translated(exc)

    async def fail_batch(self, batch_id: int, error: str, copy_seconds: float | None) -> None:
        await self._run(lambda ledger: ledger.fail_batch(batch_id, error, copy_seconds))

    async def record_unstarted_failure(
        self, allocation: Allocation, instance: str, rows: int, error: str
    ) -> None:
        await self._run(
            lambda ledger: ledger.record_unstarted_failure(allocation, instance, rows, error)
        )

    async def settle(self, batch_id: int, reason: str) -> Settlement:
        """Decides a batch whose COPY outcome is unknown from what the database holds."""
        return await self._run(lambda ledger: ledger.settle(batch_id, reason))

    async def recent_batches(self, limit: int) -> list[dict[str, Any]]:
        return await self._run(lambda ledger: ledger.recent_batches(limit))

    # --- leases ------------------------------------------------------------------------------

    async def register_lease(self, instance: str, duration: float) -> tuple[datetime, bool]:
        return await self._run(lambda ledger: ledger.register_lease(instance, duration))

    async def renew_lease(self, instance: str, duration: float, started_at: datetime) -> datetime:
        return await self._run(lambda ledger: ledger.renew_lease(instance, duration, started_at))

    async def release_lease(self, instance: str, started_at: datetime) -> None:
        await self._run(lambda ledger: ledger.release_lease(instance, started_at))

    async def settle_abandoned(
        self, instance: str, run_started: datetime, *, own: bool = False
    ) -> list[Settled]:
        return await self._run(
            lambda ledger: ledger.settle_abandoned(instance, run_started, own=own)
        )

    # --- health, schema, slots ---------------------------------------------------------------

    @translated
    async def ping(self, timeout: float) -> None:
        """One round trip; DatabaseUnavailable when no answer comes within `timeout`."""
        async with self._pool.acquire(timeout=timeout) as conn:
            await conn.fetchval(self._q.ping, timeout=timeout)

    @translated
    async def expire_connections(self) -> None:
        """Replaces every pooled connection: after an outage, idle ones may point at a
        server that is gone without having said so (failover, partition)."""
        await self._pool.expire_connections()

    @translated
    async def prepare(self, purpose: Purpose, *, create: bool, changes: bool = False) -> bool:
        """Checks, before anything else, that the schema is current and that the role holds
        what `purpose` needs (with `changes`: batches that update and delete); creates or
        upgrades the schema first when it is not current and `create` says so (a current one
        gets no DDL). True when DDL ran.

        SchemaMissing or PrivilegeRefused, each naming what to run, when the role cannot go on.
        """
        self._changes = changes
        async with self._pool.acquire() as conn:
            absent = await missing_relations(conn, self.names)
            created = False
            lacks = (
                "holds no cdcfeed ledger"
                if set(schema_relations(self.names)) <= set(absent)
                else f"lacks {', '.join(absent)}"
            )
            # Only columns missing (`table.column`): tables an older cdcfeed made, which their
            # owner upgrades once; the loading role keeps its grants.
            upgrade = bool(absent) and all("." in name for name in absent)
            upgrading = "upgrade it by running `cdcfeed init-db` once as the schema's owner"
            if upgrade:
                lacks += " (made by an older cdcfeed)"
            if absent and not create:
                creating = (
                    "create it first with `cdcfeed init-db`, as a role that may create in the "
                    "database"
                )
                raise SchemaMissing(
                    f"schema {self.names.schema} {lacks}: {upgrading if upgrade else creating}",
                    "42P01",
                )
            if absent:
                try:
                    created = await init_schema(conn, self.names)
                except asyncpg.InsufficientPrivilegeError as exc:
                    role = await current_role(conn)
                    creating = (
                        "run `cdcfeed init-db` as the schema's owner (or a role with CREATE on "
                        f"the database), then `cdcfeed init-db --grant {role}`"
                    )
                    raise PrivilegeRefused(
                        f"schema {self.names.schema} {lacks}, and role {role} may not create "
                        f"or alter cdcfeed's tables ({describe_error(exc)}): "
                        f"{upgrading if upgrade else creating}"
                    ) from exc
            refused = await check_privileges(conn, self.names, purpose, changes=changes)
            if refused is not None:
                raise refused
            return created

    async def init_schema(self) -> bool:
        """Creates or upgrades the schema unless it is current; True when DDL ran."""
        return await self.prepare("schema", create=True)

    @translated
    async def grant(self, role: str) -> tuple[list[str], str | None]:
        """Grants `role` what loading needs, with any change mix, in one transaction: the
        statements run, and a line naming what `role` still lacks (the server granted
        nothing where this role may not grant) with the GRANTs to run instead, if anything."""
        async with self._pool.acquire() as conn, conn.transaction():
            needs = await needs_for(conn, self.names, "load", True)
            grants = grant_statements(needs, role)
            for statement in grants:
                await conn.execute(statement)
            missing = await lacking(conn, needs, role)
            left = ungranted(role, await current_role(conn), missing) if missing else None
        return grants, left

    @translated
    async def set_replica_identity(self, identity: Literal["default", "full"]) -> None:
        """What the change stream carries of an updated or deleted order's old row."""
        async with self._pool.acquire() as conn:
            await conn.execute(self._q.replica_identity(identity))

    @translated
    async def server_settings(self) -> ServerSettings:
        async with self._pool.acquire() as conn:
            return await read_server_settings(conn)

    @translated
    async def ensure_publication(self, publication: str) -> bool:
        async with self._pool.acquire() as conn:
            return await ensure_publication(conn, self.names, publication)

    @translated
    async def slot_confirmations(self, watched: Sequence[str]) -> dict[str, int | None]:
        """Each watched slot's confirmed_flush_lsn, for `cdcfeed status`."""
        async with self._pool.acquire() as conn:
            slots = await read_slots(conn, self._q, watched)
        return {slot.name: slot.confirmed_flush_lsn for slot in slots}

    @translated
    async def verdicts(self, source: str, batch_ids: Sequence[int]) -> dict[int, str]:
        """A verifier's verdict ("ok" or "violation") on each of these batches it judged."""
        q = self._q.cdc
        async with self._pool.acquire() as conn:
            if await conn.fetchval(q.ledger_exists, q.qualified_results) is None:
                return {}  # never verified in this database
            rows = await conn.fetch(q.batch_verdicts, source, list(batch_ids))
        return {row[0]: row[1] for row in rows}

    @asynccontextmanager
    async def slot_snapshot(self) -> AsyncIterator[SlotSnapshot]:
        """The slots and the ledger in one read-only snapshot."""
        try:
            async with (
                self._pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                yield SlotSnapshot(conn, self._q)
        except CdcfeedError:
            raise
        except Exception as exc:
            raise_translated(exc)


class BatchSession:
    """Steps 3 to 5 of one batch on one connection: four round trips in all (open and
    claim, COPY, commit, complete), one more for a batch that updates or deletes (apply)."""

    def __init__(self, conn: Connection, q: Statements) -> None:
        self._conn = conn
        self._q = q
        self._ledger = Ledger(conn, q)

    @translated
    async def open_batch(
        self,
        allocation: Allocation,
        instance: str,
        rows: int,
        feed_file: str,
        generate_seconds: float,
        write_seconds: float,
        *,
        staged: bool = False,
    ) -> None:
        """Step 3, and the start of step 4, in one round trip: the IN_PROGRESS row with the
        WAL position before it, committed; then the transaction of the COPY, opened by the
        claim of that row (`staged`: for a batch that updates or deletes).

        BatchAborted when a settler decided the batch first: nothing is loaded.
        """
        batch_id = allocation.batch_id
        opened = self._q.open_and_claim(
            batch_id,
            instance,
            rows,
            allocation.first_order_id,
            feed_file,
            generate_seconds,
            write_seconds,
            staged=staged,
        )
        try:
            claimed = await self._conn.execute(opened)
        except BaseException:
            # The claim may have begun its transaction: end it, as after a failed COPY.
            await asyncio.shield(self._end_transaction())
            raise
        if claimed != "UPDATE 1":
            await asyncio.shield(self._end_transaction())
            raise BatchAborted(
                "settled by another instance before its COPY (was this instance's lease lapsing?)"
            )

    @translated
    async def copy(
        self,
        batch_id: int,
        data: bytes,
        timeout: float | None,
        columns: tuple[str, ...] = ORDER_COLUMNS,
    ) -> None:
        """Step 4, in the transaction `open_batch` began: COPY, commit; rolled back whole on
        any failure."""
        q = self._q
        conn = self._conn
        try:
            await conn.copy_to_table(
                q.names.orders,
                # The bytes just written whole to the feed file: the COPY loads the file's
                # content without reading it back through a thread hop per call. A
                # memoryview, because asyncpg takes plain bytes for a file name (buffers are
                # documented sources; the stubs only list paths, files and iterables).
                source=memoryview(data),  # type: ignore[arg-type]
                schema_name=q.names.schema,
                columns=columns,
                format="csv",
                header=True,
                timeout=timeout,
            )
            await conn.execute(q.commit)
        except BaseException:
            # Shielded: shutdown cancels batches, and the transaction must end all the same.
            await asyncio.shield(self._end_transaction())
            raise

    @translated
    async def apply(self, batch_id: int, data: bytes, timeout: float | None) -> Changes:
        """Step 4 of a batch that updates or deletes, in the transaction `open_batch(...,
        staged=True)` began: COPY the staging file into the session's staging table, apply it
        and record in the batch row what it changed (one statement), commit; rolled back whole
        on any failure. One transaction, as a plain batch's COPY: one xid, one commit inside
        the batch's LSN bracket.
        """
        q = self._q
        conn = self._conn
        try:
            await conn.copy_to_table(
                STAGING_TABLE,
                source=memoryview(data),  # type: ignore[arg-type]  # see `copy`
                schema_name="pg_temp",
                columns=STAGED_COLUMNS,
                format="csv",
                header=True,
                timeout=timeout,
            )
            record = await conn.fetchrow(q.apply_changes, batch_id, timeout=timeout)
            await conn.execute(q.commit)
        except BaseException:
            await asyncio.shield(self._end_transaction())
            raise
        assert record is not None  # the claim found the row; it is locked since
        return Changes(record[0], record[1], record[2])

    async def _end_transaction(self) -> None:
        """Rolls back step 4's transaction after a failure, or closes the connection; never
        raises.

        After a cancelled or timed-out COPY, asyncpg first waits for the server to
        acknowledge the cancel (CopyFail and a cancel request), then sends the ROLLBACK. A
        server that does not answer in time (a hung backend) or a lost connection gets the
        connection closed instead, which ends the transaction as surely; the pool replaces it.
        """
        try:
            await self._conn.execute(self._q.rollback, timeout=ROLLBACK_WAIT_SECONDS)
            return
        except Exception:
            pass
        # A connection asyncpg already closed itself is back in the pool; its handle then
        # refuses even this, and there is nothing left to end.
        with contextlib.suppress(asyncpg.InterfaceError):
            self._conn.terminate()

    @translated
    async def complete(
        self, batch_id: int, rows: int, copy_seconds: float
    ) -> tuple[str, str, str] | None:
        """Step 5: COMPLETED; (start LSN, end LSN, xid), or None if a settler decided it
        first."""
        return await self._ledger.complete_batch(batch_id, rows, copy_seconds)
