"""The END events of Debezium's transaction topic, kept until their batch is judged: what
each transaction declares it carried. Split from `delivery` by concern."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice

from cdcfeed.proof.events import TransactionEnd
from cdcfeed.proof.kafka.debezium import DebeziumDecoder, TransactionEvent
from cdcfeed.proof.kafka.records import TP, Record

_MAX_ENDS = 100_000  # END events kept for batches whose rows have not arrived (or never will)


class Ends:
    """xid -> (its END, where it was read: partition and offset)."""

    def __init__(self) -> None:
        self.by_xid: dict[int, tuple[TransactionEnd, TP, int]] = {}

    def read(self, decoder: DebeziumDecoder, tp: TP, records: Sequence[Record], seen: int) -> int:
        """Keeps the ENDs among one partition's records; how many new tombstones it had."""
        decode = decoder.decode_transaction
        orders, ledger = decoder.orders_collection, decoder.ledger_collection
        ends = self.by_xid
        tombstones = 0
        for record in records:
            event = decode(record.value, tp[0])
            if event is None:
                if record.offset >= seen:
                    tombstones += 1
                continue
            if event.status != "END":
                continue
            ends[event.tx_id] = (_end(event, orders, ledger), tp, record.offset)
        if len(ends) > _MAX_ENDS:
            for xid in list(islice(ends, len(ends) - _MAX_ENDS)):
                del ends[xid]
        return tombstones

    def forget(self, live: set[int], known: set[int], complete: bool) -> None:
        """Keeps the ENDs of the transactions of unjudged batches, and while the candidates
        may not be all of those, the ENDs of transactions no candidate names: every END kept
        holds the transaction topic's commit (`commit_offsets`), so that a restart reads it
        again for its batch's count. An END of a batch judged or out of scope is dropped
        (and, with `complete`, one of a transaction that is no unjudged batch's)."""
        ends = self.by_xid
        for xid in [x for x in ends if x not in live and (complete or x in known)]:
            del ends[xid]


def _end(event: TransactionEvent, orders: str, ledger: str) -> TransactionEnd:
    return TransactionEnd(
        event.tx_id,
        None,
        None,
        declared_orders=event.event_counts.get(orders, 0),
        declared_ledger=event.event_counts.get(ledger),
    )
