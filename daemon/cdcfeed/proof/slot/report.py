"""What `cdcfeed verify` prints: the totals of the verdicts so far, and this run's."""

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
        return "\n".join(lines + violation_lines(self.violations, self.violation_count))
