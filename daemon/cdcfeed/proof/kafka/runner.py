"""`cdcfeed verify --kafka` and the daemon's Kafka verify task: the consumer, the delivery fold,
the judge and the stored state, in steps.

A step reads what the topics hold, judges every batch that is due (delivery.py says
when), stores the verdicts with the read positions, then commits the consumer's offsets. A
one-shot run reads until every partition has caught up with the time it began or has been
quiet for `IDLE` seconds, takes one last step and reports. Following (and in the daemon), a
step every `STEP` seconds until stopped; an outage of the brokers or the database closes
everything and reopens it from the stored state, with backoff.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

from cdcfeed.config import DatabaseSettings, KafkaSettings
from cdcfeed.database import KafkaSession, Names
from cdcfeed.errors import DatabaseUnavailable, UserError
from cdcfeed.metrics import Metrics
from cdcfeed.proof.events import Violation
from cdcfeed.proof.follow import follow
from cdcfeed.proof.kafka.consumer import KafkaSource, KafkaUnavailable, decoder_for
from cdcfeed.proof.kafka.debezium import DebeziumFormatError
from cdcfeed.proof.kafka.delivery import Delivery
from cdcfeed.proof.kafka.records import Judgement
from cdcfeed.proof.kafka.report import KafkaReport, KafkaTally
from cdcfeed.proof.kafka.state import KafkaState
from cdcfeed.retry import Backoff, retry

IDLE = 2.0  # seconds each partition must be quiet for a one-shot read to end
STEP = 1.0  # seconds of reading between two judging steps
QUIET = 1.0  # seconds without records after which a partition counts as read to its end
BEHIND = 10.0  # seconds a partition's last record may trail the clock and count as caught up
_TOPICS_EVERY = 10.0  # seconds between looks for new topics or partitions
SOURCE = "kafka"  # the metrics' source label

RETRY_ON = (DatabaseUnavailable, KafkaUnavailable)
# What ends a one-shot run with exit code 2 (another verifier holds the group, a record of
# unknown shape, the group is another pipeline's, ...): the daemon's task retries it instead,
# slowly, so that a verification problem never stops the load.
PROBLEMS = (UserError, DebeziumFormatError)
PROBLEM_BACKOFF = Backoff(initial=5.0, maximum=60.0)
REPEAT = 300.0  # seconds between two error lines of a problem that persists


class TopicsChanged(KafkaUnavailable):
    """A topic or partition appeared: reopen to read it from the stored state."""


class KafkaVerifier:
    """One Kafka verification on one database session (holding its group's lock)."""

    def __init__(
        self,
        db: KafkaSession,
        kafka: KafkaSettings,
        names: Names,
        *,
        metrics: Metrics | None = None,
        on_violation: Callable[[Violation], None] | None = None,
        run: KafkaTally | None = None,
    ) -> None:
        self.db = db
        self.kafka = kafka
        self.state = KafkaState(
            db, kafka.group, kafka.topic_prefix, decoder_for(kafka, names).orders_topic
        )
        self.source = KafkaSource(kafka, names)
        # Any: the source-labelled families; typed where metrics.py defines them.
        self.metrics: Any = metrics
        self.on_violation = on_violation
        self.run = KafkaTally() if run is None else run  # shared when reopened
        self.pending = 0
        self.oldest_pending: float | None = None
        self._delivery: Delivery | None = None
        self._looked = time.monotonic()
        # Per partition: when its last records arrived (monotonic) and the broker timestamp
        # of the last one (ms): whether the verifier has caught up with it.
        self._last: dict[tuple[str, int], tuple[float, int]] = {}
        self._reading: float | None = None  # when the first fetch returned (monotonic)

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:
            raise RuntimeError("KafkaVerifier used before prepare()")
        return self._delivery

    async def prepare(self) -> None:
        """State tables and lock; the consumer over the topics, from the stored positions."""
        await self.state.prepare()
        positions = await self.state.resume()
        source = self.source
        await source.open()
        await self.state.claim()
        decoder = source.decoder
        delivery = Delivery(
            decoder,
            transactions=decoder.transaction_topic in source.partitions,
            due_after=self.kafka.due_after,
        )
        delivery.orders_partitions = set(source.partitions[decoder.orders_topic])
        delivery.resume(positions, self.state.scope)
        delivery.changes.read_identity(*await self.state.identity())
        await source.assign()
        self._delivery = delivery

    async def close(self) -> None:
        """Closes the consumer and the session (and with it the lock); never raises."""
        await self.source.close()
        await self.db.close()

    async def read(self, seconds: float, stop: asyncio.Event | None = None) -> int:
        """Reads and folds what arrives for `seconds`; how many records."""
        deadline = time.monotonic() + seconds
        count = 0
        while stop is None or not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            count += await self._fetch(min(left, 0.2))
        return count

    def caught_up(self) -> bool:
        """Whether what is missing now is not in a backlog still to be read: this verifier
        has fetched, and every partition it reads has been read at least as far as the
        stored state accounts for (below that, records are known to wait) and is quiet (for
        `QUIET` seconds since its last records, or since the first fetch when none came) or
        its last record is recent. Until then `due_after` proves nothing."""
        if self._reading is None:
            return False
        now, wall_ms = time.monotonic(), time.time() * 1000
        delivery, starts = self.delivery, self.source.starts
        for topic, partitions in self.source.partitions.items():
            for tp in ((topic, p) for p in partitions):
                seen, position = delivery.seen.get(tp), delivery.position.get(tp, starts.get(tp))
                if seen is not None and (position is None or position < seen):
                    return False
                last = self._last.get(tp)
                if last is None:
                    if now - self._reading < QUIET:
                        return False
                elif now - last[0] < QUIET and last[1] < wall_ms - BEHIND * 1000:
                    return False
        return True

    async def read_to_end(self, idle: float = IDLE, stop: asyncio.Event | None = None) -> int:
        """Reads until every partition caught up with now or was quiet for `idle` seconds,
        judging on the way every `STEP` seconds; how many records."""
        started_ms = time.time() * 1000
        partitions = [(t, p) for t, parts in self.source.partitions.items() for p in parts]
        last = dict.fromkeys(partitions, time.monotonic())
        caught: set[tuple[str, int]] = set()
        count = 0
        stepped = time.monotonic()
        while stop is None or not stop.is_set():
            got = await self.source.fetch(0.2)
            now = time.monotonic()
            if self._reading is None:
                self._reading = now
            for (topic, partition), records in got.items():
                await self.delivery.feed(topic, partition, records, self.state.lookup, time.time())
                count += len(records)
                last[(topic, partition)] = now
                self._last[(topic, partition)] = (now, records[-1].timestamp)
                if records[-1].timestamp >= started_ms:
                    caught.add((topic, partition))
            if all(tp in caught or now - seen >= idle for tp, seen in last.items()):
                break
            if now - stepped >= STEP:
                await self.step()
                stepped = now
        return count

    async def _fetch(self, timeout: float) -> int:
        got = await self.source.fetch(timeout)
        arrival, now = time.time(), time.monotonic()
        if self._reading is None:
            self._reading = now
        count = 0
        for (topic, partition), records in got.items():
            await self.delivery.feed(topic, partition, records, self.state.lookup, arrival)
            self._last[(topic, partition)] = (now, records[-1].timestamp)
            count += len(records)
        return count

    async def step(self) -> Judgement:
        """Judges what is due, stores it with the read positions, then commits the offsets."""
        delivery = self.delivery
        # Read before judging: the changes read since the last step are held to what it is
        # now, or, if it changed, to the laxer of the two (`ChangeBook.read_identity`).
        delivery.changes.read_identity(*await self.state.identity())
        candidates = await self.state.candidates(delivery.held, delivery.scope)
        unclaimed = delivery.unclaimed(candidates)
        if unclaimed:  # updates or deletes of no candidate: a batch judged before?
            delivery.changes.learn(await self.state.judged_xids(unclaimed))
        judged = delivery.judge(
            candidates,
            time.time(),
            self.source.decoder.orders_topic,
            self.caught_up(),
            self.state.complete,
        )
        await self.state.store(judged, delivery.positions(), delivery.scope)
        await self.source.commit(delivery.commit_offsets())
        self.pending, self.oldest_pending = judged.pending, judged.oldest_pending
        self._count(judged)
        return judged

    async def look_for_topics(self) -> None:
        """Raises TopicsChanged, now and then, when a topic or partition appeared."""
        if time.monotonic() - self._looked < _TOPICS_EVERY:
            return
        self._looked = time.monotonic()
        if await self.source.changed():
            raise TopicsChanged("kafka.topic_prefix", "new topics or partitions to read")

    def _count(self, judged: Judgement) -> None:
        run = self.run
        found = [v.violation for v in judged.verdicts if v.violation is not None]
        found += judged.amendments
        found += [Violation(e.batch_id, e.reason) for e in judged.events]
        # Batches of the ledger only, as the stored totals count them ("batches_verified":
        # status IS NOT NULL): a batch id the ledger lacks is no batch verified but a
        # violation, counted as one (and its rows, like the totals', in "rows").
        run.batches += sum(1 for v in judged.verdicts if v.status is not None)
        run.rows += sum(v.rows for v in judged.verdicts)
        run.duplicates += judged.duplicates
        run.updated += judged.updated
        run.deleted += judged.deleted
        run.unchanged_toast += judged.unchanged_toast
        run.violations += len(found)
        if self.on_violation is not None:
            for violation in found:
                self.on_violation(violation)
        metrics = self.metrics
        if metrics is None:
            return
        for verdict in judged.verdicts:
            metrics.verified.labels(SOURCE, verdict.result).inc()
            metrics.verdict_changes(
                SOURCE,
                verdict.result,
                (verdict.rows, verdict.updated, verdict.deleted),
                (verdict.unchanged_toast, verdict.resolved_toast),
            )
        extra = len(judged.amendments) + len(judged.events)
        if extra:
            metrics.verified.labels(SOURCE, "violation").inc(extra)
        metrics.pending_batches.labels(SOURCE).set(judged.pending)
        metrics.oldest_pending_seconds.labels(SOURCE).set(judged.oldest_pending or 0.0)
        if judged.duplicates:
            metrics.duplicate_events.labels(SOURCE).inc(judged.duplicates)
        for broker, verifier in judged.latencies:
            metrics.delivery_latency.labels(SOURCE, "broker").observe(broker)
            metrics.delivery_latency.labels(SOURCE, "verifier").observe(verifier)

    async def report(self) -> KafkaReport:
        return await self.state.report(self.run, self.pending, self.oldest_pending)


async def open_kafka_verifier(
    database: DatabaseSettings,
    names: Names,
    kafka: KafkaSettings,
    *,
    metrics: Metrics | None = None,
    on_violation: Callable[[Violation], None] | None = None,
    run: KafkaTally | None = None,
    patient: bool = False,
) -> KafkaVerifier:
    """A prepared verifier on a connection of its own. One attempt, the caller retries;
    `patient`: bounded retries of the database connection, for a first opening from the CLI."""
    session = await KafkaSession.open_kafka(database, names, patient=patient)
    verifier = KafkaVerifier(
        session, kafka, names, metrics=metrics, on_violation=on_violation, run=run
    )
    try:
        await verifier.prepare()
    except BaseException:
        await verifier.close()
        raise
    return verifier


async def verify_kafka_once(
    database: DatabaseSettings,
    names: Names,
    kafka: KafkaSettings,
    *,
    idle: float = IDLE,
    on_violation: Callable[[Violation], None] | None = None,
    stop: asyncio.Event | None = None,
    patient: bool = True,
) -> KafkaReport:
    """Reads the topics to their end (as far as they are quiet), judges, reports: the
    one-shot `verify --kafka`, and what a bench measures."""
    verifier = await open_kafka_verifier(
        database, names, kafka, on_violation=on_violation, patient=patient
    )
    try:
        await verifier.read_to_end(idle, stop)
        await verifier.step()
        return await verifier.report()
    finally:
        await verifier.close()


async def follow_kafka(
    verifier: KafkaVerifier | None,
    reopen: Callable[[], Awaitable[KafkaVerifier]],
    stop: asyncio.Event | None = None,
    step: float = STEP,
) -> KafkaReport:
    """A step every `step` seconds until `stop` is set (forever without one); the report.

    Rides out outages of the brokers and the database by reopening with backoff: the stored
    state makes the reopened verifier resume where the last step stored.
    """

    async def one_step(current: KafkaVerifier) -> None:
        await current.read(step, stop)  # waits up to `step` for records: no pause between
        await current.step()
        await current.look_for_topics()

    report = await follow(
        verifier,
        reopen,
        one_step,
        what="verify --kafka",
        interval=step,
        stop=stop,
        retry_on=RETRY_ON,
        pause_between=False,
        again=lambda _: "reading the topics again",
    )
    assert isinstance(report, KafkaReport)
    return report


async def verify_kafka_continuously(
    database: DatabaseSettings,
    names: Names,
    kafka: KafkaSettings,
    metrics: Metrics,
    backoff: Backoff = PROBLEM_BACKOFF,
) -> None:
    """The daemon's Kafka verifier: a step per second until cancelled. Violations are
    logged as they are found and counted in cdcfeed_verified_batches_total{source="kafka"}.

    Never ends on its own: outages are ridden out by `follow_kafka`; a problem that would end
    a one-shot run (`PROBLEMS`) is logged as one error line, again every `REPEAT` seconds
    while it persists, each counted as a violation of source kafka (so that the alert on
    them fires while Kafka goes unverified), and the verifier is reopened with `backoff`.
    """

    def report(violation: Violation) -> None:
        logger.bind(batch_id=violation.batch_id).error(
            f"verify --kafka violation: {violation.line()}"
        )

    async def reopen() -> KafkaVerifier:
        return await open_kafka_verifier(
            database, names, kafka, metrics=metrics, on_violation=report
        )

    logged: tuple[str, float] | None = None  # the last problem logged, and when

    def problem(attempt: int, exc: BaseException, pause: float) -> None:
        nonlocal logged
        now = time.monotonic()
        if logged is not None and logged[0] == str(exc) and now - logged[1] < REPEAT:
            return
        logged = (str(exc), now)
        every = f"{backoff.maximum:g} s"
        logger.error(f"verify --kafka stopped (the load goes on): {exc}; retrying every {every}")
        metrics.verified.labels(SOURCE, "violation").inc()

    async def follow() -> KafkaReport:
        return await follow_kafka(None, reopen)

    await retry(follow, what="verify --kafka", backoff=backoff, retry_on=PROBLEMS, log=problem)
