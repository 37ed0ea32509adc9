"""`cdcfeed verify`, continuous verification and slot metrics, on real servers.

verify must pass clean runs (FAILED batches and a server restart included) and name the batch
and the reason for every injected fault; the slot metrics must show lag for a slot nobody
reads, keep reporting while it is inactive, and time confirmations when it advances.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cdcfeed.database import VerifySession
from cdcfeed.proof.slot.runner import Verifier
from tests.support import (
    PUBLICATION,
    PostgresCluster,
    at_least,
    equals,
    execute,
    fetchval,
    names_for,
    prepare_slot,
    run_cli,
    run_in_process,
    running,
    settings_for,
    wait_for_batches,
    wait_until,
)

SLOT = "test_slot"
# A row squatting in the third batch's order-id block makes that COPY violate the key.
TRAP = """
    INSERT INTO orders VALUES (250, -1, 1, 10.00, now());
    UPDATE cdcfeed_order_ids SET next_order_id = 1;
"""


def verify(dsn: str, *args: str, slot: str = SLOT, publication: str = PUBLICATION) -> Any:
    """`cdcfeed verify --format json` as a user runs it: (exit code, report, stderr)."""
    result = run_cli("verify", "--dsn", dsn, "--slot", slot, "--publication", publication, *args)
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout) if "--format" in args else result.stdout
    return result.returncode, report, result.stderr


async def ledger_counts(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        return dict(await conn.fetch("SELECT status, count(*) FROM batch_control GROUP BY 1"))
    finally:
        await conn.close()


def violations_of(report: dict[str, Any]) -> dict[int | None, str]:
    return {v["batch_id"]: v["reason"] for v in report["violations"]}


# --- clean runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["pg15", "pg18"], indirect=True)
async def test_verify_passes_a_clean_run_and_resumes(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn)
    assert await run_in_process(settings_for(dsn, feed_dir, batch_size=300, max_batches=25)) == 0

    code, report, stderr = verify(dsn, "--format", "json")

    assert code == 0, (report, stderr)
    assert report["holds"] is True
    assert (report["batches_verified"], report["completed"], report["failed"]) == (25, 25, 0)
    assert report["rows"] == 25 * 300
    assert report["violation_count"] == 0 and report["waiting"] == 0
    assert report["this_run"]["batches_verified"] == 25

    # Progress is kept: a second run reads only what is new and keeps the totals.
    assert await run_in_process(settings_for(dsn, feed_dir, batch_size=300, max_batches=5)) == 0
    code, text, _ = verify(dsn)
    assert code == 0
    assert "invariant holds" in text
    assert "batches verified: 30 (30 COMPLETED, 0 FAILED), rows: 9000, violations: 0" in text
    assert "this run: 5 batches verified" in text


async def test_verify_reads_in_bounded_chunks(dsn: str, feed_dir: Path) -> None:
    """Chunks far smaller than a batch: each read ends at a whole transaction, none lost."""
    await prepare_slot(dsn)
    assert await run_in_process(settings_for(dsn, feed_dir, batch_size=200, max_batches=12)) == 0
    conn = await asyncpg.connect(dsn)
    try:
        session = VerifySession(conn, names_for(dsn))
        verifier = Verifier(session, SLOT, PUBLICATION, chunk_changes=50)
        await verifier.prepare(create_slot=False)
        await verifier.run_pass()
        report = await verifier.report()
        position = await conn.fetchval(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1", SLOT
        )
    finally:
        await conn.close()
    assert report.holds, report.as_text()
    assert (report.completed, report.rows) == (12, 12 * 200)
    # The slot was advanced to what verify recorded, no further.
    assert report.position == _lsn_text(position)


def _lsn_text(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


async def test_verify_passes_a_run_with_failed_batches(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn, before_slot=TRAP)
    settings = settings_for(dsn, feed_dir, batch_size=100, max_batches=8, concurrency=1)
    assert await run_in_process(settings) == 0
    assert await ledger_counts(dsn) == {"COMPLETED": 7, "FAILED": 1}

    code, report, stderr = verify(dsn, "--format", "json")

    assert code == 0, (report, stderr)
    assert (report["completed"], report["failed"], report["rows"]) == (7, 1, 700)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_verify_passes_a_run_through_a_server_restart(
    dsn: str, feed_dir: Path, server: PostgresCluster, mode: str
) -> None:
    """The load and the daemon's own continuous verifier both ride out the restart; then a
    `verify` of a slot nobody read during the run, and of the verifier's slot, both hold."""
    await prepare_slot(dsn)
    settings = settings_for(
        dsn, feed_dir, rate=20, batch_size=200, max_batches=80, cdc=_cdc(verify=True)
    )
    daemon = asyncio.create_task(run_in_process(settings))
    await wait_for_batches(dsn, at_least=10, timeout=60)
    await asyncio.to_thread(server.restart, mode)
    assert await asyncio.wait_for(daemon, timeout=120) == 0
    counts = await ledger_counts(dsn)
    assert counts.get("COMPLETED", 0) >= 20, counts
    assert "IN_PROGRESS" not in counts, counts

    code, report, stderr = verify(dsn, "--format", "json")
    assert code == 0, (report, stderr)
    assert report["completed"] == counts["COMPLETED"]
    assert report["failed"] == counts.get("FAILED", 0)

    # The daemon's slot: created once the daemon ran, so it proves what came after.
    code, report, stderr = verify(
        dsn, "--format", "json", slot="cdcfeed_verify", publication="cdcfeed"
    )
    assert code == 0, (report, stderr)
    assert report["completed"] >= 10
    assert report["waiting"] == 0


# --- injected faults ---------------------------------------------------------------------------


@pytest.fixture
async def loaded(dsn: str, feed_dir: Path) -> str:
    """Ten COMPLETED batches of 100 rows, order ids 1..1000, and a slot that saw them all."""
    await prepare_slot(dsn)
    assert await run_in_process(settings_for(dsn, feed_dir, batch_size=100, max_batches=10)) == 0
    return dsn


@pytest.mark.parametrize(
    ("fault", "reasons"),
    [
        pytest.param(
            [
                "INSERT INTO orders VALUES (5000000, 4, 1, 1.00, now())",
                "UPDATE batch_control SET row_count = row_count + 1 WHERE batch_id = 4",
            ],
            ["its rows arrived in 2 transactions", "not the ledger's xid", "outside its bracket"],
            id="row-smuggled-from-another-transaction",
        ),
        pytest.param(
            ["UPDATE batch_control SET row_count = row_count - 1 WHERE batch_id = 4"],
            ["the stream carried 100 rows, the ledger says 99"],
            id="ledger-row-count-disagrees",
        ),
        pytest.param(
            ["UPDATE batch_control SET end_lsn = start_lsn + 8 WHERE batch_id = 4"],
            ["lies outside its bracket"],
            id="end-lsn-below-the-commit",
        ),
    ],
)
async def test_verify_names_the_batch_and_the_reason(
    loaded: str, fault: list[str], reasons: list[str]
) -> None:
    await execute(loaded, *fault)

    code, report, _ = verify(loaded, "--format", "json")

    assert code == 1
    assert report["holds"] is False
    found = violations_of(report)
    assert list(found) == [4], found
    for reason in reasons:
        assert reason in found[4], found[4]
    # The text report: one line per violation, naming the batch and the reason.
    code, text, _ = verify(loaded)
    assert code == 1
    assert "INVARIANT VIOLATED" in text
    assert [line for line in text.splitlines() if line.startswith("violation: ")] == [
        f"violation: batch 4: {found[4]}"
    ]


async def test_verify_catches_rows_of_a_failed_batch(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn, before_slot=TRAP)
    settings = settings_for(dsn, feed_dir, batch_size=100, max_batches=5, concurrency=1)
    assert await run_in_process(settings) == 0
    failed = await fetchval(dsn, "SELECT batch_id FROM batch_control WHERE status = 'FAILED'")
    assert failed == 3
    await execute(dsn, "INSERT INTO orders VALUES (9000000, 3, 1, 1.00, now())")

    code, report, _ = verify(dsn, "--format", "json")

    assert code == 1
    found = violations_of(report)
    assert list(found) == [3]
    assert "FAILED in the ledger, yet 1 of its rows reached the stream" in found[3]


async def test_verify_catches_orders_dropped_from_the_publication(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn)
    settings = settings_for(dsn, feed_dir, rate=20, batch_size=100, max_batches=30)
    daemon = asyncio.create_task(run_in_process(settings))
    await wait_for_batches(dsn, at_least=8, timeout=60)
    # Batches committing between these two positions may go either way.
    before_drop = await fetchval(dsn, "SELECT pg_current_wal_insert_lsn()")
    await execute(dsn, f"ALTER PUBLICATION {PUBLICATION} DROP TABLE orders")
    dropped_after = await fetchval(dsn, "SELECT pg_current_wal_insert_lsn()")
    assert await daemon == 0

    code, report, _ = verify(dsn, "--format", "json")

    assert code == 1
    found = violations_of(report)
    assert found, report
    assert all(reason.startswith("missing from the stream") for reason in found.values())
    conn = await asyncpg.connect(dsn)
    try:
        later = {
            r[0]
            for r in await conn.fetch(
                "SELECT batch_id FROM batch_control WHERE status = 'COMPLETED' AND start_lsn > $1",
                dropped_after,
            )
        }
        earlier = {
            r[0]
            for r in await conn.fetch(
                "SELECT batch_id FROM batch_control WHERE status = 'COMPLETED' AND end_lsn < $1",
                before_drop,
            )
        }
    finally:
        await conn.close()
    # Every batch after the drop is missing; every batch finished before it arrived.
    assert later and later <= set(found), (later, found)
    assert len(earlier) >= 8 and not found.keys() & earlier
    assert report["completed"] == 30 and report["violation_count"] == len(found)
    assert "is public.orders in publication cdcfeed_test?" in next(iter(found.values()))


async def test_verify_mistakes_are_one_line_and_exit_2(loaded: str) -> None:
    code, _, stderr = verify(loaded, slot="no_such_slot")
    assert code == 2
    assert stderr.strip().splitlines()[-1].startswith("cdcfeed: cdc.verify_slot: no replication")
    code, _, stderr = verify(loaded, "--create-slot", slot="fresh", publication="no_such_pub")
    assert code == 2
    assert "cdc.publication" in stderr.strip().splitlines()[-1]


async def test_init_db_creates_the_publication_and_verify_its_own_slot(
    dsn: str, feed_dir: Path
) -> None:
    for _ in range(2):  # idempotent
        result = run_cli("init-db", "--dsn", dsn, "--publication", "pub")
        assert result.returncode == 0, result.stderr
    tables = await fetchval(
        dsn,
        "SELECT array_agg(tablename::text ORDER BY tablename) FROM pg_publication_tables "
        "WHERE pubname = 'pub'",
    )
    assert tables == ["batch_control", "orders"]
    code, report, stderr = verify(
        dsn, "--create-slot", "--format", "json", slot="mine", publication="pub"
    )
    assert code == 0, stderr
    assert report["batches_verified"] == 0
    assert await run_in_process(settings_for(dsn, feed_dir, max_batches=3)) == 0
    code, report, _ = verify(
        dsn, "--create-slot", "--format", "json", slot="mine", publication="pub"
    )
    assert (code, report["completed"]) == (0, 3)


# --- the daemon: continuous verification and slot metrics ------------------------------------


def _cdc(**values: Any) -> dict[str, Any]:
    return {"poll_interval": 0.2, **values}


@pytest.mark.parametrize("server", ["pg15", "pg18"], indirect=True)
async def test_slot_metrics_show_lag_and_confirmations(
    dsn: str, feed_dir: Path, server: PostgresCluster
) -> None:
    await prepare_slot(dsn)
    settings = settings_for(dsn, feed_dir, max_batches=20, concurrency=1)
    assert await run_in_process(settings) == 0
    # One batch at start, then none for a long while: the numbers hold still.
    settings = settings_for(dsn, feed_dir, rate=0.001, cdc=_cdc())
    async with running(settings) as daemon:
        await wait_for_batches(dsn, at_least=21, timeout=60)

        async def unconfirmed() -> float | None:
            return (await daemon.scrape()).get("cdcfeed_unconfirmed_batches", slot=SLOT)

        await wait_until("21 batches unconfirmed", unconfirmed, equals(21.0))
        before = await daemon.scrape()
        assert before.get("cdcfeed_replication_slot_active", slot=SLOT) == 0
        lag = before.get("cdcfeed_replication_slot_lag_bytes", slot=SLOT)
        assert lag is not None and lag > 0
        retained = before.get("cdcfeed_replication_slot_retained_wal_bytes", slot=SLOT)
        assert retained is not None and retained >= lag
        assert before.get("cdcfeed_batch_confirm_seconds_count", slot=SLOT) == 0
        # max_slot_wal_keep_size is unlimited on the test servers: nothing to report.
        assert before.get("cdcfeed_replication_slot_safe_wal_size_bytes", slot=SLOT) is None

        # A consumer confirms the first ten batches.
        await execute(
            dsn,
            f"SELECT pg_replication_slot_advance('{SLOT}', end_lsn) "
            "FROM batch_control WHERE batch_id = 10",
        )

        async def confirmations() -> float | None:
            return (await daemon.scrape()).get("cdcfeed_batch_confirm_seconds_count", slot=SLOT)

        await wait_until("10 confirmations timed", confirmations, equals(10.0))
        after = await daemon.scrape()
        assert after.get("cdcfeed_unconfirmed_batches", slot=SLOT) == 11
        confirm_sum = after.get("cdcfeed_batch_confirm_seconds_sum", slot=SLOT)
        assert confirm_sum is not None and confirm_sum > 0
        # Still no consumer attached, and the lag is still reported, now smaller.
        assert after.get("cdcfeed_replication_slot_active", slot=SLOT) == 0
        smaller = after.get("cdcfeed_replication_slot_lag_bytes", slot=SLOT)
        assert smaller is not None and 0 < smaller < lag

        # A consumer attaches to another slot, then goes away: the slot stays reported.
        await execute(dsn, "SELECT pg_create_logical_replication_slot('live', 'pgoutput')")
        consumer = await asyncio.create_subprocess_exec(
            str(server.bin_dir / "pg_recvlogical"),
            *("--dbname", dsn, "--slot", "live", "--start", "--no-loop", "--file", "/dev/null"),
            *("--option", "proto_version=1", "--option", f"publication_names={PUBLICATION}"),
        )

        async def live_active() -> float | None:
            return (await daemon.scrape()).get("cdcfeed_replication_slot_active", slot="live")

        try:
            await wait_until("slot live is active", live_active, equals(1.0))
        finally:
            consumer.terminate()
            await consumer.wait()
        await wait_until("slot live is inactive", live_active, equals(0.0))
        gone_quiet = await daemon.scrape()
        assert gone_quiet.get("cdcfeed_replication_slot_lag_bytes", slot="live") is not None
        assert gone_quiet.get("cdcfeed_unconfirmed_batches", slot="live") == 0

        # A dropped slot's series disappear.
        await execute(dsn, "SELECT pg_drop_replication_slot('live')")
        await wait_until("slot live is no longer reported", live_active, equals(None))


async def test_status_shows_which_slots_confirmed_each_batch(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn)
    # One at a time, so that batch order is end_lsn order.
    assert await run_in_process(settings_for(dsn, feed_dir, max_batches=4, concurrency=1)) == 0
    await execute(
        dsn,
        f"SELECT pg_replication_slot_advance('{SLOT}', end_lsn) "
        "FROM batch_control WHERE batch_id = 2",
    )
    result = run_cli("status", "--dsn", dsn, "--format", "json")
    assert result.returncode == 0, result.stderr
    confirmed = {b["batch_id"]: b["confirmed_by"] for b in json.loads(result.stdout)}
    assert confirmed == {1: {SLOT: True}, 2: {SLOT: True}, 3: {SLOT: False}, 4: {SLOT: False}}
    table = run_cli("status", "--dsn", dsn).stdout.splitlines()
    assert SLOT in table[0].split()
    column = table[0].split().index(SLOT)
    assert {line.split()[0]: line.split()[column] for line in table[1:]} == {
        "4": "no",
        "3": "no",
        "2": "yes",
        "1": "yes",
    }


async def test_the_daemon_verifies_continuously(dsn: str, feed_dir: Path) -> None:
    settings = settings_for(dsn, feed_dir, rate=20, batch_size=50, cdc=_cdc(verify=True))
    async with running(settings) as daemon:

        async def verified(result: str) -> float | None:
            return (await daemon.scrape()).get(
                "cdcfeed_verified_batches_total", source="slot", result=result
            )

        await wait_until("10 batches verified", lambda: verified("ok"), at_least(10), timeout=60)
        assert await verified("violation") == 0
        lag = (await daemon.scrape()).get("cdcfeed_verify_lag_bytes")
        assert lag is not None and lag >= 0
        await execute(dsn, "UPDATE orders SET amount = 1 WHERE order_id = 1")
        await wait_until(
            "a violation is found", lambda: verified("violation"), at_least(1), timeout=60
        )
        # Its own slot is watched too, like any other.
        assert (await daemon.scrape()).get(
            "cdcfeed_replication_slot_active", slot="cdcfeed_verify"
        ) is not None

    code, report, _ = verify(dsn, "--format", "json", slot="cdcfeed_verify", publication="cdcfeed")
    assert code == 1
    assert any("UPDATE of order 1" in v["reason"] for v in report["violations"])
