"""The floor under a small batch: cdcfeed's database layer alone, flat out, for bench/rate.py.

`clients` tasks on one event loop (uvloop, as the daemon's), each running batches back to back
through `cdcfeed.database` as a batch does: ids from `IdReservations`, the rows rendered in
memory, `open_batch` (the IN_PROGRESS row and the claim), `copy` (COPY and commit) and
`complete`. No scheduler, feed file, log line or metrics: what separates this from pgbench on
the same protocol is the driver's (asyncpg's) own cost and the COPY's; what separates the
daemon from this is everything else a batch does. Given a FEED_DIR, each batch also writes
its feed file there as the daemon's does (`FeedDirectory`: aiofiles, temporary name and
rename, retention), which shows what the file costs. After a warm-up, prints the batches per
second and this process's CPU per batch. Usage:

    python bench/driver_floor.py DSN CLIENTS SECONDS ROWS [FEED_DIR]
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from cdcfeed.app import copy_timeout
from cdcfeed.config import load_settings
from cdcfeed.database import Database
from cdcfeed.database.names import names_of
from cdcfeed.load.feed import FeedDirectory
from cdcfeed.load.generate import batch_rng, orders_csv
from cdcfeed.load.ids import IdReservations

WARMUP_SECONDS = 2.0


@dataclass(frozen=True)
class Floor:
    batches_per_second: float
    cpu_per_batch: float  # seconds of this process's CPU a batch


async def run_flat_out(
    dsn: str, clients: int, seconds: float, rows: int, feed_dir: Path | None = None
) -> Floor:
    """Batches back to back for WARMUP_SECONDS, then `seconds` counted."""
    overrides: dict[str, Any] = {"database": {"dsn": dsn}}
    if feed_dir is not None:
        overrides["feed"] = {"dir": str(feed_dir)}
    settings = load_settings(None, overrides, {})
    timeout = copy_timeout(settings.database.statement_timeout)
    feed = FeedDirectory(settings.feed) if feed_dir is not None else None
    if feed is not None:
        feed.prepare()
    async with Database.open(settings.database, names_of(settings), clients + 1, "floor") as db:
        ids = IdReservations(db, rows, clients)
        rng = batch_rng(None, 0)
        done = 0
        counting = time.monotonic() + WARMUP_SECONDS
        end = counting + seconds

        async def client() -> None:
            nonlocal done
            while time.monotonic() < end:
                allocation = await ids.take()
                data = orders_csv(allocation.batch_id, allocation.first_order_id, rows, rng)
                path = await feed.write(allocation.batch_id, data) if feed else None
                async with db.batch_session() as session:
                    await session.open_batch(allocation, "floor", rows, "", 0.0, 0.0)
                    started = time.perf_counter()
                    await session.copy(allocation.batch_id, data, timeout)
                    await session.complete(allocation.batch_id, rows, time.perf_counter() - started)
                if feed and path:
                    feed.release(path, len(data))
                if time.monotonic() >= counting:
                    done += 1

        async def meter() -> float:
            await asyncio.sleep(max(0.0, counting - time.monotonic()))
            return time.process_time()

        cpu_at_counting = asyncio.ensure_future(meter())
        await asyncio.gather(*(client() for _ in range(clients)))
        cpu = time.process_time() - await cpu_at_counting
        return Floor(done / seconds, cpu / max(done, 1))


def flat_out_floor(
    dsn: str, clients: int, seconds: float, rows: int, feed_dir: Path | None = None
) -> Floor:
    """This module in a child process, as bench/rate.py runs it beside pgbench and the daemon."""
    daemon_dir = Path(__file__).resolve().parent.parent / "daemon"
    feed = [str(feed_dir)] if feed_dir is not None else []
    result = subprocess.run(
        [sys.executable, __file__, dsn, str(clients), str(seconds), str(rows), *feed],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(daemon_dir)},
    )
    words = result.stdout.split()
    if result.returncode != 0 or words[:1] != ["batches/s"]:
        raise RuntimeError(f"driver_floor failed ({result.returncode}): {result.stderr.strip()}")
    return Floor(float(words[1]), float(words[3]) / 1e3)


if __name__ == "__main__":
    dsn, clients, seconds, rows = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    feed_dir = Path(sys.argv[5]) if len(sys.argv) > 5 else None
    floor = uvloop.run(run_flat_out(dsn, clients, seconds, int(rows), feed_dir))
    print(f"batches/s {floor.batches_per_second:.1f} cpu_ms/batch {floor.cpu_per_batch * 1e3:.4f}")
