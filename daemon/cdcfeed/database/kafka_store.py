"""The Kafka verifier's side of the database: its verdicts and read positions, on a
connection of its own (it holds the verify lock of its source, `kafka:<group>`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import asyncpg

from cdcfeed.config import DatabaseSettings
from cdcfeed.database.connect import connect
from cdcfeed.database.errors import translated
from cdcfeed.database.kafka_catalog import KafkaStatements
from cdcfeed.database.names import Names
from cdcfeed.database.verify_store import VerifySession

UNJUDGED_LIMIT = 10_000  # ledger rows looked at per pass; more wait for the next


class KafkaSession(VerifySession):
    def __init__(self, conn: asyncpg.Connection, names: Names) -> None:
        super().__init__(conn, names)
        self._k = KafkaStatements(names)

    @classmethod
    async def open_kafka(
        cls, settings: DatabaseSettings, names: Names, *, patient: bool = False
    ) -> KafkaSession:
        conn = await connect(settings, "cdcfeed verify --kafka", patient=patient)
        return cls(conn, names)

    async def create_kafka_state(self, source: str) -> bool:
        """Creates verify's tables and the Kafka verifier's; False without a ledger."""
        if not await self.create_state():
            return False
        await self._create(source)
        return True

    @translated
    async def _create(self, source: str) -> None:
        async with self._conn.transaction():
            await self._conn.execute(self._k.ddl)
            await self._conn.execute(self._k.start, source)

    @translated
    async def kafka_progress(self, source: str) -> dict[str, Any]:
        record = await self._conn.fetchrow(self._k.progress, source)
        assert record is not None, "create_kafka_state first"
        return dict(record)

    @translated
    async def kafka_positions(self, source: str) -> list[tuple[str, int, int, int | None]]:
        records = await self._conn.fetch(self._k.positions, source)
        return [(r[0], r[1], r[2], r[3]) for r in records]

    @translated
    async def judged_among(self, source: str, batch_ids: Sequence[int]) -> list[dict[str, Any]]:
        """The batches among these judged before: batch_id, rows, and their ledger row
        (status None when the ledger lacks the batch)."""
        records = await self._conn.fetch(self._k.judged_among, source, list(batch_ids))
        return [dict(r) for r in records]

    @translated
    async def judged_by_xid(
        self, source: str, changes: Sequence[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        """The batches judged before that ran these transactions, (32-bit xid, the LSN of
        one of its changes), with their ledger rows."""
        xids, lsns = [xid for xid, _ in changes], [lsn for _, lsn in changes]
        records = await self._conn.fetch(self._k.judged_by_xid, source, xids, lsns)
        return [dict(r) for r in records]

    @translated
    async def replica_identity(self) -> tuple[str | None, int]:
        """The replica identity of orders (pg_class.relreplident: d, f, n or i; None when
        the table is missing), and the WAL position it was read at."""
        record = await self._conn.fetchrow(self._k.replica_identity, *self.names.orders_relation)
        assert record is not None
        return record[0], record[1]

    @translated
    async def ledger_rows(self, batch_ids: Sequence[int]) -> list[dict[str, Any]]:
        return [dict(r) for r in await self._conn.fetch(self._k.ledger_rows, list(batch_ids))]

    @translated
    async def unjudged(self, source: str, since: int) -> list[dict[str, Any]]:
        """Ledger rows not judged by `source`, starting at `since` or later, oldest first."""
        records = await self._conn.fetch(self._k.unjudged, source, since, UNJUDGED_LIMIT)
        return [dict(r) for r in records]

    @translated
    async def next_low_water(self, source: str, since: int) -> int | None:
        """Where the low-water mark may move from `since`; None when it stays."""
        low: int | None = await self._conn.fetchval(self._k.next_low_water, source, since)
        if low is None:
            low = await self._conn.fetchval(self._k.last_start, since)
        return low

    @translated
    async def amend(self, source: str, batch_id: int, reason: str) -> None:
        await self._conn.execute(self._k.amend, source, batch_id, reason)

    @translated
    async def save_kafka_progress(
        self,
        source: str,
        positions: Iterable[tuple[str, int, int, int | None]],
        scope: int | None,
        low_water: int | None,
        counts: tuple[int, int, int, int, int, int],
    ) -> None:
        """Read positions and counters (duplicates, snapshot events, tombstones, updated,
        deleted, unchanged TOAST); in the caller's transaction, with the verdicts."""
        rows = [(source, *position) for position in positions]
        if rows:
            await self._conn.executemany(self._k.save_position, rows)
        await self._conn.execute(self._k.save_progress, source, scope, low_water, *counts)

    @translated
    async def kafka_pipeline(self, source: str) -> tuple[str | None, str | None]:
        """The pipeline (topic prefix, orders topic) whose topics `source` verifies; (None,
        None) until a run claims it."""
        record = await self._conn.fetchrow(self._k.pipeline, source)
        assert record is not None, "create_kafka_state first"
        return record[0], record[1]

    @translated
    async def claim_pipeline(self, source: str, topic_prefix: str, orders_topic: str) -> None:
        """Stores the pipeline `source` verifies, unless one is stored."""
        await self._conn.execute(self._k.claim, source, topic_prefix, orders_topic)

    @translated
    async def save_digests(
        self, source: str, digests: Sequence[tuple[int, int, bytes]], keep_rows: int
    ) -> None:
        """Digests of judged batches, (batch_id, rows, digest), in the caller's transaction;
        then forgets the oldest: those of batches before the latest `keep_rows` rows."""
        upto: int = await self._conn.fetchval(self._k.digested, source)
        rows = []
        for batch_id, count, digest in digests:
            upto += count
            rows.append((source, batch_id, upto, digest))
        await self._conn.executemany(self._k.save_digest, rows)
        await self._conn.execute(self._k.prune_digests, source, upto - keep_rows)
