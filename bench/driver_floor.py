"""The floor under a small batch: cdcfeed's database layer alone, flat out, for bench/rate.py.

`clients` tasks on one event loop (uvloop, as the daemon's), each running batches back to back
through `cdcfeed.database` as a batch does: ids from `IdReservations`, the rows rendered in
memory, `open_batch` (the IN_PROGRESS row and the claim), `copy` (COPY and commit) and
`complete`. No scheduler, feed file, log line or metrics: what separates this from pgbench on
the same protocol is the driver's (asyncpg's) own cost and the COPY's; what separates the
daemon from this is everything else a batch does. Prints `batches/s <rate>`. Usage:

    python bench/driver_floor.py DSN CLIENTS SECONDS ROWS
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import uvloop

from cdcfeed.config import load_settings
from cdcfeed.database import Database
from cdcfeed.database.names import names_of
from cdcfeed.load.generate import batch_rng, orders_csv
from cdcfeed.load.ids import IdReservations


async def batches_per_second(dsn: str, clients: int, seconds: float, rows: int) -> float:
    settings = load_settings(None, {"database": {"dsn": dsn}}, {})
    async with Database.open(settings.database, names_of(settings), clients + 1, "floor") as db:
        ids = IdReservations(db, rows, clients)
        rng = batch_rng(None, 0)
        done = 0
        end = time.monotonic() + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                allocation = await ids.take()
                data = orders_csv(allocation.batch_id, allocation.first_order_id, rows, rng)
                async with db.batch_session() as session:
                    await session.open_batch(allocation, "floor", rows, "", 0.0, 0.0)
                    started = time.perf_counter()
                    await session.copy(allocation.batch_id, data, None)
                    await session.complete(allocation.batch_id, rows, time.perf_counter() - started)
                done += 1

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        return done / (time.monotonic() - started)


def floor_batches_per_second(dsn: str, clients: int, seconds: float, rows: int) -> float:
    """This module in a child process (so that its CPU counts as a child's), as bench/rate.py
    runs it beside pgbench and the daemon."""
    daemon_dir = Path(__file__).resolve().parent.parent / "daemon"
    result = subprocess.run(
        [sys.executable, __file__, dsn, str(clients), str(seconds), str(rows)],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(daemon_dir)},
    )
    if result.returncode != 0 or not result.stdout.startswith("batches/s "):
        raise RuntimeError(f"driver_floor failed ({result.returncode}): {result.stderr.strip()}")
    return float(result.stdout.split()[1])


if __name__ == "__main__":
    dsn, clients, seconds, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    rate = uvloop.run(batches_per_second(dsn, clients, seconds, int(rows)))
    print(f"batches/s {rate:.1f}")
