"""Batch ids and order-id blocks (protocol step 1), reserved several batches at a time.

A reservation is a round trip and a commit, which is a WAL flush: taken per batch, it was
about a sixth of a small batch's cost. One reservation now serves the next `batches`
batches. Ids reserved but not used when the daemon stops are never used by anyone: the
ledger's batch ids and order ids may have gaps after a restart, never duplicates.
"""

from __future__ import annotations

import asyncio
from collections import deque

from cdcfeed.database import Allocation, Database


class IdReservations:
    def __init__(self, database: Database, rows: int, batches: int, changes: int = 0) -> None:
        self._database = database
        self._rows = rows
        # Order ids each batch may update or delete (a change mix): a window from the cursor.
        self._changes = changes
        self._batches = max(1, batches)
        self._free: deque[Allocation] = deque()
        self._refill: asyncio.Task[None] | None = None

    async def take(self) -> Allocation:
        """The next batch's ids; raises DatabaseUnavailable when a needed refill cannot be made."""
        while not self._free:
            # One refill at a time, awaited by every batch that needs it: its failure (the
            # database is down) reaches them all at once. Shielded, so that a batch cancelled
            # while waiting does not cancel the refill the others wait for.
            if self._refill is None or self._refill.done():
                self._refill = asyncio.ensure_future(self._reserve())
                self._refill.add_done_callback(_retrieve)
            await asyncio.shield(self._refill)
        return self._free.popleft()

    async def _reserve(self) -> None:
        if self._changes:
            reserved = await self._database.reserve_ids(self._rows, self._batches, self._changes)
        else:
            reserved = await self._database.reserve_ids(self._rows, self._batches)
        self._free.extend(reserved)


def _retrieve(task: asyncio.Task[None]) -> None:
    """Marks a failed refill's error as seen when every batch that awaited it was cancelled."""
    if not task.cancelled():
        task.exception()
