"""Prometheus metrics in their own registry, so tests and the HTTP endpoint read the same data.

Every labelled series is created at zero up front: dashboards and alerts have data before the
first failure, and `rate()` sees the first increment.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from cdcfeed import __version__

PHASES = ("generate", "write", "copy", "total")
BATCH_STATUSES = ("completed", "failed")
SKIP_REASONS = ("busy", "database_down", "database_refused", "disk_full")
# What a batch does to orders (the change mix): what the load counts, and the verifiers too.
CHANGE_OPS = ("insert", "update", "delete")
VERIFY_RESULTS = ("ok", "violation")
TOAST_RESOLVED = ("true", "false")
# What a verifier reads: the replication slot (what PostgreSQL emitted) or Kafka (what the
# pipeline delivered). Only Kafka has pending batches, duplicates and a delivery latency.
VERIFY_SOURCES = ("slot", "kafka")
DELIVERY_SOURCES = ("kafka",)
# ledger completion -> the Kafka record's timestamp (broker), -> the verifier reading it.
DELIVERY_STAGES = ("broker", "verifier")

_DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
_ROW_BUCKETS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
_LAG_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
_RATE_WINDOW = 10.0
_CONFIRM_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
# A healthy pipeline delivers in tens of milliseconds to seconds; a stalled one in minutes.
_DELIVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.batches = Counter(
            "cdcfeed_batches",
            "Batches finished, by ledger status.",
            ["status"],
            registry=registry,
        )
        self.rows = Counter("cdcfeed_rows", "Order rows committed.", registry=registry)
        self.changes = Counter(
            "cdcfeed_changes",
            "Orders inserted, updated and deleted by COMPLETED batches.",
            ["op"],
            registry=registry,
        )
        self.duration = Histogram(
            "cdcfeed_batch_duration_seconds",
            "Batch duration by phase.",
            ["phase"],
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.batch_rows = Histogram(
            "cdcfeed_batch_rows",
            "Rows per committed batch.",
            buckets=_ROW_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter(
            "cdcfeed_batches_skipped",
            "Scheduled runs that could not start, by reason.",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "cdcfeed_batches_in_flight", "Batches running now.", registry=registry
        )
        self.target_rate = Gauge(
            "cdcfeed_target_batches_per_second",
            "The rate the load profile asks for now.",
            registry=registry,
        )
        self.achieved_rate = Gauge(
            "cdcfeed_achieved_batches_per_second",
            "Batches started per second over the last ten seconds.",
            registry=registry,
        )
        self.schedule_lag = Histogram(
            "cdcfeed_schedule_lag_seconds",
            "How late each scheduled run started.",
            buckets=_LAG_BUCKETS,
            registry=registry,
        )
        self.last_end_lsn = Gauge(
            "cdcfeed_last_end_lsn_bytes",
            "End LSN of the last completed batch, as bytes.",
            registry=registry,
        )
        self.database_up = Gauge(
            "cdcfeed_database_up", "1 when the source database answers.", registry=registry
        )
        self.server_setting_ok = Gauge(
            "cdcfeed_server_setting_ok",
            "1 when the server setting (wal_level, max_replication_slots, max_wal_senders) "
            "lets a CDC consumer in, 0 when it keeps one out; read at start and reconnection.",
            ["setting"],
            registry=registry,
        )
        self.build = Info("cdcfeed_build", "cdcfeed build.", registry=registry)
        self.build.info({"version": __version__})

        # Per replication slot (filled by the slot monitor) and continuous verification.
        self.slot_lag = Gauge(
            "cdcfeed_replication_slot_lag_bytes",
            "Current WAL insert LSN minus the slot's confirmed_flush_lsn.",
            ["slot"],
            registry=registry,
        )
        self.slot_retained = Gauge(
            "cdcfeed_replication_slot_retained_wal_bytes",
            "Current WAL insert LSN minus the slot's restart_lsn.",
            ["slot"],
            registry=registry,
        )
        self.slot_active = Gauge(
            "cdcfeed_replication_slot_active",
            "1 when a consumer is attached to the slot.",
            ["slot"],
            registry=registry,
        )
        self.slot_safe_wal = Gauge(
            "cdcfeed_replication_slot_safe_wal_size_bytes",
            "WAL the slot may still retain before it is invalidated.",
            ["slot"],
            registry=registry,
        )
        self.unconfirmed = Gauge(
            "cdcfeed_unconfirmed_batches",
            "COMPLETED batches whose end LSN the slot has not confirmed.",
            ["slot"],
            registry=registry,
        )
        self.confirm_seconds = Histogram(
            "cdcfeed_batch_confirm_seconds",
            "From a batch's completion to the poll that saw the slot confirm it.",
            ["slot"],
            buckets=_CONFIRM_BUCKETS,
            registry=registry,
        )
        self.verified = Counter(
            "cdcfeed_verified_batches",
            "Batches checked against the change stream, by what was read and the verdict.",
            ["source", "result"],
            registry=registry,
        )
        self.verified_changes = Counter(
            "cdcfeed_verified_changes",
            "Orders changes checked against the change stream, by source, what the batch did "
            "(insert, update, delete) and the verdict on the batch.",
            ["source", "op", "result"],
            registry=registry,
        )
        self.unchanged_toast = Counter(
            "cdcfeed_unchanged_toast",
            "Updates whose after image lacked the TOASTed note; resolved when the before "
            "image held it.",
            ["source", "resolved"],
            registry=registry,
        )
        self.pending_batches = Gauge(
            "cdcfeed_pending_batches",
            "Settled batches not yet due for a verdict: the pipeline has not moved past them.",
            ["source"],
            registry=registry,
        )
        self.oldest_pending_seconds = Gauge(
            "cdcfeed_oldest_pending_batch_seconds",
            "Age of the oldest pending batch, from its ledger completion.",
            ["source"],
            registry=registry,
        )
        self.duplicate_events = Counter(
            "cdcfeed_duplicate_events",
            "Change events delivered again, identical to the first delivery.",
            ["source"],
            registry=registry,
        )
        self.delivery_latency = Histogram(
            "cdcfeed_delivery_latency_seconds",
            "From a batch's ledger completion to its rows reaching a stage of the pipeline.",
            ["source", "stage"],
            buckets=_DELIVERY_BUCKETS,
            registry=registry,
        )
        self.verify_lag = Gauge(
            "cdcfeed_verify_lag_bytes",
            "WAL not yet read by continuous verification.",
            registry=registry,
        )

        # The series every batch touches, bound once: `labels()` takes a lock and builds its
        # key on each call, a few percent of the daemon's CPU at 100-row batches flat out.
        self.batch_status = {status: self.batches.labels(status) for status in BATCH_STATUSES}
        self.phase = {phase: self.duration.labels(phase) for phase in PHASES}
        self.skipped_reason = {reason: self.skipped.labels(reason) for reason in SKIP_REASONS}
        self.change_op = {op: self.changes.labels(op) for op in CHANGE_OPS}
        for source in VERIFY_SOURCES:
            for result in VERIFY_RESULTS:
                self.verified.labels(source, result)
                for op in CHANGE_OPS:
                    self.verified_changes.labels(source, op, result)
            for resolved in TOAST_RESOLVED:
                self.unchanged_toast.labels(source, resolved)
        for source in DELIVERY_SOURCES:
            self.pending_batches.labels(source)
            self.oldest_pending_seconds.labels(source)
            self.duplicate_events.labels(source)
            for stage in DELIVERY_STAGES:
                self.delivery_latency.labels(source, stage)

        # Achieved rate is computed when scraped, so it falls to zero when the load stops.
        self._starts: deque[float] = deque()
        self._created = time.monotonic()
        self.achieved_rate.set_function(self._achieved_rate)

    def verdict_changes(
        self, source: str, result: str, counts: tuple[int, int, int], toast: tuple[int, int]
    ) -> None:
        """A verdict's rows: (inserted, updated, deleted), and (unchanged, resolved) TOAST."""
        for op, n in zip(CHANGE_OPS, counts, strict=True):
            if n:
                self.verified_changes.labels(source, op, result).inc(n)
        unchanged, resolved = toast
        if unchanged:
            self.unchanged_toast.labels(source, "false").inc(unchanged)
        if resolved:
            self.unchanged_toast.labels(source, "true").inc(resolved)

    def count_changes(self, inserted: int, updated: int, deleted: int) -> None:
        """A COMPLETED batch's changes (`cdcfeed_rows_total` counts its inserts on its own)."""
        for op, count in zip(CHANGE_OPS, (inserted, updated, deleted), strict=True):
            if count:
                self.change_op[op].inc(count)

    def batch_started(self) -> None:
        self._starts.append(time.monotonic())
        self._forget_before(time.monotonic() - _RATE_WINDOW)

    def _forget_before(self, cutoff: float) -> None:
        while self._starts and self._starts[0] < cutoff:
            self._starts.popleft()

    def _achieved_rate(self) -> float:
        now = time.monotonic()
        self._forget_before(now - _RATE_WINDOW)
        return len(self._starts) / min(_RATE_WINDOW, max(now - self._created, 1e-3))
