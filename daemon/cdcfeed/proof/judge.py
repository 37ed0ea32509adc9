"""The verdict on each batch, from the ledger's row and what a source observed of it.

Pure functions over the records of `events`: they know nothing of where the observations came
from, so every source is judged by the same rules. Which batches are due for judging (settled,
and read past by the source) is the caller's to decide.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cdcfeed.lifecycle import updated_status
from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import (
    ChangeObservation,
    LedgerBatch,
    Observation,
    OrderRanges,
    Violation,
    as_ranges,
    count,
    merged,
)

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
    # The change mix: updates and deletes the stream carried for it, and the updates whose
    # after image lacked the TOASTed note (resolved: the before image held it).
    updated: int = 0
    deleted: int = 0
    unchanged_toast: int = 0
    resolved_toast: int = 0

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

    @property
    def stored_changes(self) -> tuple[int, int, int, int]:
        """What a verifier's state keeps of the change mix: updated, deleted, unchanged and
        resolved TOAST values."""
        return (self.updated, self.deleted, self.unchanged_toast, self.resolved_toast)


def reasons_against(
    batch_id: int,
    batch: LedgerBatch | None,
    seen: Sequence[Observation],
    judged_before: bool,
    changes: Sequence[ChangeObservation] = (),
) -> list[str]:
    """Why the stream's view of a batch breaks the invariant; empty when it holds.

    `seen`: its inserts, per transaction; `changes`: the updates and deletes of the
    transactions attributed to it (by the ledger's xid, or its ledger row's claim).
    """
    rows = sum(o.rows for o in seen)
    xids = ", ".join(str(o.xid) for o in seen)
    if batch is None or batch.status == "FAILED" or judged_before:
        reasons = []
        if seen or not changes:
            reasons += _unwanted_rows(batch, seen, rows, xids)
        return reasons + [_unwanted_changes(batch, c) for c in changes]
    reasons = []
    if seen:
        reasons += _insert_reasons(batch, seen, rows, xids)
    elif batch.row_count:
        first, last = batch.first_order_id, batch.first_order_id + batch.row_count - 1
        reasons.append(
            f"the stream carried 0 rows, the ledger says {batch.row_count}; missing order ids "
            f"{_show(((first, last),))} ({batch.row_count} of {batch.row_count})"
        )
    reasons += _change_reasons(batch, changes)
    # One END per transaction: its inserts and its changes may each carry what it declares.
    declared: dict[int, tuple[int | None, int | None]] = {}
    transactions: list[Observation | ChangeObservation] = [*seen, *changes]
    for o in transactions:
        orders, ledger = declared.get(o.xid, (None, None))
        declared[o.xid] = (
            o.declared_rows if orders is None else orders,
            o.declared_ledger_rows if ledger is None else ledger,
        )
    ledger_events = 2 if batch.mixed else 1
    for orders, ledger in declared.values():
        if orders is not None and orders != batch.changes:
            reasons.append(
                f"the transaction END declares {orders} orders events, "
                f"the ledger says {batch.changes}"
            )
        if ledger is not None and ledger != ledger_events:
            # The batch's transaction changes the ledger once to record its xid, and a batch
            # of the change mix once more to record what it changed.
            reasons.append(
                f"the transaction END declares {ledger} ledger events, not {ledger_events}"
            )
    if batch.xid is not None:
        expected = batch.xid & _XID_MASK
        for xid in dict.fromkeys(o.xid for o in transactions):
            if xid != expected:
                reasons.append(
                    f"transaction xid {xid} is not the ledger's xid {batch.xid} "
                    f"(low 32 bits {expected})"
                )
    start, end = batch.start_lsn, batch.end_lsn
    for commit, commit_end, xid in dict.fromkeys(
        (o.commit_lsn, o.commit_end_lsn, o.xid) for o in transactions
    ):
        if start is None or end is None or not (start < commit and commit_end <= end):
            reasons.append(
                f"commit {int_to_lsn(commit)} of xid {xid} lies outside its bracket "
                f"({_lsn(start)}, {_lsn(end)}]"
            )
    return reasons


def _unwanted_rows(
    batch: LedgerBatch | None,
    seen: Sequence[Observation],
    rows: int,
    xids: str,
) -> list[str]:
    if batch is None:
        return [f"{rows} orders rows (xid {xids}) carry this batch id, which the ledger lacks"]
    if batch.status == "FAILED":
        return [f"FAILED in the ledger, yet {rows} of its rows reached the stream (xid {xids})"]
    return [
        f"after it was verified, transaction xid {o.xid} (commit {int_to_lsn(o.commit_lsn)}) "
        f"carried {o.rows} more of its rows"
        for o in seen
    ]


def _unwanted_changes(batch: LedgerBatch | None, c: ChangeObservation) -> str:
    what = f"{c.updates} updates and {c.deletes} deletes of orders"
    where = f"transaction xid {c.xid} (commit {int_to_lsn(c.commit_lsn)})"
    if batch is None:
        return f"{where} made {what} as this batch, which the ledger lacks"
    if batch.status == "FAILED":
        return f"FAILED in the ledger, yet its {where} made {what}"
    return f"after it was verified, {where} made {what} more as this batch"


def _insert_reasons(
    batch: LedgerBatch, seen: Sequence[Observation], rows: int, xids: str
) -> list[str]:
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
        delivered = merged([r for o in seen for r in o.order_ranges])
        missing = _without(((first, last),), delivered)
        if missing:
            reasons.append(
                f"missing order ids {_show(missing)} ({count(missing)} of {batch.row_count})"
            )
        outside = _without(delivered, ((first, last),))
        if outside:
            reasons.append(f"order ids outside its block: {_show(outside)} ({count(outside)})")
    return reasons


def _change_reasons(batch: LedgerBatch, changes: Sequence[ChangeObservation]) -> list[str]:
    """The updates and deletes against the ledger's ids, and what each image promised."""
    reasons = []
    if len(changes) > 1:
        xids = ", ".join(str(c.xid) for c in changes)
        reasons.append(
            f"its updates and deletes arrived in {len(changes)} transactions (xids {xids}), not one"
        )
    updated = merged([r for c in changes for r in c.updated])
    deleted = merged([r for c in changes for r in c.deleted])
    for op, did, ledger_count, ledger_ids in (
        ("update", updated, batch.updated, batch.updated_ids),
        ("delete", deleted, batch.deleted, batch.deleted_ids),
    ):
        expected = as_ranges(ledger_ids or ())
        if count(did) != ledger_count:
            reasons.append(f"the stream carried {count(did)} {op}s, the ledger says {ledger_count}")
        missing = _without(expected, did)
        if missing:
            reasons.append(
                f"{op}s missing from the stream: order ids {_show(missing)} "
                f"({count(missing)} of {count(expected)} it {op}d)"
            )
        stray = _without(did, expected)
        if stray:
            orders = f"order {_show(stray)}" if count(stray) == 1 else f"orders {_show(stray)}"
            total = "" if count(stray) == 1 else f" ({count(stray)})"
            reasons.append(f"{op}d {orders}{total}, which it did not {op}")
    for c in changes:
        for status, ranges in c.statuses:
            stale = as_ranges(
                i
                for low, high in ranges
                for i in range(low, high + 1)
                if updated_status(i) != status
            )
            if stale:
                reasons.append(
                    f"stale after image: status {status!r}, not the one an update gives, "
                    f"for order ids {_show(stale)} ({count(stale)})"
                )
        if c.twice:
            reasons.append(
                f"transaction xid {c.xid} changed order ids {_show(c.twice)} "
                f"({count(c.twice)}) more than once"
            )
        if c.identity == "f" and c.key_only:
            reasons.append(
                f"before images of order ids {_show(c.key_only)} ({count(c.key_only)}) carry "
                "the key only, though REPLICA IDENTITY FULL promises the whole old row"
            )
        if c.identity == "f" and c.unchanged_toast:
            reasons.append(
                f"{c.unchanged_toast} after images lack the TOASTed note, though REPLICA "
                "IDENTITY FULL promises it"
            )
        if c.missing_tombstones:
            reasons.append(
                f"missing tombstone after the deletes of order ids "
                f"{_show(c.missing_tombstones)} ({count(c.missing_tombstones)})"
            )
    return reasons


def judge_seen(
    batch_id: int,
    batch: LedgerBatch | None,
    seen: Sequence[Observation],
    changes: Sequence[ChangeObservation] = (),
) -> Verdict:
    """The verdict on a batch the stream carried changes of; `batch` None: the ledger lacks it.

    `seen` holds every observation of its inserts so far, `changes` of its updates and
    deletes (at least one of either). A batch still IN_PROGRESS in the ledger is not due: the
    caller waits for it to settle.
    """
    if not seen and not changes:
        raise ValueError(f"batch {batch_id}: a verdict on observed rows needs an observation")
    reason = "; ".join(reasons_against(batch_id, batch, seen, False, changes)) or None
    first = seen[0] if seen else changes[0]
    return Verdict(
        batch_id=batch_id,
        status=None if batch is None else batch.status,
        rows=sum(o.rows for o in seen),
        xid=first.xid,
        commit_lsn=first.commit_lsn,
        reason=reason,
        updated=sum(c.updates for c in changes),
        deleted=sum(c.deletes for c in changes),
        unchanged_toast=sum(c.unchanged_toast for c in changes),
        resolved_toast=sum(c.resolved_toast for c in changes),
    )


def judge_again(
    batch_id: int,
    batch: LedgerBatch | None,
    seen: Sequence[Observation],
    changes: Sequence[ChangeObservation] = (),
) -> Violation | None:
    """Changes that arrived for a batch after its verdict: a violation amending it, or None."""
    reason = "; ".join(reasons_against(batch_id, batch, seen, True, changes))
    return Violation(batch_id, reason) if reason else None


def judge_unseen(
    batch_id: int,
    status: str,
    row_count: int,
    end_lsn: int | None,
    hint: str,
    changes: int | None = None,
) -> Verdict:
    """The verdict on a settled batch the source has read past without one of its changes.

    A FAILED batch leaving no row is what the invariant asks. A COMPLETED one is missing from
    the stream; `hint` says how the source passed it and what to check, for instance
    "the slot read past it without its transaction (is public.orders in publication p?)".
    `changes`: the updates and deletes the ledger says a batch of the change mix made (None
    for an insert-only batch); one that inserted and changed nothing is rightly unseen.
    """
    reason = None
    if status == "COMPLETED" and (changes is None or row_count + changes > 0):
        made = f"{row_count} rows" if not changes else f"{row_count} rows and {changes} changes"
        reason = (
            f"missing from the stream: COMPLETED with {made} and end_lsn {_lsn(end_lsn)}, "
            f"but {hint}"
        )
    return Verdict(batch_id, status, 0, None, None, reason)


def _lsn(value: int | None) -> str:
    return "-" if value is None else int_to_lsn(value)


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


def _show(ranges: OrderRanges) -> str:
    shown = ", ".join(
        str(low) if low == high else f"{low}..{high}" for low, high in ranges[:_SHOWN_RANGES]
    )
    hidden = len(ranges) - _SHOWN_RANGES
    return shown if hidden <= 0 else f"{shown} and {hidden} more ranges"
