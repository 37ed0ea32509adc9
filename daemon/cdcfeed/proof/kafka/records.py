"""What the Kafka verifier's parts hand each other: the records read, the ledger batches that
may be due, and what one judging step decided."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from cdcfeed.proof.events import LedgerBatch, StreamEvent, Violation
from cdcfeed.proof.judge import Verdict
from cdcfeed.proof.kafka.digest import Digest
from cdcfeed.proof.kafka.redelivery import JudgedBatch

TP = tuple[str, int]  # (topic, partition)
Lookup = Callable[[set[int]], Awaitable[dict[int, JudgedBatch]]]


class Record(Protocol):
    """What is read of a Kafka record (aiokafka's ConsumerRecord has these)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...  # milliseconds since the epoch
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class Candidate:
    """A ledger batch that may be due; `completed_at` in seconds since the epoch."""

    batch: LedgerBatch
    completed_at: float | None


@dataclass
class Judgement:
    """What one judging step decided, and the counts to store with it."""

    verdicts: list[Verdict] = field(default_factory=list)
    amendments: list[Violation] = field(default_factory=list)
    events: list[StreamEvent] = field(default_factory=list)
    pending: int = 0
    oldest_pending: float | None = None  # seconds since the oldest pending batch completed
    # Per judged batch with rows: (ledger completion -> last record's broker timestamp,
    # ledger completion -> its arrival here), seconds.
    latencies: list[tuple[float, float]] = field(default_factory=list)
    duplicates: int = 0
    snapshot_events: int = 0
    tombstones: int = 0
    # Of the verdicts: the updates and deletes their batches made, and the updates whose
    # after image lacked the TOASTed note.
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0
    # The digests of the batches judged now that delivered rows: stored with their verdicts.
    digests: list[tuple[int, Digest]] = field(default_factory=list)
