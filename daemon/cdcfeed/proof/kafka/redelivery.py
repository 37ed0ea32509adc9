"""Redeliveries of judged batches: a record of a batch judged before (by this run, or by an
earlier one: `Redeliveries.learn`) is a duplicate, counted, or amends the batch's verdict as
a violation.

With the batch's digest (digest.py: kept for the latest judged batches), a copy of an order id
delivered before the verdict is a duplicate when it is identical to that first delivery: the
same txId, the same LSN, the same values. Otherwise it is a violation ("order 231 delivered
twice, differently: first at LSN 0/1A2B, again at 0/1A30; with other values"), just as when
the copy arrives before the verdict (the fold tells those apart).

Without a digest entry for the id (the batch is older than the digests kept, or the id was
not delivered before the verdict), a new record is a duplicate when it matches the ledger: the
batch COMPLETED and delivered all its rows, the id lies in its block, its txId is the batch's
and its LSN lies inside the batch's bracket. Otherwise the ledger judges it again
(`judge_again`) and its reasons amend the verdict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import islice

from cdcfeed.lsn import int_to_lsn
from cdcfeed.proof.events import LedgerBatch, Observation, Violation
from cdcfeed.proof.judge import judge_again
from cdcfeed.proof.kafka.digest import DIGEST_ROWS, Digest, Digests

XID_MASK = 0xFFFF_FFFF
_MAX_JUDGED = 100_000  # judged batches remembered, to tell their redeliveries without a query


@dataclass(frozen=True, slots=True)
class JudgedBatch:
    """A batch judged before: its ledger row (None: the ledger lacks it), rows delivered, and
    (when still kept) the digest of those rows."""

    batch: LedgerBatch | None
    rows: int
    digest: Digest | None = None


class Redeliveries:
    """The batches judged before, and what arrived again for them since the last `take()`."""

    def __init__(self, digest_rows: int = DIGEST_ROWS) -> None:
        self.judged: dict[int, JudgedBatch] = {}  # without their digests: those are in
        self.digests = Digests(digest_rows)
        self.duplicates = 0
        self._late: dict[int, list[tuple[int, int, int]]] = {}  # batch -> (id, xid, lsn)
        self._differing: dict[int, list[str]] = {}  # batch -> reasons

    def remember(self, batch_id: int, judged: JudgedBatch) -> None:
        """A batch judged now or before; its digest, if any, joins the digests kept."""
        if judged.digest is not None:
            self.digests.add(batch_id, judged.digest)
            judged = dataclasses.replace(judged, digest=None)
        self.judged[batch_id] = judged

    def learn(self, found: dict[int, JudgedBatch]) -> None:
        """Batches an earlier run judged (looked up in the stored state)."""
        for batch_id, judged in found.items():
            self.remember(batch_id, judged)

    def again(self, batch_id: int, order_id: int, xid: int, lsn: int, fingerprint: int) -> None:
        """A new record of a judged batch."""
        digest = self.digests.get(batch_id)
        first = None if digest is None else digest.get(order_id)
        if first is not None:
            first_xid, first_lsn, first_fingerprint = first
            differences = []
            if first_xid != xid:
                differences.append(f"first in xid {first_xid}, again in xid {xid}")
            if first_lsn != lsn:
                differences.append(
                    f"first at LSN {int_to_lsn(first_lsn)}, again at {int_to_lsn(lsn)}"
                )
            if first_fingerprint != fingerprint:
                differences.append("with other values")
            if not differences:
                self.duplicates += 1
                return
            self._differing.setdefault(batch_id, []).append(
                f"order {order_id} delivered twice, differently, after the batch's verdict: "
                f"{'; '.join(differences)}"
            )
            return
        judged = self.judged[batch_id]
        batch = judged.batch
        if (
            batch is not None
            and batch.status == "COMPLETED"
            and judged.rows >= batch.row_count
            and batch.first_order_id <= order_id < batch.first_order_id + batch.row_count
            and (batch.xid is None or xid == batch.xid & XID_MASK)
            and batch.start_lsn is not None
            and batch.end_lsn is not None
            and batch.start_lsn < lsn <= batch.end_lsn
        ):
            self.duplicates += 1
        else:
            self._late.setdefault(batch_id, []).append((order_id, xid, lsn))

    def take(self) -> tuple[int, list[Violation]]:
        """The duplicates counted and the amendments found since the last call."""
        amendments = []
        for batch_id in sorted(self._late.keys() | self._differing.keys()):
            reasons = self._differing.get(batch_id, [])
            rows = self._late.get(batch_id)
            if rows:
                seen = [_observation(batch_id, xid, got) for xid, got in _by_xid(rows).items()]
                again = judge_again(batch_id, self.judged[batch_id].batch, seen)
                if again is not None:
                    reasons = [again.reason, *reasons]
            if reasons:
                amendments.append(Violation(batch_id, "; ".join(reasons)))
        duplicates = self.duplicates
        self._late, self._differing, self.duplicates = {}, {}, 0
        if len(self.judged) > 2 * _MAX_JUDGED:  # the oldest are looked up again if redelivered
            for batch_id in list(islice(self.judged, len(self.judged) - _MAX_JUDGED)):
                del self.judged[batch_id]
        return duplicates, amendments


def _by_xid(rows: list[tuple[int, int, int]]) -> dict[int, list[tuple[int, int]]]:
    by_xid: dict[int, list[tuple[int, int]]] = {}
    for order_id, xid, lsn in rows:
        by_xid.setdefault(xid, []).append((order_id, lsn))
    return by_xid


def _observation(batch_id: int, xid: int, rows: list[tuple[int, int]]) -> Observation:
    ids = sorted({order_id for order_id, _ in rows})
    lsns = [lsn for _, lsn in rows]
    return Observation(batch_id, min(lsns), max(lsns), xid, len(ids), ids[0], ids[-1], sum(ids))
