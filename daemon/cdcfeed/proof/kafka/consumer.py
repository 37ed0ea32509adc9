"""Debezium's Kafka topics as a verification source: an aiokafka consumer over every partition
of the pipeline's topics, committing offsets only when told (after the verdicts they support
are stored: see delivery.py for what is folded and when a batch is due).

Topics: orders `<prefix>.<schema>.<orders>` (required), the ledger `<prefix>.<schema>.<batch
table>` and the transaction topic `<prefix>.transaction` when they exist. Partitions are
assigned by hand, not by a group rebalance; the group id names the committed offsets. Where
each partition starts: its committed offset, else its earliest record. End offsets are never
asked for (some brokers under-report them): a one-shot read ends once each partition has
caught up with the time the read began, or has been quiet for a while.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.helpers import create_ssl_context

from cdcfeed.config import KafkaSettings
from cdcfeed.database import Names
from cdcfeed.errors import CdcfeedError, UserError
from cdcfeed.proof.kafka.debezium import DebeziumDecoder
from cdcfeed.proof.kafka.records import TP, Record

MAX_RECORDS = 20_000  # per fetch: bounds what one read holds before it is folded
# How much one fetch asks of the brokers (per partition and in all), and no CRC check of each
# record batch: like librdkafka's default (check.crcs=false), as TCP and the broker's own
# check on produce already guard the bytes; aiokafka's CRC-32C is a table loop that took a
# third of its reading's CPU. A corrupted value still fails its JSON decode or its verdict.
FETCH_OPTIONS: Final[dict[str, Any]] = {
    "max_partition_fetch_bytes": 4 << 20,
    "fetch_max_bytes": 32 << 20,
    "check_crcs": False,
}


class KafkaUnavailable(CdcfeedError):
    """The brokers cannot be reached, refused a request, or the orders topic is not there
    (yet): a condition to retry in the daemon, a one-line error in a one-shot run."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


def decoder_for(kafka: KafkaSettings, names: Names) -> DebeziumDecoder:
    return DebeziumDecoder(
        topic_prefix=kafka.topic_prefix,
        schema=names.schema,
        orders_table=names.orders,
        ledger_table=names.batches,
    )


def consumer_options(kafka: KafkaSettings) -> dict[str, Any]:
    """aiokafka's connection options from `[kafka]` (TLS and SASL)."""
    options: dict[str, Any] = {
        "bootstrap_servers": list(kafka.bootstrap),
        "security_protocol": kafka.security_protocol,
    }
    if kafka.tls:
        options["ssl_context"] = _ssl_context(kafka)
    if kafka.sasl:
        options["sasl_mechanism"] = kafka.sasl_mechanism
        options["sasl_plain_username"] = kafka.username
        options["sasl_plain_password"] = kafka.password.get_secret_value()
    return options


def _ssl_context(kafka: KafkaSettings) -> ssl.SSLContext:
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=kafka.cafile or None,
            certfile=kafka.certfile or None,
            keyfile=kafka.keyfile or None,
        )
        return context
    except (OSError, ssl.SSLError) as exc:
        raise UserError(
            "kafka.cafile", f"cannot load the TLS files of [kafka] ({exc}); check the paths"
        ) from None


class KafkaSource:
    """One consumer over the pipeline's topics."""

    def __init__(self, kafka: KafkaSettings, names: Names) -> None:
        self.kafka = kafka
        self.decoder = decoder_for(kafka, names)
        self.partitions: dict[str, list[int]] = {}  # topic -> partitions assigned
        self.starts: dict[TP, int] = {}  # where `assign()` started a partition at its commit
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def where(self) -> str:
        return ",".join(self.kafka.bootstrap)

    async def open(self) -> None:
        """Connects and finds the topics; raises KafkaUnavailable."""
        consumer = AIOKafkaConsumer(
            group_id=self.kafka.group,
            client_id="cdcfeed-verify",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **FETCH_OPTIONS,
            **consumer_options(self.kafka),
        )
        self._consumer = consumer
        try:
            await consumer.start()
            self.partitions = await self.topics()
        except KafkaError as exc:
            await self.close()
            raise KafkaUnavailable(
                "kafka.bootstrap", f"cannot read from the brokers at {self.where} ({exc})"
            ) from None
        if self.decoder.orders_topic not in self.partitions:
            await self.close()
            raise KafkaUnavailable(
                "kafka.topic_prefix",
                f"no topic {self.decoder.orders_topic} on {self.where}: is Debezium's "
                f"topic.prefix {self.kafka.topic_prefix!r} (--topic-prefix), and has it "
                "captured a change yet?",
            )

    async def topics(self) -> dict[str, list[int]]:
        """The pipeline's topics that exist now, with their partitions."""
        consumer = self._live
        names = await consumer.topics()
        wanted = (
            self.decoder.orders_topic,
            self.decoder.ledger_topic,
            self.decoder.transaction_topic,
        )
        found = {}
        for topic in wanted:
            if topic in names:
                partitions = consumer.partitions_for_topic(topic)
                if partitions:
                    found[topic] = sorted(partitions)
        return found

    async def changed(self) -> bool:
        """Whether topics or partitions appeared since `open()`."""
        try:
            return await self.topics() != self.partitions
        except KafkaError as exc:
            raise self._unavailable(exc) from None

    async def assign(self) -> None:
        """Assigns every partition; each starts at its committed offset, else the earliest."""
        consumer = self._live
        tps = [TopicPartition(t, p) for t, parts in self.partitions.items() for p in parts]
        try:
            # Asked before assigning: the group's coordinator is then known when the consumer
            # looks up the same offsets for its new assignment, which otherwise fails once and
            # waits out its retry backoff (100 ms) before the first fetch.
            committed = {tp: await consumer.committed(tp) for tp in tps}
            consumer.assign(tps)
            for tp, offset in committed.items():
                if offset is None or offset < 0:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, offset)
                    self.starts[(tp.topic, tp.partition)] = offset
        except KafkaError as exc:
            raise self._unavailable(exc) from None

    async def fetch(self, timeout: float) -> Mapping[TP, Sequence[Record]]:
        """What arrived within `timeout` seconds, per partition, in offset order."""
        try:
            batch = await self._live.getmany(
                timeout_ms=int(timeout * 1000), max_records=MAX_RECORDS
            )
        except KafkaError as exc:
            raise self._unavailable(exc) from None
        return {(tp.topic, tp.partition): records for tp, records in batch.items()}

    async def commit(self, offsets: Mapping[TP, int]) -> None:
        """Commits, per partition, where a restart reads from."""
        if not offsets:
            return
        try:
            await self._live.commit(
                {TopicPartition(topic, part): offset for (topic, part), offset in offsets.items()}
            )
        except KafkaError as exc:
            raise self._unavailable(exc) from None

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # Closing a consumer whose broker is gone: nothing left to release.
            with contextlib.suppress(KafkaError):
                await consumer.stop()

    @property
    def _live(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("KafkaSource used before open()")
        return self._consumer

    def _unavailable(self, exc: BaseException) -> KafkaUnavailable:
        return KafkaUnavailable("kafka.bootstrap", f"lost the brokers at {self.where} ({exc})")
