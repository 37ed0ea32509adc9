"""Faults done for real: server restarts and outages, a daemon killed mid-COPY, locks, feed dir
trouble. After each, the ledger must satisfy the invariant in full and a daemon that was not
killed must still be loading.

Tests that stop or restart a server use a private one, so the rest of the suite never sees it
go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cdcfeed.database.catalog import statements
from cdcfeed.database.ledger import Ledger
from tests.support import (
    FAULTS,
    PostgresCluster,
    at_least,
    check_invariant,
    count_batches,
    create_schema,
    daemon_args,
    equals,
    fetchval,
    killed_and_restarted,
    names_for,
    prepare_slot,
    read_stream,
    running,
    settings_for,
    spawn,
    wait_for_batches,
    wait_until,
)


async def cut_off_batches_settled(dsn: str, back: Any) -> None:
    """While the daemon runs: the batches a server's going away cut off (started before it
    was `back`) are settled by the daemon's own retries, whose backoff reaches 10 s."""
    await wait_until(
        "the batches the server cut off are settled",
        lambda: count_batches(dsn, "status = 'IN_PROGRESS' AND started_at < $1", back),
        equals(0),
    )


async def settled_in_full(dsn: str) -> dict[str, int]:
    """Waits for reconciliation to leave nothing IN_PROGRESS, then checks the invariant."""
    await wait_until(
        "nothing is IN_PROGRESS", lambda: count_batches(dsn, "status = 'IN_PROGRESS'"), equals(0)
    )
    return await check_invariant(dsn)


# --- server restarts and outages --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_a_server_restart_during_load_loses_nothing(
    private_server: PostgresCluster, private_dsn: str, tmp_path: Path, mode: str
) -> None:
    await prepare_slot(private_dsn)
    settings = settings_for(private_dsn, tmp_path / "feed", FAULTS, load={"batch_size": 5000})
    async with running(settings) as daemon:
        before = await wait_for_batches(private_dsn, more_than=5)
        await asyncio.to_thread(private_server.restart, mode)
        back = await fetchval(private_dsn, "SELECT now()")
        # Loading resumes by itself, with the connections the pool had before replaced.
        await wait_for_batches(private_dsn, more_than=before + 10)
        await cut_off_batches_settled(private_dsn, back)
        assert await daemon.ready()
        assert await daemon.metric("cdcfeed_database_up") == 1
    counts = await settled_in_full(private_dsn)
    # The stream side too: every COMPLETED batch arrived whole in its one transaction.
    await check_invariant(private_dsn, await read_stream(private_dsn))
    assert counts["COMPLETED"] > before + 10


async def test_an_outage_pauses_the_load_and_it_resumes_by_itself(
    private_server: PostgresCluster, private_dsn: str, tmp_path: Path
) -> None:
    await prepare_slot(private_dsn)
    settings = settings_for(private_dsn, tmp_path / "feed", FAULTS, load={"batch_size": 2000})
    async with running(settings) as daemon:
        before = await wait_for_batches(private_dsn, more_than=5)
        await asyncio.to_thread(private_server.stop, "fast")
        down_since = time.monotonic()

        async def unready() -> bool:
            return not await daemon.ready()

        await wait_until("/readyz reports unready", unready, timeout=10)
        assert await daemon.metric("cdcfeed_database_up") == 0
        # About rate x outage (20/s); the first few runs may still have found the database
        # "up". At least 100 skipped within 20 s of the outage's start.
        skipped = await wait_until(
            "100 runs skipped while the database is down",
            lambda: daemon.metric("cdcfeed_batches_skipped_total", reason="database_down"),
            at_least(100),
            timeout=20 - (time.monotonic() - down_since),
        )
        assert not await daemon.ready()
        assert skipped >= 100, skipped
        await asyncio.to_thread(private_server.start)
        back = await fetchval(private_dsn, "SELECT now()")
        await wait_for_batches(private_dsn, more_than=before + 10, timeout=40)
        await cut_off_batches_settled(private_dsn, back)
        assert await daemon.ready()
        assert await daemon.metric("cdcfeed_database_up") == 1
    counts = await settled_in_full(private_dsn)
    await check_invariant(private_dsn, await read_stream(private_dsn))
    assert counts["COMPLETED"] > before + 10


# --- killed daemons and leases ----------------------------------------------------------------


async def _wait_for_copy(dsn: str, application_name: str = "cdcfeed") -> None:
    async def copying() -> bool:
        try:
            return bool(
                await fetchval(
                    dsn,
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND application_name = $1 AND state = 'active' AND query LIKE 'COPY %' "
                    "AND now() - query_start > interval '50 milliseconds'",
                    application_name,
                )
            )
        except (OSError, asyncpg.PostgresError):
            return False

    await wait_until("a COPY is running", copying, timeout=60)


async def test_a_daemon_killed_mid_copy_settles_its_batch_when_it_starts_again(
    dsn: str, tmp_path: Path
) -> None:
    big = ("--rate", "2", "--batch-size", "300000", "--concurrency", "1", "--instance", "kenny")
    args = daemon_args(dsn, tmp_path / "feed", *big)
    await killed_and_restarted(dsn, tmp_path, args, lambda: _wait_for_copy(dsn), timeout=120)
    counts = await check_invariant(dsn)
    assert counts.get("COMPLETED", 0) >= 1
    interrupted = await count_batches(dsn, "error = 'interrupted' OR recovered")
    assert interrupted == 1, counts


async def test_a_dead_instance_is_settled_by_the_live_ones_and_a_live_one_never(
    private_dsn: str, tmp_path: Path
) -> None:
    dsn = private_dsn
    lease = {
        "CDCFEED_DAEMON__HEARTBEAT_INTERVAL": "0.3",
        "CDCFEED_DAEMON__LEASE_DURATION": "1.0",
    }
    victim_args = ("--rate", "4", "--batch-size", "200000", "--concurrency", "1")
    log = tmp_path / "victim.log"
    victim = spawn(
        log, *daemon_args(dsn, tmp_path / "v", *victim_args, "--instance", "victim"), **lease
    )
    # Two survivors reconciling at the same time, with leases short enough to lapse quickly.
    fast_lease = {"heartbeat_interval": 0.3, "lease_duration": 1.0}
    survivors = [
        settings_for(
            dsn,
            tmp_path / name,
            FAULTS,
            load={"rate": 10.0, "batch_size": 200},
            daemon={"instance": name, **fast_lease},
        )
        for name in ("alpha", "beta")
    ]
    try:
        async with running(survivors[0]), running(survivors[1]):
            await _wait_for_copy(dsn)
            # Live instances reconciling each other's leases, until all three renewed theirs
            # 2 s on (twice the survivors' lease duration): nobody is touched.
            later = await fetchval(dsn, "SELECT now() + interval '2 seconds'")
            await wait_until(
                "every instance renewed its lease 2 s on",
                lambda: fetchval(
                    dsn, "SELECT count(*) FROM cdcfeed_instances WHERE heartbeat_at > $1", later
                ),
                at_least(3),
                timeout=15,
            )
            assert await count_batches(dsn, "error = 'interrupted' OR recovered") == 0
            await _wait_for_copy(dsn)
            victim.kill()
            victim.wait(10)
            killed_at = await count_batches(dsn, "instance = 'alpha' AND status = 'COMPLETED'")

            async def victim_settled() -> bool:
                return (
                    await count_batches(dsn, "instance = 'victim' AND status = 'IN_PROGRESS'") == 0
                )

            await wait_until("the survivors settle the victim's batch", victim_settled, timeout=15)
            # And they keep loading.
            await wait_for_batches(dsn, more_than=await count_batches(dsn) + 5)
            assert (
                await count_batches(dsn, "instance = 'alpha' AND status = 'COMPLETED'") > killed_at
            )
    finally:
        victim.kill()
        victim.wait()
    counts = await settled_in_full(dsn)
    assert counts["COMPLETED"] > 10
    settled = await fetchval(
        dsn, "SELECT count(*) FROM batch_control WHERE error = 'interrupted' OR recovered"
    )
    assert settled >= 1, log.read_text()
    # Only the victim's batches were ever settled for someone else.
    assert (
        await fetchval(
            dsn,
            "SELECT count(*) FROM batch_control "
            "WHERE (error = 'interrupted' OR recovered) AND instance <> 'victim'",
        )
        == 0
    )


async def test_a_settler_never_decides_a_running_copy_and_a_settled_batch_never_loads(
    dsn: str,
) -> None:
    """The row lock of batch.py step 4 against leases.py, statement by statement."""
    names = names_for(dsn)
    await create_schema(dsn)
    q = statements(names)
    loader = await asyncpg.connect(dsn)
    settler = await asyncpg.connect(dsn)
    try:
        # Two batches of an instance that never took a lease, so they count as abandoned.
        for batch_id, first in ((1, 1), (2, 11)):
            await loader.execute(
                "INSERT INTO batch_control (batch_id, instance, status, row_count, "
                "first_order_id, start_lsn) VALUES ($1, 'ghost', 'IN_PROGRESS', 10, $2, "
                "pg_current_wal_insert_lsn())",
                batch_id,
                first,
            )
        now = datetime.now(UTC)

        # Batch 1's COPY is running (its row locked): the settler must pass over it.
        assert await loader.execute(q.claim_batch(1)) == "UPDATE 1"  # opens the transaction
        await loader.execute(
            "INSERT INTO orders SELECT g, 1, 1, 1.00, now() FROM generate_series(1, 10) g"
        )
        decided = await Ledger(settler, names).settle_abandoned("settler", now)
        assert [(s.batch_id, s.status) for s in decided] == [(2, "FAILED")]
        await loader.execute(q.commit)
        decided = await Ledger(settler, names).settle_abandoned("settler", now)
        assert [(s.batch_id, s.status, s.row_count) for s in decided] == [(1, "COMPLETED", 10)]
        xid = await settler.fetchval("SELECT xid::text FROM batch_control WHERE batch_id = 1")
        assert xid is not None and int(xid) > 0

        # Batch 2 was settled FAILED before its COPY: the loader finds nothing to claim.
        assert await loader.execute(q.claim_batch(2)) == "UPDATE 0"
        await loader.execute(q.rollback)
    finally:
        await loader.close()
        await settler.close()
    assert await check_invariant(dsn) == {"COMPLETED": 1, "FAILED": 1}


# --- locks and timeouts -----------------------------------------------------------------------


async def test_a_copy_stuck_behind_a_table_lock_times_out_as_failed(
    dsn: str, tmp_path: Path
) -> None:
    settings = settings_for(
        dsn, tmp_path / "feed", FAULTS, database={"statement_timeout": 1.0}, load={"concurrency": 2}
    )
    async with running(settings):
        before = await wait_for_batches(dsn, more_than=3)
        blocker = await asyncpg.connect(dsn)
        try:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE orders IN SHARE MODE")  # COPY needs ROW EXCL.
                # Held until COPYs have timed out against it.
                await wait_for_batches(dsn, at_least=2, where="status = 'FAILED'")
        finally:
            await blocker.close()
        await wait_for_batches(dsn, more_than=before + 10)
    counts = await settled_in_full(dsn)
    assert counts.get("FAILED", 0) >= 2, counts
    errors = await fetchval(
        dsn, "SELECT array_agg(DISTINCT error) FROM batch_control WHERE status = 'FAILED'"
    )
    assert all("[57014]" in error for error in errors), errors  # query_canceled


async def test_one_stuck_copy_times_out_while_the_other_slots_keep_the_rate(
    dsn: str, tmp_path: Path
) -> None:
    batch_size = 500
    settings = settings_for(
        dsn,
        tmp_path / "feed",
        FAULTS,
        database={"statement_timeout": 2.0},
        load={"rate": 20.0, "batch_size": batch_size, "concurrency": 3},
    )
    async with running(settings):
        await wait_for_batches(dsn, more_than=3)
        blocker = await asyncpg.connect(dsn)
        squat = blocker.transaction()
        try:
            await squat.start()
            # An uncommitted row inside an order-id block a batch is about to get: that
            # batch's COPY waits on the key; the batches after it must not.
            next_id = await blocker.fetchval("SELECT next_order_id FROM cdcfeed_order_ids")
            await blocker.execute(
                "INSERT INTO orders VALUES ($1, -1, 1, 1.00, now())",
                next_id + 5 * batch_size + 7,
            )
            during = await count_batches(dsn)
            # Within 3 s at 20/s with one slot stuck, the other two keep up with nearly all.
            completed_while_stuck = (
                await wait_for_batches(dsn, at_least=during + 40, timeout=3.0) - during
            )
            # Held until the stuck COPY has timed out; the squatter never commits.
            await wait_for_batches(dsn, at_least=1, where="status = 'FAILED'")
            await squat.rollback()
        finally:
            await blocker.close()
        await wait_for_batches(dsn, more_than=await count_batches(dsn) + 5)
    assert completed_while_stuck >= 40, completed_while_stuck
    counts = await settled_in_full(dsn)
    assert counts.get("FAILED") == 1, counts
    error = await fetchval(dsn, "SELECT error FROM batch_control WHERE status = 'FAILED'")
    assert "[57014]" in error


# --- feed dir trouble -------------------------------------------------------------------------


def _can_mount(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return False
    return True


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, so the feed dir can really fill up or turn read-only."""
    mount = tmp_path / "disk"
    if not _can_mount(mount):
        if os.environ.get("CI"):
            pytest.fail("cannot mount a tmpfs (CI runs as root and should be able to)")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _fill(disk: Path, leave: int) -> None:
    """Takes all but `leave` bytes of the file system's free space."""
    free = shutil.disk_usage(disk).free
    with (disk / "filler").open("wb") as handle, contextlib.suppress(OSError):
        handle.write(b"\0" * max(0, free - leave))


async def _feed_trouble(
    dsn: str,
    feed: Path,
    break_it: Any,
    fix_it: Any,
    expect: str | tuple[str, ...],
    **feed_settings: Any,
) -> None:
    expected = (expect,) if isinstance(expect, str) else expect
    settings = settings_for(
        dsn,
        feed,
        FAULTS,
        load={"rate": 20.0, "batch_size": 2000, "concurrency": 2},
        feed={"min_free_bytes": 0, "keep_files": 5, **feed_settings},
    )
    async with running(settings):
        await wait_for_batches(dsn, more_than=3)
        await asyncio.to_thread(break_it)
        await wait_for_batches(dsn, at_least=3, where="status = 'FAILED'", timeout=15)
        await asyncio.to_thread(fix_it)
        await wait_for_batches(dsn, more_than=await count_batches(dsn) + 5)
    counts = await settled_in_full(dsn)
    assert counts["FAILED"] >= 3
    errors = await fetchval(
        dsn, "SELECT array_agg(DISTINCT error) FROM batch_control WHERE status = 'FAILED'"
    )
    for error in errors:
        # "cannot write feed file …" mostly; a file removed between its write and its COPY
        # fails as FileNotFoundError from the COPY instead, with the same reason.
        assert any(reason in error for reason in expected), errors
    # No partial file was kept, nor any loaded: FAILED batches hold no rows (the invariant).
    assert not list(feed.glob(".*.tmp"))


async def test_the_feed_dir_removed_then_restored(dsn: str, tmp_path: Path) -> None:
    feed = tmp_path / "feed"
    await _feed_trouble(
        dsn,
        feed,
        lambda: shutil.rmtree(feed),
        lambda: feed.mkdir(),
        "No such file or directory",
    )


async def test_the_feed_dir_replaced_by_a_file_then_restored(dsn: str, tmp_path: Path) -> None:
    feed = tmp_path / "feed"

    def break_it() -> None:
        shutil.rmtree(feed)
        feed.write_text("not a directory")

    def fix_it() -> None:
        feed.unlink()
        feed.mkdir()

    # A batch may land between the removal and the file's creation: either reason is right.
    await _feed_trouble(
        dsn, feed, break_it, fix_it, ("Not a directory", "No such file or directory")
    )


async def test_the_feed_dir_read_only_then_writable(dsn: str, small_disk: Path) -> None:
    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(small_disk)], check=True)

    await _feed_trouble(
        dsn,
        small_disk / "feed",
        lambda: remount("ro"),
        lambda: remount("rw"),
        "Read-only file system",
    )


async def test_the_feed_dir_full_then_freed(dsn: str, small_disk: Path) -> None:
    # Leave less than one feed file (~80 KB): the write fails part-way, not at the open.
    await _feed_trouble(
        dsn,
        small_disk / "feed",
        lambda: _fill(small_disk, leave=20_000),
        lambda: (small_disk / "filler").unlink(),
        "disk full",
    )


async def test_a_full_disk_skips_runs_before_any_batch_starts(dsn: str, small_disk: Path) -> None:
    settings = settings_for(
        dsn,
        small_disk / "feed",
        FAULTS,
        load={"rate": 20.0, "batch_size": 2000, "concurrency": 2},
        feed={"min_free_bytes": 1 << 20, "keep_files": 5},
    )
    async with running(settings) as daemon:
        before = await wait_for_batches(dsn, more_than=3)
        await asyncio.to_thread(_fill, small_disk, 512 << 10)
        skipped = await wait_until(
            "10 runs skipped for the full disk",
            lambda: daemon.metric("cdcfeed_batches_skipped_total", reason="disk_full"),
            at_least(10),
            timeout=10,
        )
        assert skipped >= 10, skipped
        (small_disk / "filler").unlink()
        await wait_for_batches(dsn, more_than=before + 5)
    counts = await settled_in_full(dsn)
    assert counts.get("FAILED", 0) == 0, counts


async def test_a_copy_to_a_hung_backend_is_cut_off_by_the_client_timeout(
    dsn: str, tmp_path: Path
) -> None:
    """A stopped backend cannot enforce statement_timeout; the client's own bound must."""
    log = tmp_path / "daemon.log"
    daemon = spawn(
        log,
        *daemon_args(dsn, tmp_path, rate=2, batch_size=200_000, concurrency=2),
        CDCFEED_DATABASE__STATEMENT_TIMEOUT="2",
    )
    stopped: int | None = None
    try:
        conn = await asyncpg.connect(dsn)
        try:
            stopped = await wait_until(
                "a COPY is running",
                lambda: conn.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state = 'active' AND query LIKE 'COPY%' LIMIT 1"
                ),
                timeout=60,
                every=0.01,
                detail=log.read_text,
            )
            os.kill(stopped, signal.SIGSTOP)
            # Past the client's bound (statement_timeout + 5 s), then let the backend go on.
            await wait_until(
                "the client gives up on the COPY",
                lambda: "got no answer" in log.read_text(),
                timeout=30,
                detail=log.read_text,
            )
            os.kill(stopped, signal.SIGCONT)
            stopped = None
            await wait_until(
                "the hung COPY's batch is FAILED",
                lambda: conn.fetchval(
                    "SELECT count(*) > 0 FROM batch_control WHERE error LIKE "
                    "'%got no answer%' AND status = 'FAILED'"
                ),
                timeout=60,
                every=0.2,
                detail=lambda: log.read_text()[-3000:],
            )
            before = await conn.fetchval(
                "SELECT count(*) FROM batch_control WHERE status = 'COMPLETED'"
            )
            await wait_until(
                "a batch completes after it",
                lambda: conn.fetchval(
                    "SELECT count(*) FROM batch_control WHERE status = 'COMPLETED'"
                ),
                lambda completed: completed > before,
                timeout=60,
                every=0.2,
                detail=lambda: log.read_text()[-3000:],
            )
        finally:
            await conn.close()
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    assert daemon.returncode == 0, log.read_text()
    await check_invariant(dsn)
