"""The change mix under load: batches that insert, update and delete (with TOASTed notes)
leave exactly what their ledger rows say, in the table and in the change stream, under
either replica identity, from several instances at once and across a SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import pytest

from tests.support import (
    check_changes,
    count_batches,
    daemon_args,
    execute,
    fetchval,
    prepare_slot,
    read_stream,
    run_in_process,
    settings_for,
    spawn,
    wait_until,
)

MIX = "insert=60,update=25,delete=15"
TOAST = 4096


@pytest.mark.parametrize("identity", ["default", "full"])
async def test_a_mixed_load_is_what_its_ledger_says_in_the_table_and_the_stream(
    dsn: str, feed_dir: Path, identity: str
) -> None:
    full = identity == "full"
    await prepare_slot(dsn, before_slot="ALTER TABLE orders REPLICA IDENTITY FULL" if full else "")
    settings = settings_for(
        dsn, feed_dir, mix=MIX, toast_bytes=TOAST, max_batches=30, rate=30.0, seed=11
    )
    assert await run_in_process(settings) == 0

    counts = await check_changes(dsn, await read_stream(dsn), full=full)
    assert counts.statuses == {"COMPLETED": 30}, counts
    assert counts.inserted == 30 * 60
    assert counts.updated > 100 and counts.deleted > 50, counts
    # An update leaves the note alone: the new tuple never carries it; FULL's old one does.
    assert counts.unchanged_toast == counts.updated
    assert counts.resolved_from_old == (counts.updated if full else 0)
    stored = await fetchval(
        dsn, "SELECT min(pg_column_size(note)) FROM orders WHERE note IS NOT NULL"
    )
    assert stored >= TOAST  # out of line and uncompressed (EXTERNAL)


async def _lock_waits(dsn: str, stop: asyncio.Event) -> list[str]:
    """The statements seen waiting for a lock on orders' changes until `stop`."""
    seen: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            seen += [
                row[0]
                for row in await conn.fetch(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%inserted AS%'"
                )
            ]
            await asyncio.sleep(0.002)
    finally:
        await conn.close()
    return seen


async def test_two_instances_with_mixed_loads_never_wait_for_each_others_rows(
    dsn: str, tmp_path: Path
) -> None:
    await prepare_slot(dsn)
    database = dsn.rsplit("/", 1)[1]
    # Any lock wait of a batch's apply over 1 ms is logged by the server, too.
    await execute(dsn, f"ALTER DATABASE {database} SET deadlock_timeout = '1ms'")
    each = {"mix": MIX, "max_batches": 40, "rate": 40.0, "concurrency": 3}
    alpha = settings_for(dsn, tmp_path / "a", daemon={"instance": "alpha"}, **each)
    beta = settings_for(dsn, tmp_path / "b", daemon={"instance": "beta"}, **each)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_lock_waits(dsn, stop))
    codes = await asyncio.gather(run_in_process(alpha), run_in_process(beta))
    stop.set()
    assert codes == [0, 0]
    assert await watcher == []
    counts = await check_changes(dsn, await read_stream(dsn))
    assert counts.statuses == {"COMPLETED": 80}, counts
    assert counts.updated > 200 and counts.deleted > 100, counts
    # Both instances changed orders: the windows went to either.
    changers = await fetchval(
        dsn, "SELECT count(DISTINCT instance) FROM batch_control WHERE updated > 0"
    )
    assert changers == 2


async def _wait_for_apply(dsn: str) -> None:
    async def applying() -> bool:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            return bool(
                await fetchval(
                    dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = 'cdcfeed' AND state = 'active' "
                    "AND query LIKE 'COPY %cdcfeed_staging%' "
                    "AND now() - query_start > interval '50 milliseconds'",
                )
            )
        return False

    await wait_until("a mixed batch's COPY is running", applying, timeout=90)


async def test_a_daemon_killed_mid_mixed_batch_is_settled_like_any_other(
    dsn: str, tmp_path: Path
) -> None:
    await prepare_slot(dsn)
    # Big batches, so that one is caught mid-COPY; the first ones only insert (nothing to
    # change yet), those after them update and delete.
    big = ("--batch-size", "100000", "--concurrency", "1", "--instance", "kenny", "--mix", MIX)
    log = tmp_path / "first.log"
    process = spawn(log, *daemon_args(dsn, tmp_path / "feed", *big, rate=2))
    try:
        await _wait_for_apply(dsn)
        process.kill()
        process.wait(10)
    finally:
        process.kill()
        process.wait()
    assert await count_batches(dsn, "status = 'IN_PROGRESS'") == 1, log.read_text()

    again = tmp_path / "again.log"
    process = spawn(again, *daemon_args(dsn, tmp_path / "feed", *big, rate=2, max_batches=1))
    try:
        code = await asyncio.to_thread(process.wait, 180)
    finally:
        process.kill()
        process.wait()
    stderr = again.read_text()
    assert code == 0, stderr
    assert "left IN_PROGRESS by an earlier run" in stderr
    counts = await check_changes(dsn, await read_stream(dsn))
    assert counts.updated > 0, counts
    settled = await count_batches(dsn, "error = 'interrupted' OR recovered")
    assert settled == 1, counts
