"""What `cdcfeed verify --kafka` prints: the totals of the verdicts so far, and this run's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdcfeed.proof.events import Violation, violation_lines


@dataclass
class KafkaTally:
    """This run's verdicts."""

    batches: int = 0
    violations: int = 0
    rows: int = 0
    duplicates: int = 0
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0


@dataclass(frozen=True)
class KafkaReport:
    group: str
    topic_prefix: str
    batches: int
    completed: int
    failed: int
    rows: int
    pending: int
    oldest_pending_seconds: float | None
    duplicates: int
    snapshot_events: int
    violation_count: int
    violations: list[Violation]
    run: KafkaTally = field(default_factory=KafkaTally)
    # The change mix: updates and deletes of the batches verified, and the updates whose
    # after image carried Debezium's placeholder for the TOASTed note.
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0

    @property
    def holds(self) -> bool:
        return self.violation_count == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": "kafka",
            "group": self.group,
            "topic_prefix": self.topic_prefix,
            "holds": self.holds,
            "batches_verified": self.batches,
            "completed": self.completed,
            "failed": self.failed,
            "rows": self.rows,
            "pending": self.pending,
            "oldest_pending_seconds": self.oldest_pending_seconds,
            "duplicates": self.duplicates,
            "snapshot_events": self.snapshot_events,
            "updated": self.updated,
            "deleted": self.deleted,
            "unchanged_toast": self.unchanged_toast,
            "violation_count": self.violation_count,
            "violations": [{"batch_id": v.batch_id, "reason": v.reason} for v in self.violations],
            "this_run": {
                "batches_verified": self.run.batches,
                "violations": self.run.violations,
                "rows": self.run.rows,
                "duplicates": self.run.duplicates,
                "updated": self.run.updated,
                "deleted": self.run.deleted,
                "unchanged_toast": self.run.unchanged_toast,
            },
        }

    def as_text(self) -> str:
        verdict = "invariant holds" if self.holds else "INVARIANT VIOLATED"
        pending = f"pending: {self.pending}"
        if self.pending and self.oldest_pending_seconds is not None:
            pending += f" (oldest completed {self.oldest_pending_seconds:.0f} s ago)"
        lines = [
            f"kafka topics {self.topic_prefix}.*, group {self.group}: {verdict}",
            f"batches verified: {self.batches} ({self.completed} COMPLETED, {self.failed} "
            f"FAILED), rows: {self.rows}, violations: {self.violation_count}, {pending}",
            f"duplicates: {self.duplicates} (redelivered copies, not violations), "
            f"snapshot events: {self.snapshot_events} (not judged)",
            f"this run: {self.run.batches} batches verified, {self.run.rows} rows, "
            f"{self.run.duplicates} duplicates, {self.run.violations} violations",
        ]
        if self.updated or self.deleted or self.unchanged_toast:
            # Only with the change mix: an insert-only report reads as it always did.
            lines.insert(
                2,
                f"changes: {self.rows} inserted, {self.updated} updated, {self.deleted} deleted; "
                f"unchanged TOAST values: {self.unchanged_toast} (Debezium's placeholder for a "
                "value the update left alone)",
            )
        return "\n".join(lines + violation_lines(self.violations, self.violation_count))
