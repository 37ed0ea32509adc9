"""What `cdcfeed status` shows: recent batches with their timings, whether each watched slot
confirmed them, and whether the Kafka verifier judged them delivered whole."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cdcfeed.lsn import lsn_to_int


def with_confirmations(
    batches: list[dict[str, Any]], slots: dict[str, int | None]
) -> list[dict[str, Any]]:
    """Adds `confirmed_by`: per slot, whether its confirmed_flush_lsn reached the end_lsn
    (None for a batch that is not COMPLETED: there is nothing to confirm)."""
    for batch in batches:
        end = lsn_to_int(batch["end_lsn"]) if batch["end_lsn"] else None
        batch["confirmed_by"] = {
            slot: None
            if end is None or batch["status"] != "COMPLETED"
            else confirmed is not None and confirmed >= end
            for slot, confirmed in slots.items()
        }
    return batches


def with_delivery(
    batches: list[dict[str, Any]], verdicts: dict[int, str] | None
) -> list[dict[str, Any]]:
    """Adds `delivered_by`: per verifier of what the pipeline delivered (Kafka), whether the
    batch was judged delivered whole (None while it is not judged yet)."""
    for batch in batches:
        batch["delivered_by"] = {}
        if verdicts is not None:
            verdict = verdicts.get(batch["batch_id"])
            batch["delivered_by"]["kafka"] = None if verdict is None else verdict == "ok"
    return batches


def json_default(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def status_table(batches: list[dict[str, Any]]) -> str:
    # One column per watched slot: has it confirmed the batch (CDC-confirmed)?
    slots = list(batches[0]["confirmed_by"]) if batches else []
    # And one per verifier of what the pipeline delivered: judged delivered whole?
    delivered = list(batches[0]["delivered_by"]) if batches else []
    timings = ("gen_ms", "write_ms", "copy_ms", "total_ms")
    header = (
        "batch",
        "status",
        "inserted",
        "updated",
        "deleted",
        "start_lsn",
        "end_lsn",
        *timings,
        *slots,
        *delivered,
        "note",
    )
    rows = [header]
    for batch in batches:
        started, completed = batch["started_at"], batch["completed_at"]
        total = (completed - started).total_seconds() if started and completed else None
        note = "recovered" if batch["recovered"] else (batch["error"] or "")[:60]
        rows.append(
            (
                str(batch["batch_id"]),
                batch["status"],
                str(batch["row_count"]),
                str(batch["updated"]),
                str(batch["deleted"]),
                batch["start_lsn"] or "-",
                batch["end_lsn"] or "-",
                _ms(batch["generate_seconds"]),
                _ms(batch["write_seconds"]),
                _ms(batch["copy_seconds"]),
                _ms(total),
                *(_yes_no(batch["confirmed_by"][slot]) for slot in slots),
                *(_yes_no(batch["delivered_by"][source]) for source in delivered),
                note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")
