"""What `cdcfeed verify` prints: the totals of the verdicts so far, and this run's.

With the change mix, also what the verified batches updated and deleted, the updates whose
after image lacked the TOASTed note, and the latest such batches one by one; an insert-only
load's text report reads as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cdcfeed.proof.events import Violation, violation_lines


@dataclass
class Tally:
    """This run's verdicts."""

    batches: int = 0
    violations: int = 0
    rows: int = 0


@dataclass(frozen=True, slots=True)
class ChangedBatch:
    """A verified batch of the change mix, as the report lists it."""

    batch_id: int
    result: str
    rows: int
    updated: int
    deleted: int
    unchanged_toast: int
    resolved_toast: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "result": self.result,
            "inserted": self.rows,
            "updated": self.updated,
            "deleted": self.deleted,
            "unchanged_toast": self.unchanged_toast,
            "resolved_toast": self.resolved_toast,
        }

    def line(self) -> str:
        return (
            f"batch {self.batch_id}: {self.rows} inserted, {self.updated} updated, "
            f"{self.deleted} deleted, unchanged TOAST {self.unchanged_toast} "
            f"({self.resolved_toast} resolved): {self.result}"
        )


@dataclass(frozen=True)
class Report:
    slot: str
    publication: str
    position: str
    batches: int
    completed: int
    failed: int
    rows: int
    waiting: int
    violation_count: int
    violations: list[Violation]
    run: Tally = field(default_factory=Tally)
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0  # after images without the TOASTed note, as DEFAULT promises
    resolved_toast: int = 0  # ... whose before image held it (REPLICA IDENTITY FULL)
    changed_batches: list[ChangedBatch] = field(default_factory=list)  # newest first

    @property
    def holds(self) -> bool:
        return self.violation_count == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "publication": self.publication,
            "position": self.position,
            "holds": self.holds,
            "batches_verified": self.batches,
            "completed": self.completed,
            "failed": self.failed,
            "rows": self.rows,
            "waiting": self.waiting,
            "violation_count": self.violation_count,
            "violations": [{"batch_id": v.batch_id, "reason": v.reason} for v in self.violations],
            "changes": {
                "inserted": self.rows,
                "updated": self.updated,
                "deleted": self.deleted,
                "unchanged_toast": self.unchanged_toast,
                "resolved_toast": self.resolved_toast,
            },
            "changed_batches": [b.as_dict() for b in self.changed_batches],
            "this_run": {
                "batches_verified": self.run.batches,
                "violations": self.run.violations,
                "rows": self.run.rows,
            },
        }

    def as_text(self) -> str:
        verdict = "invariant holds" if self.holds else "INVARIANT VIOLATED"
        lines = [
            f"slot {self.slot} (publication {self.publication}), read to {self.position}: "
            f"{verdict}",
            f"batches verified: {self.batches} ({self.completed} COMPLETED, {self.failed} "
            f"FAILED), rows: {self.rows}, violations: {self.violation_count}, "
            f"waiting: {self.waiting}",
            f"this run: {self.run.batches} batches verified, {self.run.rows} rows, "
            f"{self.run.violations} violations",
        ]
        if self.updated or self.deleted or self.unchanged_toast or self.resolved_toast:
            lines.append(
                f"changes: {self.rows} inserted, {self.updated} updated, {self.deleted} "
                f"deleted; unchanged TOAST values: {self.unchanged_toast} unresolved, "
                f"{self.resolved_toast} resolved from the before image"
            )
            lines += [f"  {b.line()}" for b in self.changed_batches]
        return "\n".join(lines + violation_lines(self.violations, self.violation_count))
