"""What a judged batch's rows were, kept to tell a redelivery after its verdict: an identical
copy (a duplicate) from one that differs (a violation).

A `Digest` holds, per order id delivered before the verdict, the txId and LSN of its first
delivery and a 32-bit fingerprint of its values, in about 4 bytes a row: the ids as sorted
ranges (a whole batch is one), txId and LSN run-length encoded along the ids (COPY gives
~120 rows one LSN), the fingerprints as an array. It is stored with the verdict, in the same
transaction (state.py), as one bytea, so it holds across a restart of the verifier.

Retention (`Digests`): the digests of the latest judged batches that hold the last
`DIGEST_ROWS` rows judged (the fewest batches that do; the latest batch whatever its size),
in memory and in the database alike. A redelivery of a batch whose digest is gone is judged
as before digests existed: by its id (in the batch's block), its txId and its LSN (inside the
batch's bracket), so a copy with other values is then counted as a duplicate.

A fingerprint is `fingerprint(customer_id, amount)`: built from Python's numeric hash, which
the language defines (for ints and Decimals alike, whatever form the amount arrived in), so it
is the same in every process and on every version: stored fingerprints stay comparable.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Mapping
from decimal import Decimal

DIGEST_ROWS = 5_000_000  # rows of the latest judged batches kept: ~20 MB, in memory and table

_MASK32 = 0xFFFF_FFFF
_MIX = 0x9E37_79B9  # odd: customer ids spread over the 32 bits
_NONE = 0x5BD1_E995  # stands for a value the event lacks
_HEADER = struct.Struct("<4sIII")  # magic, ranges, runs, rows
_MAGIC = b"kdg1"
_SWAP = sys.byteorder != "little"  # stored little-endian


def fingerprint(customer_id: int | None, amount: Decimal | None) -> int:
    """32 bits of a row's values (all but its keys): equal values, equal fingerprints."""
    c = _NONE if customer_id is None else customer_id
    a = _NONE if amount is None else hash(amount)
    return (a ^ (c * _MIX)) & _MASK32


class Digest:
    """Per order id: (txId, LSN, fingerprint) of its first delivery."""

    __slots__ = ("fingerprints", "highs", "lows", "run_lsns", "run_starts", "run_xids", "starts")

    def __init__(
        self,
        lows: array[int],
        highs: array[int],
        run_starts: array[int],
        run_xids: array[int],
        run_lsns: array[int],
        fingerprints: array[int],
    ) -> None:
        self.lows, self.highs = lows, highs  # the ids: sorted, disjoint ranges
        self.run_starts = run_starts  # index of each run's first row, ascending from 0
        self.run_xids, self.run_lsns = run_xids, run_lsns
        self.fingerprints = fingerprints  # per row, in id order
        starts, at = array("q"), 0  # index of each range's first row
        for low, high in zip(lows, highs, strict=True):
            starts.append(at)
            at += high - low + 1
        self.starts = starts

    @classmethod
    def of(cls, firsts: Mapping[int, tuple[int, int, int]]) -> Digest:
        """From order id -> (txId, LSN, fingerprint), as the fold keeps them."""
        lows, highs = array("q"), array("q")
        run_starts, run_xids, run_lsns = array("q"), array("q"), array("q")
        fps = array("I")
        last_id = last_xid = last_lsn = -2
        for i, order_id in enumerate(sorted(firsts)):
            xid, lsn, fp = firsts[order_id]
            if order_id == last_id + 1:
                highs[-1] = order_id
            else:
                lows.append(order_id)
                highs.append(order_id)
            last_id = order_id
            if xid != last_xid or lsn != last_lsn:
                run_starts.append(i)
                run_xids.append(xid)
                run_lsns.append(lsn)
                last_xid, last_lsn = xid, lsn
            fps.append(fp & _MASK32)
        return cls(lows, highs, run_starts, run_xids, run_lsns, fps)

    def __len__(self) -> int:
        return len(self.fingerprints)

    def get(self, order_id: int) -> tuple[int, int, int] | None:
        """(txId, LSN, fingerprint) of the id's first delivery; None if it had none."""
        r = bisect_right(self.lows, order_id) - 1
        if r < 0 or order_id > self.highs[r]:
            return None
        row = self.starts[r] + order_id - self.lows[r]
        run = bisect_right(self.run_starts, row) - 1
        return self.run_xids[run], self.run_lsns[run], self.fingerprints[row]

    def to_bytes(self) -> bytes:
        parts = [_HEADER.pack(_MAGIC, len(self.lows), len(self.run_starts), len(self))]
        for values in (
            self.lows, self.highs, self.run_starts, self.run_xids, self.run_lsns,
            self.fingerprints,
        ):  # fmt: skip
            if _SWAP:
                values = array(values.typecode, values)
                values.byteswap()
            parts.append(values.tobytes())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> Digest:
        magic, ranges, runs, rows = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise ValueError(f"not a redelivery digest (starts {magic!r})")
        at = _HEADER.size
        out: list[array[int]] = []
        for typecode, count in (("q", ranges), ("q", ranges), ("q", runs), ("q", runs),
                                ("q", runs), ("I", rows)):  # fmt: skip
            values = array(typecode)
            size = values.itemsize * count
            values.frombytes(data[at : at + size])
            if _SWAP:
                values.byteswap()
            out.append(values)
            at += size
        if at != len(data):
            raise ValueError(f"a redelivery digest of {len(data)} bytes, {at} expected")
        return cls(*out)


class Digests:
    """The digests of the latest judged batches: the fewest that hold the last `limit` rows
    judged, oldest forgotten first."""

    def __init__(self, limit: int = DIGEST_ROWS) -> None:
        self.limit = limit
        self.rows = 0
        self._by_batch: dict[int, Digest] = {}

    def __len__(self) -> int:
        return len(self._by_batch)

    def get(self, batch_id: int) -> Digest | None:
        return self._by_batch.get(batch_id)

    def add(self, batch_id: int, digest: Digest) -> None:
        old = self._by_batch.pop(batch_id, None)
        if old is not None:
            self.rows -= len(old)
        self._by_batch[batch_id] = digest
        self.rows += len(digest)
        by_batch = self._by_batch
        while len(by_batch) > 1:
            oldest = next(iter(by_batch.values()))
            if self.rows - len(oldest) < self.limit:
                break  # the oldest holds some of the latest `limit` rows
            self.rows -= len(by_batch.pop(next(iter(by_batch))))
