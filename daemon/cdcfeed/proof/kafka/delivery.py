"""What Debezium's Kafka topics delivered, folded per batch until each batch is due.

Pure: records in (already fetched), verdicts out; the consumer (consumer.py) and the database
(state.py) are the runner's. Four things are decided here.

When a batch is due. The pipeline has *provably moved past* LSN X once every partition of
the orders topic has delivered an event whose source.lsn is above X: Kafka keeps order within
a partition and Debezium emits changes in commit order, so a row of a batch ending at X that
has not arrived on a partition already carrying later changes never will (short of a
redelivery). A batch the ledger settled is judged

- at once when it is FAILED (no rows expected; rows arriving later amend the verdict), or
  when its batch id is one the ledger lacks;
- at once when every one of its rows has arrived (and, when the transaction topic is read,
  the END of its transaction too): nothing more can change its verdict but a redelivery;
- once the pipeline has moved past its end_lsn;
- once `due_after` seconds have passed since the ledger completed it, whatever the topics
  say (the user's deadline for a pipeline that stalls) - but only while the verifier itself
  has caught up with the topics: a backlog it has yet to read proves nothing missing; nor
  does a delete that is the last record read on its partition (its tombstone comes next).

Until then it is *pending*, counted with the age of the oldest. A batch still IN_PROGRESS in
the ledger waits without being pending.

Which batches. Verification starts at the lowest source.lsn the orders topic has delivered
(its *scope*): a batch that started before it and left no row in the topics predates the
pipeline (or its snapshot) and is not judged.

Records read before. `resume()` gives, per partition, the position the stored verdicts
account for. A record below it was read by an earlier run: it is folded again only when its
batch is still unjudged (its rows were not stored); counters and stream events from it were
stored already. A record at or above it is new.

Redeliveries of judged batches (redelivery.py). A new record of a batch judged before is a
duplicate when it is identical to the first delivery of its id (txId, LSN and values, kept in
the batch's digest: digest.py) and is counted; a copy that differs amends the verdict as a
violation. Once the batch's digest is no longer kept, a record is a duplicate when it matches
the ledger (the batch delivered all its rows, the id lies in its block, its txId and LSN are
the batch's); otherwise it amends the verdict as a violation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import groupby
from typing import cast

from cdcfeed.proof.events import LedgerBatch
from cdcfeed.proof.fold import Fold
from cdcfeed.proof.judge import judge_seen, judge_unseen
from cdcfeed.proof.kafka.changes import ChangeBook
from cdcfeed.proof.kafka.debezium import (
    DebeziumDecoder,
    OrderChange,
    Truncate,
)
from cdcfeed.proof.kafka.digest import DIGEST_ROWS, Digest, fingerprint
from cdcfeed.proof.kafka.records import TP, Candidate, Judgement, Lookup, Record
from cdcfeed.proof.kafka.redelivery import XID_MASK, JudgedBatch, Redeliveries
from cdcfeed.proof.kafka.transactions import Ends


class Delivery:
    """One verifier's view of the topics of one pipeline."""

    def __init__(
        self,
        decoder: DebeziumDecoder,
        *,
        transactions: bool,
        due_after: float,
        digest_rows: int = DIGEST_ROWS,
    ) -> None:
        self.decoder = decoder
        self.transactions = transactions  # the transaction topic is read
        self.due_after = due_after
        self.fold = Fold()
        self.changes = ChangeBook(self.fold)  # updates, deletes, tombstones (changes.py)
        self.orders_partitions: set[int] = set()
        self.seen: dict[TP, int] = {}  # the stored positions: below, records were read before
        self.position: dict[TP, int] = {}  # the next offset to read
        self.high_lsn: dict[int, int] = {}  # per orders partition, the highest source.lsn
        self.scope: int | None = None
        self.held: set[int] = set()  # batches with rows in the fold
        self.redeliveries = Redeliveries(digest_rows)
        self.judged = self.redeliveries.judged  # batch -> JudgedBatch, for membership tests
        # Per partition: held batch -> (its first record's offset, the highest source.lsn
        # of the records before it).
        self._firsts: dict[TP, dict[int, tuple[int, int]]] = {}
        self.ends = Ends()  # the transaction topic's (transactions.py)
        self._ends = self.ends.by_xid  # xid -> END, where
        self._latest: dict[int, tuple[float, float]] = {}  # batch -> (record ts, arrival)
        self._counts = Judgement()  # counters since the last judgement

    def resume(
        self, positions: Iterable[tuple[str, int, int, int | None]], scope: int | None
    ) -> None:
        """What the stored state accounts for: (topic, partition, position, high LSN below
        the offset committed with it: `positions()` says why that one)."""
        self.scope = scope
        for topic, partition, position, high in positions:
            self.seen[(topic, partition)] = position
            if topic == self.decoder.orders_topic and high is not None:
                self.high_lsn[partition] = high

    @property
    def moved_past(self) -> int:
        """The LSN every partition of the orders topic has delivered changes beyond; -1
        while a partition has delivered none."""
        if not self.orders_partitions or not self.orders_partitions <= self.high_lsn.keys():
            return -1
        return min(self.high_lsn[p] for p in self.orders_partitions)

    async def feed(
        self,
        topic: str,
        partition: int,
        records: Sequence[Record],
        lookup: Lookup,
        arrival: float,
    ) -> None:
        """Folds one partition's records, in offset order; `lookup` tells which of the batch
        ids new to this verifier were judged before (by an earlier run)."""
        if not records:
            return
        tp = (topic, partition)
        self.position[tp] = records[-1].offset + 1
        if topic == self.decoder.orders_topic:
            await self._orders(tp, records, lookup, arrival)
        elif topic == self.decoder.transaction_topic:
            self._counts.tombstones += self.ends.read(
                self.decoder, tp, records, self.seen.get(tp, -1)
            )
        else:
            seen = self.seen.get(tp, -1)
            for record in records:
                change = self.decoder.decode_ledger(record.value, topic)
                if change is None and record.offset >= seen:
                    self._counts.tombstones += 1

    async def _orders(
        self, tp: TP, records: Sequence[Record], lookup: Lookup, arrival: float
    ) -> None:
        changes = self.decoder.decode_orders([r.value for r in records], tp[0])
        held, judged = self.held, self.judged
        new = {
            change.batch_id
            for change in changes
            if type(change) is OrderChange and change.op == "c" and change.batch_id is not None
        }
        new -= held
        new -= judged.keys()
        if new:
            self.redeliveries.learn(await lookup(new))
        if self._inserts(tp, records, changes, arrival):
            return
        fold, counts = self.fold, self._counts
        seen = self.seen.get(tp, -1)
        firsts = self._firsts.setdefault(tp, {})
        high = self.high_lsn.get(tp[1], -1)
        low = self.scope
        run: int | None = None
        run_judged = False
        last = records[0]  # the run's last record: its timestamp is when the run arrived
        insert, again = fold.insert, self.redeliveries.again
        book = self.changes
        for record, change in zip(records, changes, strict=True):
            offset = record.offset
            if change is None:
                if offset >= seen:
                    counts.tombstones += 1
                book.tombstone(tp, self.decoder.decode_order_key(record.key, tp[0]))
                continue
            book.next_record(tp)
            lsn = change.lsn or 0
            below = high
            if lsn > high:
                high = lsn
            if low is None or lsn < low:
                low = lsn
            xid = change.tx_id or 0
            if type(change) is Truncate:
                if offset >= seen:
                    fold.add("orders", "t", None, None, xid, lsn)
                continue
            assert type(change) is OrderChange
            if change.snapshot:
                if offset >= seen:
                    counts.snapshot_events += 1
                continue
            batch_id = change.batch_id
            if change.op in ("u", "d"):
                book.change(tp, offset, below, change, offset >= seen)
                continue
            if change.op != "c" or batch_id is None:
                if offset >= seen:
                    fold.add("orders", change.op, change.order_id, batch_id, xid, lsn)
                continue
            if batch_id != run:
                if run is not None and not run_judged:
                    self._arrived(run, last.timestamp, arrival)
                run = batch_id
                run_judged = batch_id in judged
                if not run_judged and batch_id not in firsts:
                    firsts[batch_id] = (offset, below)
                    held.add(batch_id)
            last = record
            values = fingerprint(change.customer_id, change.amount)
            if run_judged:
                if offset >= seen:
                    again(batch_id, change.order_id, xid, lsn, values)
                continue
            if offset >= seen:
                insert(change.order_id, batch_id, xid, lsn, values)
            else:  # read before: its stream events were stored then
                events = len(fold.events)
                insert(change.order_id, batch_id, xid, lsn, values)
                del fold.events[events:]
        if run is not None and not run_judged:
            self._arrived(run, last.timestamp, arrival)
        self.high_lsn[tp[1]] = high
        self.scope = low

    def _inserts(
        self,
        tp: TP,
        records: Sequence[Record],
        changes: list[OrderChange | Truncate | None],
        arrival: float,
    ) -> bool:
        """What `_orders` does with the usual fetch, by runs of rows: every record a streamed
        insert into a batch not judged, read for the first time. False, with nothing done,
        for any other fetch."""
        if records[0].offset < self.seen.get(tp, -1):
            return False  # read before, at least in part
        try:
            batch_ids = [c.batch_id for c in changes]  # type: ignore[union-attr]
            ops = {c.op for c in changes}  # type: ignore[union-attr]
            snapshots = [c.snapshot for c in changes]  # type: ignore[union-attr]
        except AttributeError:  # a tombstone or a truncate
            return False
        ids = set(batch_ids)
        if ops != {"c"} or True in snapshots or None in ids or not ids.isdisjoint(self.judged):
            return False
        inserts = cast(list[OrderChange], changes)
        self.changes.next_record(tp)  # a delete ending the last fetch had no tombstone
        lsns = [c.lsn or 0 for c in inserts]
        xids = [c.tx_id or 0 for c in inserts]
        fingerprints = [fingerprint(c.customer_id, c.amount) for c in inserts]
        order_ids = [c.order_id for c in inserts]
        low, high = min(lsns), max(lsns)
        below = self.high_lsn.get(tp[1], -1)  # the highest LSN before each run, as in _orders
        self.high_lsn[tp[1]] = max(below, high)
        self.scope = low if self.scope is None else min(self.scope, low)
        firsts = self._firsts.setdefault(tp, {})
        held, fold = self.held, self.fold
        start = 0
        for batch_id, run in groupby(cast(list[int], batch_ids)):
            end = start + len(list(run))
            if batch_id not in firsts:
                firsts[batch_id] = (records[start].offset, below)
                held.add(batch_id)
            below = max(below, max(lsns[start:end]))
            fold.insert_run(
                batch_id,
                order_ids[start:end],
                xids[start:end],
                lsns[start:end],
                fingerprints[start:end],
            )
            self._arrived(batch_id, records[end - 1].timestamp, arrival)
            start = end
        return True

    def _arrived(self, batch_id: int, timestamp_ms: int, arrival: float) -> None:
        ts = timestamp_ms / 1000
        latest = self._latest.get(batch_id)
        if latest is None or ts > latest[0]:
            self._latest[batch_id] = (ts, arrival)

    def judge(
        self,
        candidates: Iterable[Candidate],
        now: float,
        hint_topic: str,
        deadlines: bool = True,
        complete: bool = False,
    ) -> Judgement:
        """Verdicts on every batch due now; `candidates`: the ledger rows of the held batches
        and of the unjudged batches in scope. `deadlines`: whether `due_after` applies (the
        caller has read what the topics hold). `complete`: the candidates are every unjudged
        batch in scope (an END matching none of them is no unjudged batch's). Forgets what it
        judged."""
        done, self._counts = self._counts, Judgement()
        moved = self.moved_past
        ledger: dict[int, Candidate] = {}
        for candidate in candidates:
            ledger[candidate.batch.batch_id] = candidate
        for batch_id in sorted(self.held - ledger.keys()):  # ids the ledger lacks
            self._judge_held(batch_id, None, None, done)
        live: set[int] = set()  # the xids of the batches left unjudged
        for batch_id in sorted(ledger):
            candidate = ledger[batch_id]
            batch = candidate.batch
            if batch_id in self.judged or batch.status == "IN_PROGRESS":
                if batch.xid is not None and batch_id not in self.judged:
                    live.add(batch.xid & XID_MASK)
                continue
            held = batch_id in self.held or (
                batch.xid is not None and (batch.xid & XID_MASK) in self.changes.xids
            )
            if not held and (self.scope is None or (batch.start_lsn or 0) < self.scope):
                continue  # before the pipeline's first change: not ours to judge
            age = None if candidate.completed_at is None else max(0.0, now - candidate.completed_at)
            passed = batch.end_lsn is not None and moved > batch.end_lsn
            late = deadlines and age is not None and age >= self.due_after
            # A delete last read on its partition may be followed by its tombstone in the
            # next fetch: the batch is not whole yet. Its deadline still judges it, or a lost
            # tombstone would keep it pending for good.
            waits = batch.xid is not None and self.changes.awaits_tombstone(batch.xid & XID_MASK)
            if batch.status == "COMPLETED" and not (
                late or ((passed or self._whole(batch)) and not waits)
            ):
                done.pending += 1
                if age is not None and (done.oldest_pending is None or age > done.oldest_pending):
                    done.oldest_pending = age
                if batch.xid is not None:
                    live.add(batch.xid & XID_MASK)
                continue
            if held:
                self._judge_held(batch_id, batch, candidate.completed_at, done)
                continue
            if passed:
                hint = f"every partition of {hint_topic} delivered changes past it without its rows"
            else:
                hint = (
                    f"none of its rows reached {hint_topic} in the {self.due_after:g} s "
                    "after it completed (due_after)"
                )
            changes = batch.updated + batch.deleted if batch.mixed else None
            verdict = judge_unseen(
                batch_id, batch.status, batch.row_count, batch.end_lsn, hint, changes
            )
            done.verdicts.append(verdict)
            self.redeliveries.remember(batch_id, JudgedBatch(batch, 0))
        known = {c.batch.xid & XID_MASK for c in ledger.values() if c.batch.xid is not None}
        self.changes.orphans(known, [c.batch for c in ledger.values()], complete)
        self.ends.forget(live, known, complete)
        duplicates, amendments = self.redeliveries.take()
        more, amended = self.changes.take_counts()
        duplicates += more
        amendments += amended
        done.duplicates += duplicates
        done.amendments += amendments
        done.events, self.fold.events = self.fold.events, []
        return done

    def unclaimed(self, candidates: Iterable[Candidate]) -> dict[int, int]:
        """Transactions of updates or deletes held that no candidate ran (changes.py)."""
        return self.changes.unclaimed(c.batch for c in candidates)

    def _whole(self, batch: LedgerBatch) -> bool:
        """Every row arrived (and the END of its transaction, when those are read)."""
        if self.fold.rows(batch.batch_id) < batch.row_count or not self.changes.whole(batch):
            return False
        return not self.transactions or (
            batch.xid is not None and (batch.xid & XID_MASK) in self._ends
        )

    def _judge_held(
        self, batch_id: int, batch: LedgerBatch | None, completed_at: float | None, done: Judgement
    ) -> None:
        changed = None
        if batch is not None and batch.xid is not None:
            end = self._ends.pop(batch.xid & XID_MASK, None)
            if end is not None:
                self.fold.end(end[0])
            changed = self.changes.take(batch.xid & XID_MASK, batch)
        delivered = self.fold.firsts(batch_id)
        digest = Digest.of(delivered) if delivered else None
        seen = self.fold.take(batch_id)
        self.held.discard(batch_id)
        for firsts in self._firsts.values():
            firsts.pop(batch_id, None)
        latest = self._latest.pop(batch_id, None)
        if not seen and changed is None:  # only copies of ids another transaction carried
            return
        verdict = judge_seen(batch_id, batch, seen, () if changed is None else (changed,))
        done.verdicts.append(verdict)
        done.updated += verdict.updated
        done.deleted += verdict.deleted
        done.unchanged_toast += verdict.unchanged_toast
        done.duplicates += sum(o.duplicates for o in seen)
        self.redeliveries.remember(batch_id, JudgedBatch(batch, verdict.rows, digest))
        if digest is not None:
            done.digests.append((batch_id, digest))
        if latest is not None and completed_at is not None:
            done.latencies.append(
                (max(0.0, latest[0] - completed_at), max(0.0, latest[1] - completed_at))
            )

    def commit_offsets(self) -> dict[TP, int]:
        """Per partition, where a restart must read from: the first record of a batch not
        yet judged, the END of a transaction that may be an unjudged batch's (`Ends.forget`),
        else the read position."""
        offsets = dict(self.position)
        for tp, firsts in [*self._firsts.items(), *self.changes.firsts.items()]:
            if firsts and tp in offsets:
                offsets[tp] = min(offsets[tp], min(firsts.values())[0])
        for _, tp, offset in self._ends.values():
            if tp in offsets:
                offsets[tp] = min(offsets[tp], offset)
        return offsets

    def positions(self) -> list[tuple[str, int, int, int | None]]:
        """What to store: (topic, partition, read position, for orders the highest LSN
        *below the offset committed*: `commit_offsets()`, the first record of a held batch).

        Why not the highest LSN read: a restart reads again from the committed offset, and
        until that re-read reaches the rows of a batch unjudged at the stop, the batch is not
        held; a high LSN read past those rows would prove it passed, and judge it missing for
        good (its rows, re-read later, fall below `seen`). With the high LSN below the
        committed offset C: every row of a batch unjudged at the store lies at C or later on
        this partition (a batch with a row before C would be held with its first offset
        below C); the consumer restarts at C or earlier (the offsets Kafka holds were
        committed by this step or an earlier one, and they only grow); so a record at LSN h
        below C carries no row of an unjudged batch, and any row of an unjudged batch ending
        before h came before that record, hence before C: there is none. Every later record
        is read again in offset order and folded (below `seen` when its batch is unjudged),
        exactly as in a run that never stopped: `moved_past` proves what it proved there.
        """
        orders = self.decoder.orders_topic
        stored = []
        for (topic, partition), position in sorted(self.position.items()):
            high = None
            if topic == orders:
                firsts = [
                    *self._firsts.get((topic, partition), {}).values(),
                    *self.changes.firsts.get((topic, partition), {}).values(),
                ]
                below = min(firsts)[1] if firsts else self.high_lsn.get(partition, -1)
                high = None if below < 0 else below
            stored.append((topic, partition, position, high))
        return stored
