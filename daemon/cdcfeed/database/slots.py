"""Replication slots as the slot monitor and `cdcfeed status` read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cdcfeed.database.catalog import Statements
from cdcfeed.database.errors import translated
from cdcfeed.database.ledger import Connection


@dataclass(frozen=True, slots=True)
class SlotState:
    name: str
    active: bool
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    safe_wal_size: int | None
    insert_lsn: int


async def read_slots(conn: Connection, q: Statements, watched: Sequence[str]) -> list[SlotState]:
    """The watched logical slots of this database (every one when `watched` is empty)."""
    query = q.cdc.watched_slots(conn.get_server_version().major)
    return [SlotState(*record) for record in await conn.fetch(query, list(watched))]


class SlotSnapshot:
    """The slots and the ledger in one read-only snapshot, for one poll of the monitor."""

    def __init__(self, conn: Connection, q: Statements) -> None:
        self._conn = conn
        self._q = q.cdc
        self._statements = q

    @translated
    async def slots(self, watched: Sequence[str]) -> list[SlotState]:
        return await read_slots(self._conn, self._statements, watched)

    @translated
    async def in_progress_ids(self) -> list[int]:
        return [record[0] for record in await self._conn.fetch(self._q.in_progress_ids)]

    @translated
    async def unconfirmed(self, confirmed: int) -> int:
        """COMPLETED batches whose end_lsn lies past `confirmed`."""
        count: int = await self._conn.fetchval(self._q.unconfirmed, confirmed)
        return count

    @translated
    async def newly_confirmed(
        self, confirmed: int, previous: int, waiting: list[int]
    ) -> list[float]:
        """Seconds from completion to now of the batches confirmed since `previous`, and of
        those in `waiting` (IN_PROGRESS at the last poll) confirmed by now."""
        rows = await self._conn.fetch(self._q.newly_confirmed, confirmed, previous, waiting)
        return [row[1] for row in rows]
