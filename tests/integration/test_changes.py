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
    equals,
    execute,
    fetchval,
    killed_and_restarted,
    prepare_slot,
    read_stream,
    run_cli,
    run_in_process,
    running,
    settings_for,
    wait_for_batches,
    wait_until,
)

MIX = "insert=60,update=25,delete=15"
TOAST = 4096
MARK_LOCK = 7301


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
    args = daemon_args(dsn, tmp_path / "feed", *big, rate=2)
    await killed_and_restarted(dsn, tmp_path, args, lambda: _wait_for_apply(dsn))
    counts = await check_changes(dsn, await read_stream(dsn))
    assert counts.updated > 0, counts
    # Killed mid-COPY, before the statement that applies it, let alone the COMMIT (which
    # the client sends only after that statement, 100,000 inserts long, has answered): the
    # transaction rolled back, and the batch is FAILED.
    settled = await count_batches(dsn, "error = 'interrupted' OR recovered")
    assert settled == 1, counts
    assert await count_batches(dsn, "status = 'FAILED' AND error = 'interrupted'") == 1, counts
    assert await count_batches(dsn, "recovered") == 0, counts


# Holds a mixed batch's COMPLETED mark (step 5, after its transaction committed) until the
# test's session lets go of the advisory lock: the daemon can be killed right there. Not a
# settler's mark (recovered), nor an insert-only batch's.
HOLD_THE_MARK = [
    f"""CREATE FUNCTION hold_the_mark() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.status = 'COMPLETED' AND NOT NEW.recovered AND NEW.updated > 0 THEN
            PERFORM pg_advisory_xact_lock({MARK_LOCK});
        END IF;
        RETURN NEW;
    END $$""",
    """CREATE TRIGGER hold_the_mark BEFORE UPDATE ON batch_control
        FOR EACH ROW WHEN (OLD.status = 'IN_PROGRESS') EXECUTE FUNCTION hold_the_mark()""",
]
HELD = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = 'cdcfeed' AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
)


async def test_a_daemon_killed_after_a_mixed_batch_committed_is_settled_by_its_xid(
    dsn: str, tmp_path: Path
) -> None:
    await prepare_slot(dsn)
    assert run_cli("init-db", "--dsn", dsn).returncode == 0
    await execute(dsn, *HOLD_THE_MARK)
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute(f"SELECT pg_advisory_lock({MARK_LOCK})")

        async def held() -> None:
            await wait_until(
                "a mixed batch committed, its mark held",
                lambda: fetchval(dsn, f"SELECT count(*) FROM ({HELD}) h"),
                timeout=90,
            )

        async def let_go() -> None:
            # The mark's backend outlives the client, waiting: ended, it never commits.
            await execute(dsn, f"SELECT pg_terminate_backend(pid) FROM ({HELD}) h")
            await wait_until(
                "the held mark's backend is gone",
                lambda: fetchval(dsn, f"SELECT count(*) FROM ({HELD}) h"),
                equals(0),
            )
            await execute(dsn, "DROP TRIGGER hold_the_mark ON batch_control")

        args = ("--batch-size", "1000", "--concurrency", "1", "--instance", "kenny", "--mix", MIX)
        await killed_and_restarted(
            dsn,
            tmp_path,
            daemon_args(dsn, tmp_path / "feed", *args, rate=20),
            held,
            after_kill=let_go,
        )
    finally:
        await holder.close()
    counts = await check_changes(dsn, await read_stream(dsn))
    # Its transaction had committed: COMPLETED with what its row recorded, in the stream too.
    recovered = await fetchval(
        dsn,
        "SELECT ARRAY[row_count, updated, deleted] FROM batch_control "
        "WHERE recovered AND status = 'COMPLETED' AND xid IS NOT NULL",
    )
    assert recovered == [600, 250, 150], counts
    assert counts.statuses == {"COMPLETED": counts.statuses["COMPLETED"]}, counts
    assert await count_batches(dsn, "recovered") == 1, counts
