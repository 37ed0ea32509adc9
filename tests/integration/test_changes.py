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
    PostgresCluster,
    check_changes,
    count_batches,
    daemon_args,
    execute,
    fetchval,
    prepare_slot,
    read_stream,
    run_cli,
    run_in_process,
    running,
    settings_for,
    spawn,
    wait_for_batches,
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
    settings = settings_for(dsn, feed_dir, mix=MIX, toast_bytes=TOAST, rate=30.0, seed=11)
    async with running(settings) as daemon:
        await wait_for_batches(dsn, at_least=30, timeout=60)

        async def counted_as_in_the_ledger() -> bool:
            scrape = await daemon.scrape()
            ops = ("insert", "update", "delete")
            metric = [scrape.get("cdcfeed_changes_total", op=op) for op in ops]
            return metric == await ledger_sums(dsn)

        # The metrics count what the ledger holds (read between two batches).
        await wait_until("the metrics match the ledger", counted_as_in_the_ledger)

    counts = await check_changes(dsn, await read_stream(dsn), full=full)
    batches = counts.statuses["COMPLETED"]
    assert counts.statuses == {"COMPLETED": batches} and batches >= 30, counts
    assert counts.inserted == batches * 60
    assert counts.updated > 100 and counts.deleted > 50, counts
    table = run_cli("status", "--dsn", dsn, "--limit", "5")
    assert table.returncode == 0, table.stderr
    assert "inserted  updated  deleted" in table.stdout
    assert "COMPLETED  60        25       15" in table.stdout, table.stdout
    # An update leaves the note alone: the new tuple never carries it; FULL's old one does.
    assert counts.unchanged_toast == counts.updated
    assert counts.resolved_from_old == (counts.updated if full else 0)
    stored = await fetchval(
        dsn, "SELECT min(pg_column_size(note)) FROM orders WHERE note IS NOT NULL"
    )
    assert stored >= TOAST  # out of line and uncompressed (EXTERNAL)


async def ledger_sums(dsn: str) -> list[float]:
    """Orders inserted, updated and deleted by COMPLETED batches, as the ledger says."""
    sums = await fetchval(
        dsn,
        "SELECT ARRAY[sum(row_count), sum(updated), sum(deleted)]::float8[] FROM batch_control "
        "WHERE status = 'COMPLETED'",
    )
    return [float(value or 0) for value in sums]


async def _lock_waits(dsn: str, stop: asyncio.Event) -> list[str]:
    """The applies seen waiting for another transaction's row or table lock until `stop`."""
    seen: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            seen += [
                row[0]
                for row in await conn.fetch(
                    "SELECT query FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE '%inserted AS%' "
                    # Row and table locks; not the relation extension lock concurrent
                    # inserts into one table share, which is no wait for another's rows.
                    "AND wait_event IN ('transactionid', 'tuple', 'relation')"
                )
            ]
            # Samples only: the server's log_lock_waits (checked beside this) sees every wait
            # over 1 ms; polling faster would take a core from the loads it watches.
            await asyncio.sleep(0.025)
    finally:
        await conn.close()
    return seen


def _logged_apply_waits(log: str) -> list[str]:
    """The statements of the server log's lock waits that are a batch's apply."""
    statements = [
        following.split("STATEMENT:", 1)[1].strip()
        for block in log.split("still waiting for ")[1:]
        for following in [block.split("\n", 3)[-1]]
        if "STATEMENT:" in following
    ]
    return [statement for statement in statements if "inserted AS" in statement]


async def test_two_instances_with_mixed_loads_never_wait_for_each_others_rows(
    dsn: str, tmp_path: Path, server: PostgresCluster
) -> None:
    await prepare_slot(dsn)
    database = dsn.rsplit("/", 1)[1]
    # Any lock wait over 1 ms is logged by the server, with its statement, besides the samples.
    await execute(
        dsn,
        f"ALTER DATABASE {database} SET deadlock_timeout = '1ms'",
        f"ALTER DATABASE {database} SET log_lock_waits = on",
    )
    log_start = server.log_file.stat().st_size
    each = {"mix": MIX, "max_batches": 40, "rate": 40.0, "concurrency": 3, "batch_size": 1000}
    alpha = settings_for(dsn, tmp_path / "a", daemon={"instance": "alpha"}, **each)
    beta = settings_for(dsn, tmp_path / "b", daemon={"instance": "beta"}, **each)
    stop = asyncio.Event()
    watcher = asyncio.create_task(_lock_waits(dsn, stop))
    codes = await asyncio.gather(run_in_process(alpha), run_in_process(beta))
    stop.set()
    assert codes == [0, 0]
    assert await watcher == []
    with server.log_file.open(errors="replace") as handle:
        handle.seek(log_start)
        logged = handle.read()
    assert _logged_apply_waits(logged) == []
    counts = await check_changes(dsn, await read_stream(dsn))
    assert counts.statuses == {"COMPLETED": 80}, counts
    assert counts.updated > 2000 and counts.deleted > 1000, counts
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
