"""`cdcfeed verify`: proof from a pgoutput slot that every batch reached the change stream whole.

For every batch the ledger settled, the invariant: a COMPLETED batch arrived as
exactly `row_count` orders with the ids of its block, all in one transaction whose xid is the
ledger's and whose commit lies in `(start_lsn, end_lsn]`; a FAILED batch left no row; no
orders row carries a batch id the ledger lacks; nothing but INSERTs touches orders.

How a pass works, and the state it keeps (tables in the ledger's schema, see
`database/cdc_catalog.py`):

1. *Read.* Chunks of about `chunk_changes` messages are peeked from the slot
   (`pg_logical_slot_peek_binary_changes`, whole transactions, streamed through a cursor so
   memory stays flat) and folded into one summary per transaction and batch: row count,
   smallest, largest and sum of order ids. Summaries go to `cdcfeed_verify_pending`, the
   read position to `cdcfeed_verify_progress`, in one transaction; only then is the slot
   advanced to that position. A connection or server lost mid-chunk re-reads the chunk
   (transactions before the recorded position are skipped), so nothing is lost or doubled.
2. *Judge.* Batches with pending summaries get a verdict once the ledger settles them;
   settled batches without any get one once the stream has passed their end_lsn (COMPLETED:
   "missing from the stream") or as soon as they are FAILED (no rows: ok). Verdicts go to
   `cdcfeed_verify_results`; rows a later transaction carries for a judged batch amend it.

Memory holds one chunk's summaries and the open transaction's per-batch counters, never rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from loguru import logger

from cdcfeed.config import DatabaseSettings
from cdcfeed.database import Names, VerifySession
from cdcfeed.errors import DatabaseUnavailable, ObjectMissing, SlotBusy, UserError
from cdcfeed.lsn import int_to_lsn
from cdcfeed.metrics import Metrics
from cdcfeed.proof.events import LedgerBatch, Observation, Violation
from cdcfeed.proof.judge import judge_again, judge_seen, judge_unseen
from cdcfeed.proof.report import Report, Tally
from cdcfeed.proof.sources.slot import StreamReader
from cdcfeed.retry import Backoff, pause_until, retry

CHUNK_CHANGES = 50_000
_JUDGE_BATCH = 1_000
REPORT_VIOLATIONS = 1_000
# pgoutput's Begin carries the 32-bit xid; the ledger keeps the epoch-extended xid8.
_XID_MASK = 0xFFFF_FFFF


class SlotUnavailable(UserError):
    """The slot cannot be read now: another reader holds it (or another verify its state),
    or it was dropped. Worth reopening later, which recreates a dropped slot when allowed."""


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


def _ledger_batch(record: dict[str, Any]) -> LedgerBatch | None:
    if record["status"] is None:
        return None
    return LedgerBatch(
        batch_id=record["batch_id"],
        status=record["status"],
        row_count=record["row_count"],
        first_order_id=record["first_order_id"],
        start_lsn=record["start_lsn"],
        end_lsn=record["end_lsn"],
        xid=int(record["xid"]) if record["xid"] is not None else None,
    )


# --- the verifier -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Progress:
    scope: int
    position: int
    checked: int
    waiting: list[int]


class Verifier:
    """One slot's verification, on one session that holds the slot's verify lock."""

    def __init__(
        self,
        db: VerifySession,
        slot: str,
        publication: str,
        *,
        metrics: Metrics | None = None,
        on_violation: Callable[[Violation], None] | None = None,
        chunk_changes: int = CHUNK_CHANGES,
        run: Tally | None = None,
    ) -> None:
        self.db = db
        self.names = db.names
        self.slot = slot
        self.publication = publication
        self.metrics = metrics
        self.on_violation = on_violation
        self.chunk_changes = chunk_changes
        self.run = Tally() if run is None else run  # shared when a verifier is reopened

    async def prepare(self, *, create_slot: bool, create_publication: bool = False) -> None:
        """Checks (or creates) the ledger's CDC tables, the publication and the slot."""
        db = self.db
        if not await db.create_state():
            raise UserError(
                "database.dsn",
                f"no cdcfeed ledger ({db.qualified_batches}) in this database; "
                "point --dsn at cdcfeed's database or run `cdcfeed init-db`",
            )
        if not await db.try_lock(self.slot):
            raise SlotUnavailable(
                "cdc.verify_slot", f"another cdcfeed verify is already reading slot {self.slot}"
            )
        await self._check_publication(create_publication)
        slot = await db.slot(self.slot)
        if slot is None:
            if not create_slot:
                raise UserError(
                    "cdc.verify_slot",
                    f"no replication slot {self.slot!r}; pass --create-slot to give verify a "
                    "slot of its own (never Debezium's: verifying consumes the slot)",
                )
            await db.create_slot(self.slot)  # another verify may have created it meanwhile
            slot = await db.slot(self.slot)
            assert slot is not None
        if slot["slot_type"] != "logical" or slot["plugin"] != "pgoutput":
            raise UserError(
                "cdc.verify_slot",
                f"slot {self.slot!r} is a {slot['slot_type']} slot with plugin "
                f"{slot['plugin']!r}; verify reads logical slots with plugin pgoutput",
            )
        if slot["database"] != slot["here"]:
            raise UserError(
                "cdc.verify_slot",
                f"slot {self.slot!r} belongs to database {slot['database']!r}, "
                f"not {slot['here']!r}; point --dsn at that database",
            )
        if await db.progress(self.slot) is None:
            await db.start_progress(self.slot, self.publication, slot["confirmed_flush_lsn"])

    async def _check_publication(self, create: bool) -> None:
        record = await self.db.publication(self.publication)
        if record is None:
            if not create:
                raise UserError(
                    "cdc.publication",
                    f"no publication {self.publication!r}; create it (before the slot) with "
                    f"`cdcfeed init-db --publication {self.publication}`",
                )
            await self.db.ensure_publication(self.publication)
            return
        orders = ".".join(self.db.orders_relation)
        if not record[0] and orders not in record[1]:
            logger.warning(
                f"publication {self.publication} does not cover {orders}: no batch can reach "
                "the stream, so every COMPLETED batch will be reported missing"
            )

    async def close(self) -> None:
        """Closes the session, and with it the verify lock; never raises."""
        await self.db.close()

    async def _progress(self) -> _Progress:
        record = await self.db.progress(self.slot)
        if record is None:
            raise UserError("cdc.verify_slot", f"verify state of slot {self.slot} vanished")
        return _Progress(*record)

    async def _confirmed(self) -> int:
        slot = await self.db.slot(self.slot)
        if slot is None:
            raise SlotUnavailable(
                "cdc.verify_slot", f"replication slot {self.slot!r} was dropped while verifying"
            )
        confirmed: int = slot["confirmed_flush_lsn"]
        return confirmed

    async def run_pass(self, stop: asyncio.Event | None = None) -> None:
        """Reads what the slot holds now (or until `stop`) and judges what can be judged."""
        progress = await self._progress()
        position = progress.position
        confirmed = await self._confirmed()
        if confirmed > position:
            await self._skipped_ahead(position, confirmed)
            position = confirmed
        while stop is None or not stop.is_set():
            upto = await self.db.flush_lsn()
            if upto <= position:
                break
            position, full = await self._read_chunk(position, upto)
            await self._advance(position)
            if not full:
                break
        await self._judge(progress, position)

    async def _skipped_ahead(self, position: int, confirmed: int) -> None:
        reason = (
            f"the slot moved from {int_to_lsn(position)} to {int_to_lsn(confirmed)} without "
            "verify: another reader consumed those changes, so their batches cannot be proven"
        )
        async with self.db.transaction():
            await self.db.record_stream_violation(self.slot, None, None, confirmed, reason)
            await self.db.set_position(self.slot, confirmed, self.publication)
        self._found([Violation(None, reason)])

    async def _read_chunk(self, position: int, upto: int) -> tuple[int, bool]:
        reader = StreamReader(self.db.orders_relation, position)
        db = self.db
        try:
            async with (
                db.transaction(),
                aclosing(db.changes(self.slot, upto, self.chunk_changes, self.publication)) as data,
            ):
                async for message in data:
                    reader.feed(message)
                reader.finish()
                full = reader.messages >= self.chunk_changes
                # Not full: every transaction committing before `upto` was read.
                new_position = max(position, reader.last_end if full else upto, reader.last_end)
                if reader.observations:
                    await db.record_pending(self.slot, [_row(o) for o in reader.observations])
                for event in reader.events:
                    await db.record_stream_violation(
                        self.slot, event.batch_id, event.xid, event.commit_lsn, event.reason
                    )
                await db.set_position(self.slot, new_position, self.publication)
        except SlotBusy as exc:
            raise SlotUnavailable(
                "cdc.verify_slot", f"slot {self.slot} is in use ({exc})"
            ) from None
        except ObjectMissing as exc:
            await self._confirmed()  # a dropped slot says so
            raise UserError(
                "cdc.publication",
                f"the slot cannot decode with publication {self.publication!r} "
                f"({exc}); the publication must exist before the slot's "
                "position: create it, then a new slot (--create-slot with a new --slot)",
            ) from None
        self._found([Violation(e.batch_id, e.reason) for e in reader.events])
        return new_position, full

    async def _advance(self, position: int) -> None:
        if position > await self._confirmed():
            try:
                await self.db.advance_slot(self.slot, position)
            except SlotBusy as exc:
                raise SlotUnavailable(
                    "cdc.verify_slot", f"slot {self.slot} is in use ({exc})"
                ) from None

    async def _judge(self, progress: _Progress, position: int) -> None:
        db = self.db
        found: list[Violation] = []
        verdicts: list[str] = []
        amended = 0  # judged batches found violated later: violations, not new verdicts
        rows = 0
        hint = (
            f"the slot read past it without its transaction (is "
            f"{'.'.join(db.orders_relation)} in publication {self.publication}?)"
        )
        # One snapshot: a batch is either IN_PROGRESS (and waits) or settled (and is judged).
        async with db.transaction(isolation="repeatable_read"):
            waiting = await db.in_progress_since(progress.scope)
            while True:
                ready = await db.ready_pending(self.slot, _JUDGE_BATCH)
                if not ready:
                    break
                ids = [r["batch_id"] for r in ready]
                seen: dict[int, list[Observation]] = {i: [] for i in ids}
                for o in await db.pending_of(self.slot, ids):
                    seen[o["batch_id"]].append(_observation(o))
                for record in ready:
                    batch_id = record["batch_id"]
                    batch = _ledger_batch(record)
                    observations = seen[batch_id]
                    if record["verdict_id"] is not None:
                        amendment = judge_again(batch_id, batch, observations)
                        if amendment is not None:
                            await db.amend_verdict(record["verdict_id"], amendment.reason)
                            found.append(amendment)
                            amended += 1
                        continue
                    verdict = judge_seen(batch_id, batch, observations)
                    await db.record_verdict(
                        self.slot,
                        batch_id,
                        verdict.status,
                        verdict.result,
                        verdict.rows,
                        verdict.xid,
                        verdict.commit_lsn,
                        verdict.reason,
                    )
                    rows += verdict.rows
                    verdicts.append(verdict.result)
                    if verdict.violation is not None:
                        found.append(verdict.violation)
                await db.drop_pending(self.slot, ids)
            while True:
                unseen = await db.unobserved(
                    self.slot,
                    progress.scope,
                    progress.checked,
                    progress.waiting,
                    position,
                    _JUDGE_BATCH,
                )
                for batch_id, status, row_count, end_lsn in unseen:
                    verdict = judge_unseen(batch_id, status, row_count, end_lsn, hint)
                    if verdict.violation is not None:
                        found.append(verdict.violation)
                    await db.record_verdict(
                        self.slot,
                        batch_id,
                        status,
                        verdict.result,
                        verdict.rows,
                        verdict.xid,
                        verdict.commit_lsn,
                        verdict.reason,
                    )
                    verdicts.append(verdict.result)
                if len(unseen) < _JUDGE_BATCH:
                    break
            await db.set_checked(self.slot, position, waiting)
        self.run.batches += len(verdicts)
        self.run.rows += rows
        if self.metrics is not None:
            for result in verdicts:
                self.metrics.verified.labels(result).inc()
            self.metrics.verified.labels("violation").inc(amended)
        self._found(found, counted=True)

    def _found(self, violations: list[Violation], counted: bool = False) -> None:
        self.run.violations += len(violations)
        if self.metrics is not None and not counted:
            self.metrics.verified.labels("violation").inc(len(violations))
        if self.on_violation is not None:
            for violation in violations:
                self.on_violation(violation)

    async def lag_bytes(self) -> int:
        """WAL written since the position verify has read to."""
        progress = await self._progress()
        insert = await self.db.insert_lsn()
        return max(0, insert - progress.position)

    async def report(self, limit: int = REPORT_VIOLATIONS) -> Report:
        progress = await self._progress()
        totals = await self.db.totals(self.slot)
        waiting = await self.db.waiting(
            self.slot, progress.checked, progress.scope, progress.waiting
        )
        violations = [
            Violation(batch_id, reason)
            for batch_id, reason in await self.db.violations(self.slot, limit)
        ]
        return Report(
            slot=self.slot,
            publication=self.publication,
            position=int_to_lsn(progress.position),
            batches=totals["batches"],
            completed=totals["completed"],
            failed=totals["failed"],
            rows=totals["rows"],
            waiting=waiting,
            violation_count=totals["violations"],
            violations=violations,
            run=self.run,
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


async def open_verifier(
    database: DatabaseSettings,
    names: Names,
    slot: str,
    publication: str,
    *,
    create_slot: bool,
    create_publication: bool = False,
    metrics: Metrics | None = None,
    on_violation: Callable[[Violation], None] | None = None,
    run: Tally | None = None,
    patient: bool = False,
) -> Verifier:
    """A prepared verifier on a connection of its own. One attempt, the caller retries;
    `patient`: bounded retries and a one-line UserError, for a first opening from the CLI."""
    session = await VerifySession.open(database, names, patient=patient)
    verifier = Verifier(
        session, slot, publication, metrics=metrics, on_violation=on_violation, run=run
    )
    try:
        await verifier.prepare(create_slot=create_slot, create_publication=create_publication)
    except BaseException:
        await verifier.close()
        raise
    return verifier


async def run_passes(
    verifier: Verifier | None,
    reopen: Callable[[], Awaitable[Verifier]],
    poll_interval: float,
    stop: asyncio.Event | None = None,
    metrics: Metrics | None = None,
) -> Report:
    """A pass every `poll_interval` until `stop` is set (forever without one); then the report.

    Rides out a database outage, and a slot held by another reader, by reopening the
    verifier with backoff: the state tables make the next pass resume where the last ended.
    """
    backoff = Backoff(initial=poll_interval, maximum=max(poll_interval, 10.0))
    current = verifier
    paused = False

    def log(attempt: int, exc: BaseException, pause: float) -> None:
        nonlocal paused
        if not paused:
            what = exc.message if isinstance(exc, SlotUnavailable) else str(exc)
            logger.warning(f"verify paused: {what}; retrying")
        paused = True

    async def one_pass() -> None:
        nonlocal current, paused
        try:
            if current is None:
                current = await reopen()
                if paused:
                    logger.info(f"verify: reading slot {current.slot} again")
                paused = False
            await current.run_pass(stop)
            if metrics is not None:
                metrics.verify_lag.set(await current.lag_bytes())
        except (DatabaseUnavailable, SlotUnavailable):
            if current is not None:
                await current.close()
                current = None
            raise

    try:
        while stop is None or not stop.is_set():
            try:
                await retry(
                    one_pass,
                    what="verify",
                    backoff=backoff,
                    stop=stop,
                    retry_on=(DatabaseUnavailable, SlotUnavailable),
                    log=log,
                )
            except (DatabaseUnavailable, SlotUnavailable):
                break  # stopped while waiting for the database or the slot
            await pause_until(stop, poll_interval)
        if current is None:
            current = await reopen()
        return await current.report()
    finally:
        if current is not None:
            await current.close()


async def verify_continuously(
    database: DatabaseSettings,
    names: Names,
    slot: str,
    publication: str,
    poll_interval: float,
    metrics: Metrics,
) -> None:
    """The daemon's verifier: a pass per interval over a slot of its own, until cancelled.

    Creates the publication and the slot when missing. Violations are logged as they are
    found and counted in cdcfeed_verified_batches_total{result="violation"}.
    """

    def report(violation: Violation) -> None:
        logger.bind(batch_id=violation.batch_id).error(f"verify violation: {violation.line()}")

    async def reopen() -> Verifier:
        return await open_verifier(
            database,
            names,
            slot,
            publication,
            create_slot=True,
            create_publication=True,
            metrics=metrics,
            on_violation=report,
        )

    await run_passes(None, reopen, poll_interval, None, metrics)
