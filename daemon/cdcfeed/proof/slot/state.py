"""The verifier's durable state: what a source read, the verdicts, and how far it has read.

Kept in the ledger's schema, on the verifier's own database session, under one name per
source (today the slot's). What it keeps:

- *progress*: every transaction that commits before `position` has been read and recorded;
  `checked` is the position the last verdicts were given at, `waiting` the batches that were
  IN_PROGRESS then (they are looked at again once settled).
- *pending*: the observations of batches not judged yet: their inserts, and the updates and
  deletes of the transactions that claimed them. Reading a slot is destructive, so what it
  carried waits here until the ledger settles the batch.
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
from cdcfeed.proof.events import (
    ChangeObservation,
    LedgerBatch,
    Observation,
    OrderRanges,
    StreamEvent,
    Violation,
)
from cdcfeed.proof.judge import Verdict, judge_again, judge_seen, judge_unseen
from cdcfeed.proof.slot.report import ChangedBatch, Report, Tally

# Batches judged per query: bounds memory when a long outage left many to judge at once.
_JUDGE_BATCH = 1_000
REPORT_VIOLATIONS = 1_000
REPORT_CHANGED_BATCHES = 20  # the latest batches of the change mix the report lists


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
    given: list[Verdict] = field(default_factory=list)  # the verdicts themselves
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
        changes: Sequence[ChangeObservation] = (),
    ) -> None:
        """What a chunk carried, and the position after it; in the caller's transaction."""
        db = self.db
        if observations:
            await db.record_pending(self.source, [_row(o) for o in observations])
        if changes:
            await db.record_pending_changes(
                self.source,
                [
                    (c.batch_id, c.commit_lsn, c.commit_end_lsn, c.xid, _stored(c))
                    for c in changes
                    if c.batch_id is not None  # a source of the slot's kind always claims
                ],
            )
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
                changed: dict[int, list[ChangeObservation]] = {i: [] for i in ids}
                for batch_id, stored in await db.pending_changes_of(self.source, ids):
                    changed[batch_id].append(_changes(batch_id, stored))
                for record in ready:
                    batch_id = record["batch_id"]
                    await self._judge_seen(record, seen[batch_id], changed[batch_id], judged)
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
                for batch_id, status, row_count, end_lsn, changes in unseen:
                    verdict = judge_unseen(batch_id, status, row_count, end_lsn, hint, changes)
                    await self._store(verdict)
                    judged.verdicts.append(verdict.result)
                    judged.given.append(verdict)
                    if verdict.violation is not None:
                        judged.found.append(verdict.violation)
                if len(unseen) < _JUDGE_BATCH:
                    break
            await db.set_checked(self.source, position, waiting)
        return judged

    async def _judge_seen(
        self,
        record: dict[str, Any],
        observations: list[Observation],
        changes: list[ChangeObservation],
        judged: Judged,
    ) -> None:
        batch_id = record["batch_id"]
        batch = LedgerBatch.from_row(record)
        if record["verdict_id"] is not None:
            amendment = judge_again(batch_id, batch, observations, changes)
            if amendment is not None:
                await self.db.amend_verdict(record["verdict_id"], amendment.reason)
                judged.found.append(amendment)
                judged.amended += 1
            return
        verdict = judge_seen(batch_id, batch, observations, changes)
        await self._store(verdict)
        judged.rows += verdict.rows
        judged.verdicts.append(verdict.result)
        judged.given.append(verdict)
        if verdict.violation is not None:
            judged.found.append(verdict.violation)

    async def _store(self, verdict: Verdict) -> None:
        await self.db.record_verdict(self.source, *verdict.stored, verdict.stored_changes)

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
        changed = [
            ChangedBatch(**r) for r in await db.changed_batches(self.source, REPORT_CHANGED_BATCHES)
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
            updated=totals["updated"],
            deleted=totals["deleted"],
            unchanged_toast=totals["unchanged_toast"],
            resolved_toast=totals["resolved_toast"],
            changed_batches=changed,
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


def _stored(c: ChangeObservation) -> dict[str, Any]:
    """What the state keeps of a transaction's updates and deletes (JSON); its batch, xid and
    commit are kept in columns of their own."""
    return {
        "statuses": [[status, _flat(ranges)] for status, ranges in c.statuses],
        "deleted": _flat(c.deleted),
        "key_only": _flat(c.key_only),
        "identity": c.identity,
        "unchanged_toast": c.unchanged_toast,
        "resolved_toast": c.resolved_toast,
        "twice": _flat(c.twice),
        "commit": [c.xid, c.commit_lsn, c.commit_end_lsn],
    }


def _changes(batch_id: int, stored: dict[str, Any]) -> ChangeObservation:
    xid, commit_lsn, commit_end_lsn = stored["commit"]
    return ChangeObservation(
        batch_id,
        xid,
        commit_lsn,
        commit_end_lsn,
        statuses=tuple((status, _ranges(flat)) for status, flat in stored["statuses"]),
        deleted=_ranges(stored["deleted"]),
        key_only=_ranges(stored["key_only"]),
        identity=stored["identity"],
        unchanged_toast=stored["unchanged_toast"],
        resolved_toast=stored["resolved_toast"],
        twice=_ranges(stored["twice"]),
    )


def _flat(ranges: OrderRanges) -> list[int]:
    return [bound for pair in ranges for bound in pair]


def _ranges(flat: list[int]) -> OrderRanges:
    return tuple(zip(flat[::2], flat[1::2], strict=True))
