"""The verdict on each batch, from the ledger's row and what a source observed of it.

Pure functions over the records of `events`: they know nothing of where the observations came
from, so every source is judged by the same rules. Which batches are due for judging (settled,
and read past by the source) is the caller's to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import LedgerBatch, Observation, OrderRanges, Violation

# Change streams carry the 32-bit xid (pgoutput's Begin, Debezium's source.txId); the ledger
# keeps the epoch-extended xid8.
_XID_MASK = 0xFFFF_FFFF

# How many ranges of missing or stray ids a reason names before it only counts the rest.
_SHOWN_RANGES = 10


@dataclass(frozen=True, slots=True)
class Verdict:
    """The first judgement of one batch; `reason` is None when the invariant holds."""

    batch_id: int
    status: str | None  # the ledger's, None when the ledger lacks the batch
    rows: int  # orders rows the stream carried for it
    xid: int | None  # of the first transaction that carried it, None when none did
    commit_lsn: int | None
    reason: str | None

    @property
    def result(self) -> str:
        return "ok" if self.reason is None else "violation"

    @property
    def violation(self) -> Violation | None:
        return None if self.reason is None else Violation(self.batch_id, self.reason)

    @property
    def stored(self) -> tuple[int, str | None, str, int, int | None, int | None, str | None]:
        """What a verifier's state keeps of it, in the order `record_verdict` takes."""
        return (
            self.batch_id,
            self.status,
            self.result,
            self.rows,
            self.xid,
            self.commit_lsn,
            self.reason,
        )


def reasons_against(
    batch_id: int, batch: LedgerBatch | None, seen: Sequence[Observation], judged_before: bool
) -> list[str]:
    """Why the stream's view of a batch breaks the invariant; empty when it holds."""
    rows = sum(o.rows for o in seen)
    xids = ", ".join(str(o.xid) for o in seen)
    if batch is None:
        return [f"{rows} orders rows (xid {xids}) carry this batch id, which the ledger lacks"]
    if batch.status == "FAILED":
        return [f"FAILED in the ledger, yet {rows} of its rows reached the stream (xid {xids})"]
    if judged_before:
        return [
            f"after it was verified, transaction xid {o.xid} (commit {int_to_lsn(o.commit_lsn)}) "
            f"carried {o.rows} more of its rows"
            for o in seen
        ]
    reasons = []
    if len(seen) > 1:
        reasons.append(f"its rows arrived in {len(seen)} transactions (xids {xids}), not one")
    if rows != batch.row_count:
        reasons.append(f"the stream carried {rows} rows, the ledger says {batch.row_count}")
    first, last = batch.first_order_id, batch.first_order_id + batch.row_count - 1
    low = min(o.min_order_id for o in seen)
    high = max(o.max_order_id for o in seen)
    if (low, high) != (first, last):
        reasons.append(f"its order ids span {low}..{high}, its block is {first}..{last}")
    elif rows == batch.row_count and sum(o.sum_order_id for o in seen) != (
        (first + last) * batch.row_count // 2
    ):
        # Same count and bounds but another sum: some id twice, another missing.
        reasons.append(f"its order ids are not each id of {first}..{last} once")
    if all(o.order_ranges for o in seen):  # the source kept the ids: name them
        delivered = _merged([r for o in seen for r in o.order_ranges])
        missing = _without(((first, last),), delivered)
        if missing:
            reasons.append(
                f"missing order ids {_show(missing)} ({_count(missing)} of {batch.row_count})"
            )
        outside = _without(delivered, ((first, last),))
        if outside:
            reasons.append(f"order ids outside its block: {_show(outside)} ({_count(outside)})")
    for o in seen:
        if o.declared_rows is not None and o.declared_rows != batch.row_count:
            reasons.append(
                f"the transaction END declares {o.declared_rows} orders events, "
                f"the ledger says {batch.row_count}"
            )
        if o.declared_ledger_rows is not None and o.declared_ledger_rows != 1:
            # The COPY's transaction changes the ledger once: it records its xid.
            reasons.append(
                f"the transaction END declares {o.declared_ledger_rows} ledger events, not 1"
            )
    if batch.xid is not None:
        expected = batch.xid & _XID_MASK
        for o in seen:
            if o.xid != expected:
                reasons.append(
                    f"transaction xid {o.xid} is not the ledger's xid {batch.xid} "
                    f"(low 32 bits {expected})"
                )
    start, end = batch.start_lsn, batch.end_lsn
    for o in seen:
        if start is None or end is None or not (start < o.commit_lsn and o.commit_end_lsn <= end):
            reasons.append(
                f"commit {int_to_lsn(o.commit_lsn)} of xid {o.xid} lies outside its bracket "
                f"({_lsn(start)}, {_lsn(end)}]"
            )
    return reasons


def judge_seen(batch_id: int, batch: LedgerBatch | None, seen: Sequence[Observation]) -> Verdict:
    """The verdict on a batch the stream carried rows of; `batch` None: the ledger lacks it.

    `seen` holds every observation of the batch so far (at least one). A batch still
    IN_PROGRESS in the ledger is not due: the caller waits for it to settle.
    """
    if not seen:
        raise ValueError(f"batch {batch_id}: a verdict on observed rows needs an observation")
    reason = "; ".join(reasons_against(batch_id, batch, seen, judged_before=False)) or None
    return Verdict(
        batch_id=batch_id,
        status=None if batch is None else batch.status,
        rows=sum(o.rows for o in seen),
        xid=seen[0].xid,
        commit_lsn=seen[0].commit_lsn,
        reason=reason,
    )


def judge_again(
    batch_id: int, batch: LedgerBatch | None, seen: Sequence[Observation]
) -> Violation | None:
    """Rows that arrived for a batch after its verdict: a violation amending it, or None."""
    reason = "; ".join(reasons_against(batch_id, batch, seen, judged_before=True))
    return Violation(batch_id, reason) if reason else None


def judge_unseen(
    batch_id: int, status: str, row_count: int, end_lsn: int | None, hint: str
) -> Verdict:
    """The verdict on a settled batch the source has read past without one of its rows.

    A FAILED batch leaving no row is what the invariant asks. A COMPLETED one is missing from
    the stream; `hint` says how the source passed it and what to check, for instance
    "the slot read past it without its transaction (is public.orders in publication p?)".
    """
    reason = None
    if status == "COMPLETED":
        reason = (
            f"missing from the stream: COMPLETED with {row_count} rows and "
            f"end_lsn {_lsn(end_lsn)}, but {hint}"
        )
    return Verdict(batch_id, status, 0, None, None, reason)


def _lsn(value: int | None) -> str:
    return "-" if value is None else int_to_lsn(value)


def _merged(ranges: list[tuple[int, int]]) -> OrderRanges:
    """Sorted, disjoint ranges covering the same ids (transactions may overlap)."""
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            if high > out[-1][1]:
                out[-1] = (out[-1][0], high)
        else:
            out.append((low, high))
    return tuple(out)


def _without(ranges: OrderRanges, removed: OrderRanges) -> OrderRanges:
    """The ids of `ranges` not in `removed`, both sorted and disjoint."""
    out = []
    i = 0
    for low, high in ranges:
        while i < len(removed) and removed[i][1] < low:
            i += 1
        j = i
        while low <= high:
            if j == len(removed) or removed[j][0] > high:
                out.append((low, high))
                break
            if removed[j][0] > low:
                out.append((low, removed[j][0] - 1))
            low = removed[j][1] + 1
            j += 1
    return tuple(out)


def _count(ranges: OrderRanges) -> int:
    return sum(high - low + 1 for low, high in ranges)


def _show(ranges: OrderRanges) -> str:
    shown = ", ".join(
        str(low) if low == high else f"{low}..{high}" for low, high in ranges[:_SHOWN_RANGES]
    )
    hidden = len(ranges) - _SHOWN_RANGES
    return shown if hidden <= 0 else f"{shown} and {hidden} more ranges"
