"""The verifier's durable state: what a source read, the verdicts, and how far it has read.

Kept in the ledger's schema, on the verifier's own database session, under one name per
source (today the slot's). What it keeps:

- *progress*: every transaction that commits before `position` has been read and recorded;
  `checked` is the position the last verdicts were given at, `waiting` the batches that were
  IN_PROGRESS then (they are looked at again once settled).
- *pending*: the observations of batches not judged yet. Reading a slot is destructive, so
  what it carried waits here until the ledger settles the batch.
- *results*: one verdict per judged batch, and the violations no batch owns.

A source records a chunk of observations and its new position in one transaction, so a
source lost mid-chunk reads the chunk again and nothing is lost or counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cdcfeed.database import VerifySession
from cdcfeed.errors import UserError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import LedgerBatch, Observation, StreamEvent, Violation
from cdcfeed.proof.judge import Verdict, judge_again, judge_seen, judge_unseen
from cdcfeed.proof.slot.report import Report, Tally

# Batches judged per query: bounds memory when a long outage left many to judge at once.
_JUDGE_BATCH = 1_000
REPORT_VIOLATIONS = 1_000


@dataclass(frozen=True, slots=True)
class Progress:
    scope: int
    position: int
    checked: int
    waiting: list[int]


@dataclass
class Judged:
    """What one judging step decided."""

    verdicts: list[str] = field(default_factory=list)  # "ok" / "violation", one per batch
    found: list[Violation] = field(default_factory=list)
    amended: int = 0  # judged batches found violated later: violations, not new verdicts
    rows: int = 0


class VerifyState:
    """One source's verification state; `source` names it (the slot's name for a slot)."""

    def __init__(self, db: VerifySession, source: str) -> None:
        self.db = db
        self.source = source

    async def create(self) -> None:
        """Creates the state tables when missing; a database without a ledger is refused."""
        if not await self.db.create_state():
            raise UserError(
                "database.dsn",
                f"no cdcfeed ledger ({self.db.qualified_batches}) in this database; "
                "point --dsn at cdcfeed's database or run `cdcfeed init-db`",
            )

    async def start(self, publication: str, position: int) -> None:
        """Starts the proof at `position` unless it was started before."""
        if await self.db.progress(self.source) is None:
            await self.db.start_progress(self.source, publication, position)

    async def progress(self) -> Progress:
        record = await self.db.progress(self.source)
        if record is None:
            raise UserError("cdc.verify_slot", f"verify state of {self.source} vanished")
        return Progress(*record)

    async def record(
        self,
        observations: Sequence[Observation],
        events: Sequence[StreamEvent],
        position: int,
        publication: str,
    ) -> None:
        """What a chunk carried, and the position after it; in the caller's transaction."""
        db = self.db
        if observations:
            await db.record_pending(self.source, [_row(o) for o in observations])
        for event in events:
            await db.record_stream_violation(
                self.source, event.batch_id, event.xid, event.commit_lsn, event.reason
            )
        await db.set_position(self.source, position, publication)

    async def skipped(self, reason: str, position: int, publication: str) -> None:
        """The source moved to `position` without us: a violation no batch owns."""
        async with self.db.transaction():
            await self.db.record_stream_violation(self.source, None, None, position, reason)
            await self.db.set_position(self.source, position, publication)

    async def judge(self, progress: Progress, position: int, hint: str) -> Judged:
        """Verdicts for every batch that can be judged at `position`, stored as they fall.

        `hint` ends the reason of a COMPLETED batch the source read past without any of its
        rows: what, in this source, could explain it.
        """
        db = self.db
        judged = Judged()
        # One snapshot: a batch is either IN_PROGRESS (and waits) or settled (and is judged).
        async with db.transaction(isolation="repeatable_read"):
            waiting = await db.in_progress_since(progress.scope)
            while True:
                ready = await db.ready_pending(self.source, _JUDGE_BATCH)
                if not ready:
                    break
                ids = [r["batch_id"] for r in ready]
                seen: dict[int, list[Observation]] = {i: [] for i in ids}
                for o in await db.pending_of(self.source, ids):
                    seen[o["batch_id"]].append(_observation(o))
                for record in ready:
                    await self._judge_seen(record, seen[record["batch_id"]], judged)
                await db.drop_pending(self.source, ids)
            while True:
                unseen = await db.unobserved(
                    self.source,
                    progress.scope,
                    progress.checked,
                    progress.waiting,
                    position,
                    _JUDGE_BATCH,
                )
                for batch_id, status, row_count, end_lsn in unseen:
                    verdict = judge_unseen(batch_id, status, row_count, end_lsn, hint)
                    await self._store(verdict)
                    judged.verdicts.append(verdict.result)
                    if verdict.violation is not None:
                        judged.found.append(verdict.violation)
                if len(unseen) < _JUDGE_BATCH:
                    break
            await db.set_checked(self.source, position, waiting)
        return judged

    async def _judge_seen(
        self, record: dict[str, Any], observations: list[Observation], judged: Judged
    ) -> None:
        batch_id = record["batch_id"]
        batch = LedgerBatch.from_row(record)
        if record["verdict_id"] is not None:
            amendment = judge_again(batch_id, batch, observations)
            if amendment is not None:
                await self.db.amend_verdict(record["verdict_id"], amendment.reason)
                judged.found.append(amendment)
                judged.amended += 1
            return
        verdict = judge_seen(batch_id, batch, observations)
        await self._store(verdict)
        judged.rows += verdict.rows
        judged.verdicts.append(verdict.result)
        if verdict.violation is not None:
            judged.found.append(verdict.violation)

    async def _store(self, verdict: Verdict) -> None:
        await self.db.record_verdict(self.source, *verdict.stored)

    async def lag_bytes(self) -> int:
        """WAL written since the position the source has been read to."""
        progress = await self.progress()
        insert = await self.db.insert_lsn()
        return max(0, insert - progress.position)

    async def report(self, publication: str, run: Tally, limit: int = REPORT_VIOLATIONS) -> Report:
        db = self.db
        progress = await self.progress()
        totals = await db.totals(self.source)
        waiting = await db.waiting(self.source, progress.checked, progress.scope, progress.waiting)
        violations = [
            Violation(batch_id, reason)
            for batch_id, reason in await db.violations(self.source, limit)
        ]
        return Report(
            slot=self.source,
            publication=publication,
            position=int_to_lsn(progress.position),
            batches=totals["batches"],
            completed=totals["completed"],
            failed=totals["failed"],
            rows=totals["rows"],
            waiting=waiting,
            violation_count=totals["violations"],
            violations=violations,
            run=run,
        )


def _row(o: Observation) -> tuple[int, ...]:
    return (
        o.batch_id,
        o.commit_lsn,
        o.commit_end_lsn,
        o.xid,
        o.rows,
        o.min_order_id,
        o.max_order_id,
        o.sum_order_id,
    )


def _observation(record: dict[str, Any]) -> Observation:
    return Observation(
        batch_id=record["batch_id"],
        commit_lsn=record["commit_lsn"],
        commit_end_lsn=record["commit_end_lsn"],
        xid=record["xid"],
        rows=record["rows"],
        min_order_id=record["min_order_id"],
        max_order_id=record["max_order_id"],
        sum_order_id=int(record["sum_order_id"]),  # numeric: sums outgrow bigint
    )
