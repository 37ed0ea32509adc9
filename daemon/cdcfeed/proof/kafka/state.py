"""The Kafka verifier's durable state, through its database session.

Kept in the ledger's schema under the source name `kafka:<group>`: verdicts in verify's
results table (one per batch, and the violations no batch owns), and per partition the read
position and highest LSN those verdicts account for, with the scope, the low-water mark and
the counters, and the digests of the latest judged batches (digest.py). A judging step stores
all of it in one transaction; only then does the runner commit the consumer's offsets, so a
run stopped anywhere resumes with nothing judged twice and nothing skipped.

A group's state belongs to one pipeline: its first run stores the topic prefix and the orders
topic it reads, and a run of the same group over other topics is refused (its verdicts, read
positions and low-water mark would pass that pipeline's batches over as judged).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from cdcfeed.database import KafkaSession
from cdcfeed.database.kafka_store import UNJUDGED_LIMIT
from cdcfeed.errors import UserError
from cdcfeed.proof.events import Identity, LedgerBatch, Violation
from cdcfeed.proof.kafka.digest import DIGEST_ROWS, Digest
from cdcfeed.proof.kafka.records import Candidate, Judgement
from cdcfeed.proof.kafka.redelivery import JudgedBatch
from cdcfeed.proof.kafka.report import KafkaReport, KafkaTally
from cdcfeed.proof.slot.state import REPORT_VIOLATIONS

Position = tuple[str, int, int, int | None]


class KafkaBusy(UserError):
    """Another verifier holds this group's state."""


class KafkaGroupTaken(UserError):
    """The group's state belongs to another pipeline's topics."""


def source_name(group: str) -> str:
    """The name a Kafka verifier's verdicts are kept under: one proof per consumer group."""
    return f"kafka:{group}"


class KafkaState:
    def __init__(
        self,
        db: KafkaSession,
        group: str,
        topic_prefix: str,
        orders_topic: str,
        digest_rows: int = DIGEST_ROWS,
    ) -> None:
        self.db = db
        self.group = group
        self.topic_prefix = topic_prefix
        self.orders_topic = orders_topic
        self.digest_rows = digest_rows
        self.source = source_name(group)
        self.scope: int | None = None
        self.low_water: int | None = None
        # Whether the last `candidates()` were every unjudged batch in scope (none left out
        # by the query's limit, and a scope to query from).
        self.complete = False

    async def prepare(self) -> None:
        """Creates the state tables when missing, takes the group's verify lock and refuses
        a group whose state belongs to another pipeline's topics."""
        if not await self.db.create_kafka_state(self.source):
            raise UserError(
                "database.dsn",
                f"no cdcfeed ledger ({self.db.qualified_batches}) in this database; "
                "point --dsn at cdcfeed's database or run `cdcfeed init-db`",
            )
        if not await self.db.try_lock(self.source):
            raise KafkaBusy(
                "kafka.group",
                f"another cdcfeed verify is reading with group {self.group}; give this one "
                "its own --group",
            )
        prefix, orders = await self.db.kafka_pipeline(self.source)
        if prefix is not None and (prefix, orders) != (self.topic_prefix, self.orders_topic):
            raise KafkaGroupTaken(
                "kafka.group",
                f"group {self.group} verifies the topics of prefix {prefix} ({orders}), not "
                f"{self.topic_prefix} ({self.orders_topic}): its verdicts and read positions "
                "belong to that pipeline; give this one a group of its own (--group NEW-NAME)",
            )

    async def claim(self) -> None:
        """Once its topics are found: the group verifies this pipeline from now on (a run
        with a mistyped prefix, finding no topics, claims nothing)."""
        await self.db.claim_pipeline(self.source, self.topic_prefix, self.orders_topic)

    async def resume(self) -> list[Position]:
        """The stored read positions; loads the scope and the low-water mark."""
        progress = await self.db.kafka_progress(self.source)
        self.scope, self.low_water = progress["scope_lsn"], progress["low_water"]
        return await self.db.kafka_positions(self.source)

    async def lookup(self, batch_ids: set[int]) -> dict[int, JudgedBatch]:
        """Which of these batches were judged before (by an earlier run)."""
        found = await self.db.judged_among(self.source, sorted(batch_ids))
        return {
            r["batch_id"]: JudgedBatch(
                LedgerBatch.from_row(r),
                r["rows"],
                None if r["digest"] is None else Digest.from_bytes(r["digest"]),
            )
            for r in found
        }

    async def judged_xids(self, changes: dict[int, int]) -> dict[int, LedgerBatch]:
        """Which of these transactions (32-bit xid -> the LSN of one of its changes) ran
        batches judged before (by an earlier run)."""
        found = await self.db.judged_by_xid(self.source, sorted(changes.items()))
        return {
            batch.xid & 0xFFFF_FFFF: batch
            for r in found
            if (batch := LedgerBatch.from_row(r)) is not None and batch.xid is not None
        }

    async def identity(self) -> tuple[Identity, int]:
        """The replica identity of orders now (DEFAULT when the table is missing), and the
        WAL position it was read at."""
        found, at_lsn = await self.db.replica_identity()
        return (cast(Identity, found) if found in ("d", "f", "n", "i") else "d"), at_lsn

    async def candidates(self, held: Iterable[int], scope: int | None) -> list[Candidate]:
        """The ledger rows of the batches held in memory, and of the batches in scope that
        are not judged yet."""
        rows = {r["batch_id"]: r for r in await self.db.ledger_rows(sorted(held))}
        since = _since(scope, self.low_water)
        self.complete = False
        if since is not None:
            unjudged = await self.db.unjudged(self.source, since)
            self.complete = len(unjudged) < UNJUDGED_LIMIT
            for r in unjudged:
                rows.setdefault(r["batch_id"], r)
        return [
            Candidate(batch, r["completed_at"])
            for r in rows.values()
            if (batch := LedgerBatch.from_row(r)) is not None
        ]

    async def store(self, judged: Judgement, positions: list[Position], scope: int | None) -> None:
        """The verdicts, the violations and how far the topics were read, in one transaction."""
        db = self.db
        async with db.transaction():
            for verdict in judged.verdicts:
                await db.record_verdict(self.source, *verdict.stored)
            for amendment in judged.amendments:
                assert amendment.batch_id is not None
                await db.amend(self.source, amendment.batch_id, amendment.reason)
            for event in judged.events:
                await db.record_stream_violation(
                    self.source, event.batch_id, event.xid, event.commit_lsn, event.reason
                )
            if judged.digests:
                await db.save_digests(
                    self.source,
                    [(b, len(digest), digest.to_bytes()) for b, digest in judged.digests],
                    self.digest_rows,
                )
            low_water = self.low_water
            since = _since(scope, low_water)
            if since is not None:
                low_water = await db.next_low_water(self.source, since) or low_water
            await db.save_kafka_progress(
                self.source,
                positions,
                scope,
                low_water,
                (
                    judged.duplicates,
                    judged.snapshot_events,
                    judged.tombstones,
                    judged.updated,
                    judged.deleted,
                    judged.unchanged_toast,
                ),
            )
        self.scope, self.low_water = scope, low_water

    async def report(
        self,
        run: KafkaTally,
        pending: int,
        oldest_pending: float | None,
        limit: int = REPORT_VIOLATIONS,
    ) -> KafkaReport:
        db = self.db
        totals = await db.totals(self.source)
        progress = await db.kafka_progress(self.source)
        violations = [
            Violation(batch_id, reason)
            for batch_id, reason in await db.violations(self.source, limit)
        ]
        return KafkaReport(
            group=self.group,
            topic_prefix=self.topic_prefix,
            batches=totals["batches"],
            completed=totals["completed"],
            failed=totals["failed"],
            rows=totals["rows"],
            pending=pending,
            oldest_pending_seconds=None if oldest_pending is None else round(oldest_pending, 1),
            duplicates=progress["duplicates"],
            snapshot_events=progress["snapshot_events"],
            updated=progress["updated"],
            deleted=progress["deleted"],
            unchanged_toast=progress["unchanged_toast"],
            violation_count=totals["violations"],
            violations=violations,
            run=run,
        )


def _since(scope: int | None, low_water: int | None) -> int | None:
    if scope is None:
        return None
    return scope if low_water is None else max(scope, low_water)
