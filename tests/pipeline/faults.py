"""Injected faults: a pipeline's topics read once, then copied under a new topic prefix with
one thing changed — a record dropped, a field altered, a record added, a topic cut short.

Debezium runs once; every fault case is a fresh prefix holding the same bytes but for the
one change, which `verify --kafka --topic-prefix` then reads like any pipeline's topics. The
records keep their partition, their order within it and their timestamp; the copies' topics
are created explicitly with the source's partition counts (tansu would give an auto-created
topic 4).

Fields are read and altered in the JSON as Kafka Connect's JsonConverter wrote it, with or
without the schema envelope; nothing here uses cdcfeed's own decoder.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from aiokafka import AIOKafkaProducer

from tests.pipeline.broker import create_topics, read_topic

ORDERS = "public.orders"
LEDGER = "public.batch_control"
TRANSACTION = "transaction"
SUFFIXES = (ORDERS, LEDGER, TRANSACTION)

Json = dict[str, Any]


def _payload(document: Json) -> Json:
    """The event inside a JsonConverter value or key, with or without its schema envelope."""
    if set(document) == {"schema", "payload"}:
        payload: Json = document["payload"]
        return payload
    return document


def _encode(document: Json) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Record:
    """One Kafka record of a pipeline's topic; `suffix` is its topic without the prefix."""

    suffix: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None

    def event(self) -> Json | None:
        """The change (or transaction) event: the value's payload; None for a tombstone."""
        return None if self.value is None else _payload(json.loads(self.value))

    # --- what the fault cases look at -------------------------------------------------------

    @property
    def row(self) -> Json:
        """The orders or ledger row after the change."""
        event = self.event()
        assert event is not None and event.get("after") is not None, self
        row: Json = event["after"]
        return row

    @property
    def source(self) -> Json:
        event = self.event()
        assert event is not None, self
        source: Json = event["source"]
        return source

    @property
    def tx_id(self) -> int:
        """source.txId of a change event; the id's txId part for a transaction event."""
        event = self.event()
        assert event is not None, self
        if self.suffix == TRANSACTION:
            return int(str(event["id"]).split(":")[0])
        return int(event["source"]["txId"])

    @property
    def lsn(self) -> int:
        return int(self.source["lsn"])

    @property
    def status(self) -> str | None:
        """BEGIN or END for a transaction event."""
        event = self.event()
        return None if event is None else event.get("status")

    @property
    def op(self) -> str | None:
        """A change event's op (c, u, d, r, t); None for a tombstone."""
        event = self.event()
        return None if event is None else event.get("op")

    @property
    def key_order_id(self) -> int:
        """The order id an orders record's key names (a tombstone's: the deleted order)."""
        assert self.key is not None, self
        return int(_payload(json.loads(self.key))["order_id"])

    # --- altered copies ---------------------------------------------------------------------

    def altered(
        self, change: Callable[[Json], None], *, key: Callable[[Json], None] | None = None
    ) -> Record:
        """A copy with `change` applied to the value's payload (and `key` to the key's)."""
        assert self.value is not None, "a tombstone has no payload to alter"
        value = json.loads(self.value)
        change(_payload(value))
        new_key = self.key
        if key is not None:
            assert self.key is not None
            document = json.loads(self.key)
            key(_payload(document))
            new_key = _encode(document)
        return replace(self, key=new_key, value=_encode(value))

    def rekeyed(self, order_id: int) -> Record:
        """A copy whose key names another order (a tombstone has nothing else to alter)."""
        assert self.key is not None
        document = json.loads(self.key)
        _payload(document)["order_id"] = order_id
        return replace(self, key=_encode(document))


@dataclass
class TopicSet:
    """The records of one pipeline's orders, ledger and transaction topics."""

    partitions: dict[str, int]
    records: dict[str, list[Record]] = field(default_factory=dict)

    @classmethod
    async def read(cls, bootstrap: str, prefix: str, counts: Mapping[str, int | None]) -> TopicSet:
        """Every record of the prefix's topics, in partition and offset order.

        `counts` gives the records expected per topic (suffix; None: unknown): each read
        stops there, or after a quiet second.
        """

        async def one(suffix: str) -> list[Any]:
            return await read_topic(
                bootstrap, f"{prefix}.{suffix}", count=counts[suffix], timeout=30, idle=1.0
            )

        raw = await asyncio.gather(*(one(suffix) for suffix in SUFFIXES))
        topics = cls(partitions={})
        for suffix, records in zip(SUFFIXES, raw, strict=True):
            topics.records[suffix] = sorted(
                (
                    Record(suffix, r.partition, r.offset, r.timestamp, r.key, r.value)
                    for r in records
                ),
                key=lambda r: (r.partition, r.offset),
            )
        return topics

    def with_partitions(self, partitions: Mapping[str, int]) -> TopicSet:
        self.partitions = dict(partitions)
        return self

    @property
    def orders(self) -> list[Record]:
        return self.records[ORDERS]

    def orders_of(self, batch_id: int) -> list[Record]:
        """The inserts of a batch (its rows as they were first written)."""
        return [
            r
            for r in self.orders
            if r.value is not None and r.op in ("c", "r") and r.row["batch_id"] == batch_id
        ]

    def changes_of(self, tx_id: int, op: str) -> list[Record]:
        """The orders events of one transaction with one op (u, d), in partition order."""
        return [r for r in self.orders if r.value is not None and r.op == op and r.tx_id == tx_id]

    def tombstone_of(self, delete: Record) -> Record:
        """The tombstone following a delete on its partition."""
        after = [
            r for r in self.orders if r.partition == delete.partition and r.offset > delete.offset
        ]
        assert after and after[0].value is None, f"no tombstone right after {delete}"
        assert after[0].key_order_id == delete.key_order_id, (delete, after[0])
        return after[0]

    def end_of(self, tx_id: int) -> Record:
        (end,) = [r for r in self.records[TRANSACTION] if r.status == "END" and r.tx_id == tx_id]
        return end

    def copy(self) -> TopicSet:
        return TopicSet(dict(self.partitions), {s: list(rs) for s, rs in self.records.items()})

    # --- faults -------------------------------------------------------------------------------

    def without(self, record: Record) -> TopicSet:
        out = self.copy()
        out.records[record.suffix] = [r for r in out.records[record.suffix] if r != record]
        assert len(out.records[record.suffix]) == len(self.records[record.suffix]) - 1
        return out

    def replacing(self, record: Record, by: Record) -> TopicSet:
        out = self.copy()
        listed = out.records[record.suffix]
        listed[listed.index(record)] = by
        return out

    def inserting(self, after: Record, new: Record) -> TopicSet:
        """`new` placed right after `after` (same topic and partition)."""
        assert (new.suffix, new.partition) == (after.suffix, after.partition)
        out = self.copy()
        listed = out.records[after.suffix]
        listed.insert(listed.index(after) + 1, new)
        return out

    def split(self, keep: Callable[[Record], bool]) -> tuple[TopicSet, TopicSet]:
        """(the records `keep` accepts, the rest): a pipeline part-way, and what follows.

        Meant for prefixes of each partition: `keep` should accept the records of a
        partition up to some point and none after it.
        """
        head, tail = TopicSet(dict(self.partitions)), TopicSet(dict(self.partitions))
        for suffix, records in self.records.items():
            head.records[suffix] = [r for r in records if keep(r)]
            tail.records[suffix] = [r for r in records if not keep(r)]
            for partition in {r.partition for r in records}:
                kept = [keep(r) for r in records if r.partition == partition]
                assert kept == sorted(kept, reverse=True), (
                    f"{suffix}[{partition}]: the records kept are not a prefix"
                )
        return head, tail

    # --- publishing -------------------------------------------------------------------------

    async def publish(self, bootstrap: str, prefix: str) -> None:
        """Produce every record under `prefix`, to its partition, in order, its timestamp kept.

        Topics are created first with the source's partition counts; publishing again
        under the same prefix appends (a pipeline that moved on).
        """
        await create_topics(
            bootstrap, {f"{prefix}.{suffix}": self.partitions[suffix] for suffix in SUFFIXES}
        )
        await produce_records(
            bootstrap,
            ((f"{prefix}.{r.suffix}", r) for rs in self.records.values() for r in rs),
        )


async def produce_records(bootstrap: str, records: Iterable[tuple[str, Record]]) -> None:
    """Produce (topic, record) pairs, each to its record's partition with its timestamp;
    one partition's records in the order given (one in flight at a time)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_batch_size=1 << 20, linger_ms=5
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic,
                value=r.value,
                key=r.key,
                partition=r.partition,
                timestamp_ms=r.timestamp,
            )
            for topic, r in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
