"""`cdcfeed verify` and the daemon's verify task: a source, its state and the judge, in passes.

A pass reads what the source holds now, records it, and judges every batch that can be
judged; the state makes the next pass (or the next run) resume where this one ended. The
runner rides out database outages and a slot held by another reader by reopening, with
backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from loguru import logger

from cdcfeed.config import DatabaseSettings
from cdcfeed.database import Names, VerifySession
from cdcfeed.errors import DatabaseUnavailable
from cdcfeed.metrics import Metrics
from cdcfeed.proof.events import Violation
from cdcfeed.proof.follow import follow
from cdcfeed.proof.slot.reader import CHUNK_CHANGES, SlotSource, SlotUnavailable
from cdcfeed.proof.slot.report import Report, Tally
from cdcfeed.proof.slot.state import REPORT_VIOLATIONS, VerifyState


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
        self.slot = slot
        self.publication = publication
        self.source = SlotSource(db, slot, publication, chunk_changes)
        self.state = VerifyState(db, slot)
        self.metrics = metrics
        self.on_violation = on_violation
        self.run = Tally() if run is None else run  # shared when a verifier is reopened

    async def prepare(self, *, create_slot: bool, create_publication: bool = False) -> None:
        """Checks (or creates) the state tables, the publication and the slot."""
        await self.state.create()
        start = await self.source.prepare(
            create_slot=create_slot, create_publication=create_publication
        )
        await self.state.start(self.publication, start)

    async def close(self) -> None:
        """Closes the session, and with it the verify lock; never raises."""
        await self.db.close()

    async def run_pass(self, stop: asyncio.Event | None = None) -> None:
        """Reads what the slot holds now (or until `stop`) and judges what can be judged."""
        progress = await self.state.progress()
        position = progress.position
        confirmed = await self.source.confirmed()
        if confirmed > position:
            reason = self.source.skipped_reason(position, confirmed)
            await self.state.skipped(reason, confirmed, self.publication)
            self._found([Violation(None, reason)])
            position = confirmed
        while stop is None or not stop.is_set():
            upto = await self.source.flushed()
            if upto <= position:
                break
            position, full, events = await self.source.read_chunk(self.state, position, upto)
            self._found([Violation(e.batch_id, e.reason) for e in events])
            await self.source.advance(position)
            if not full:
                break
        judged = await self.state.judge(progress, position, self.source.hint)
        self.run.batches += len(judged.verdicts)
        self.run.rows += judged.rows
        if self.metrics is not None:
            for result in judged.verdicts:
                self.metrics.verified.labels("slot", result).inc()
            for v in judged.given:
                self.metrics.verdict_changes(
                    "slot",
                    v.result,
                    (v.rows, v.updated, v.deleted),
                    (v.unchanged_toast, v.resolved_toast),
                )
            self.metrics.verified.labels("slot", "violation").inc(judged.amended)
        self._found(judged.found, counted=True)

    def _found(self, violations: list[Violation], counted: bool = False) -> None:
        self.run.violations += len(violations)
        if self.metrics is not None and not counted:
            self.metrics.verified.labels("slot", "violation").inc(len(violations))
        if self.on_violation is not None:
            for violation in violations:
                self.on_violation(violation)

    async def lag_bytes(self) -> int:
        """WAL written since the position verify has read to."""
        return await self.state.lag_bytes()

    async def report(self, limit: int = REPORT_VIOLATIONS) -> Report:
        return await self.state.report(self.publication, self.run, limit)


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

    async def one_pass(current: Verifier) -> None:
        await current.run_pass(stop)
        if metrics is not None:
            metrics.verify_lag.set(await current.lag_bytes())

    report = await follow(
        verifier,
        reopen,
        one_pass,
        what="verify",
        interval=poll_interval,
        stop=stop,
        retry_on=(DatabaseUnavailable, SlotUnavailable),
        again=lambda current: f"reading slot {current.slot} again",
    )
    assert isinstance(report, Report)
    return report


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
    found and counted in cdcfeed_verified_batches_total{source="slot",result="violation"}.
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
