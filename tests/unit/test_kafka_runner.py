"""The Kafka verifier's runner without a broker or a database: when it counts as caught up
with the topics (and so may apply `due_after`), and how the daemon's task rides out what stops
a one-shot run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

from cdcfeed.config_kafka import KafkaSettings
from cdcfeed.database import Names
from cdcfeed.metrics import Metrics
from cdcfeed.proof.kafka import runner
from cdcfeed.proof.kafka.debezium import DebeziumDecoder, DebeziumFormatError
from cdcfeed.proof.kafka.delivery import Delivery
from cdcfeed.proof.kafka.records import TP, Record
from cdcfeed.proof.kafka.state import KafkaBusy
from cdcfeed.retry import Backoff
from tests.unit.test_kafka_delivery import ORDERS, Rec, order

NAMES = Names(schema="public", orders="orders", batches="batch_control")


class FakeSource:
    """The consumer's surface the runner reads through: each fetch returns the next batch."""

    def __init__(self, starts: dict[TP, int], fetches: list[Mapping[TP, Sequence[Record]]]):
        self.decoder = DebeziumDecoder()
        self.partitions = {ORDERS: [0]}
        self.starts = starts
        self.fetches = fetches

    async def fetch(self, timeout: float) -> Mapping[TP, Sequence[Record]]:
        return self.fetches.pop(0) if self.fetches else {}


def verifier(stored: int | None, start: int | None, *fetches: Mapping[TP, Sequence[Record]]):
    v = runner.KafkaVerifier(Any, KafkaSettings(), NAMES)  # type: ignore[arg-type]
    source = FakeSource({} if start is None else {(ORDERS, 0): start}, list(fetches))
    v.source = source  # type: ignore[assignment]
    delivery = Delivery(source.decoder, transactions=False, due_after=300)
    delivery.orders_partitions = {0}
    if stored is not None:
        delivery.resume([(ORDERS, 0, stored, None)], scope=None)
    v._delivery = delivery
    return v


async def nothing(ids: set[int]) -> dict[int, Any]:
    return {}


def records(first: int, count: int, ms: int) -> dict[TP, list[Rec]]:
    return {(ORDERS, 0): [Rec(first + i, ms, order(i + 1, 1, 501, 150)) for i in range(count)]}


async def test_nothing_is_caught_up_before_the_first_fetch() -> None:
    v = verifier(None, None)
    assert not v.caught_up()  # nothing fetched: a backlog may wait
    await v._fetch(0)
    v._reading = time.monotonic() - runner.QUIET  # quiet since the first fetch
    assert v.caught_up()


async def test_a_partition_read_short_of_the_stored_position_is_not_caught_up() -> None:
    old = int((time.time() - 3600) * 1000)  # a backlog: records an hour old
    v = verifier(10, 3, records(3, 4, old), records(7, 3, old))
    v.state.lookup = nothing  # type: ignore[method-assign]
    await v._fetch(0)  # offsets 3..6: 7 of the 10 known to be there
    v._reading = time.monotonic() - 2 * runner.QUIET
    v._last[(ORDERS, 0)] = (time.monotonic() - 2 * runner.QUIET, old)
    assert not v.caught_up()
    await v._fetch(0)  # to 10: read as far as the stored state; then quiet
    assert not v.caught_up()
    v._last[(ORDERS, 0)] = (time.monotonic() - runner.QUIET, old)
    assert v.caught_up()


async def test_a_partition_restarted_at_its_stored_position_is_caught_up_once_quiet() -> None:
    v = verifier(10, 10)
    await v._fetch(0)
    assert not v.caught_up()
    v._reading = time.monotonic() - runner.QUIET
    assert v.caught_up()
    unknown = verifier(10, None)  # no committed offset: it starts at the earliest record
    await unknown._fetch(0)
    unknown._reading = time.monotonic() - runner.QUIET
    assert not unknown.caught_up()  # its records up to the stored position are to come


async def test_the_daemons_task_outlives_what_stops_a_one_shot_run(monkeypatch: Any) -> None:
    busy = KafkaBusy("kafka.group", "another cdcfeed verify is reading with group g")
    unreadable = DebeziumFormatError(ORDERS, "Avro bytes: not a Debezium JSON event")
    failures: list[BaseException] = [busy, busy, busy, unreadable]
    done = asyncio.Event()

    async def open_kafka_verifier(*args: Any, **kwargs: Any) -> runner.KafkaVerifier:
        if failures:
            raise failures.pop(0)
        done.set()
        await asyncio.Event().wait()  # the verifier would run from here on
        raise AssertionError

    monkeypatch.setattr(runner, "open_kafka_verifier", open_kafka_verifier)
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="ERROR")
    metrics = Metrics()
    fast = Backoff(initial=0.001, maximum=0.001, jitter=False)
    kafka = KafkaSettings(bootstrap=["kafka:9092"])
    task = asyncio.create_task(runner.verify_kafka_continuously(Any, NAMES, kafka, metrics, fast))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(done.wait(), 5)
        assert not task.done()  # the load daemon's supervisor would stop on a task that ended
    finally:
        task.cancel()
        logger.remove(sink)
    assert lines == [
        f"verify --kafka stopped (the load goes on): {busy}; retrying every 0.001 s",
        f"verify --kafka stopped (the load goes on): {unreadable}; retrying every 0.001 s",
    ]
    assert metrics.verified.labels("kafka", "violation")._value.get() == 2
