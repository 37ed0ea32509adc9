"""`cdcfeed verify` of the change mix on a real server: updates and deletes reach the slot in
their batch's transaction, are judged against the ledger's ids, and the unchanged TOAST values
are reported as the replica identity promises; a ledger that disagrees with the stream is named
by batch.

`mixed_batch` writes a batch as the load's batch protocol does (claim, changes and the ledger's
record of them in one transaction, then COMPLETED with its end_lsn), so these tests do not
depend on how the load picks its rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.support import (
    PUBLICATION,
    at_least,
    execute,
    prepare_slot,
    run_cli,
    run_in_process,
    running,
    settings_for,
    wait_until,
)

SLOT = "test_slot"
NOTE_BYTES = 4096  # stored out of line: the column is EXTERNAL and the row over ~2 KB


def verify(dsn: str, *args: str) -> tuple[int, Any]:
    """`cdcfeed verify --format json`: (exit code, report)."""
    result = run_cli(
        "verify", "--dsn", dsn, "--slot", SLOT, "--publication", PUBLICATION, "--format", "json"
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


async def mixed_batch(
    conn: asyncpg.Connection,
    batch_id: int,
    first: int,
    inserts: int,
    updates: list[int] = [],  # noqa: B006 - never mutated
    deletes: list[int] = [],  # noqa: B006
) -> None:
    """One batch: inserts of `first`.., updates and deletes of earlier orders."""
    await conn.execute(
        """INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id,
                                      start_lsn)
           VALUES ($1, 'test', 'IN_PROGRESS', $2, $3, pg_current_wal_insert_lsn())""",
        batch_id,
        inserts,
        first,
    )
    async with conn.transaction():
        await conn.execute(
            "UPDATE batch_control SET xid = pg_current_xact_id() WHERE batch_id = $1", batch_id
        )
        await conn.execute(
            """INSERT INTO orders (order_id, batch_id, customer_id, amount, created_at, note)
               SELECT id, $1, 1, 10.00, now(), repeat('n', $4)
               FROM generate_series($2::bigint, $2 + $3 - 1) id""",
            batch_id,
            first,
            inserts,
            NOTE_BYTES,
        )
        updated = await conn.fetchval(
            """WITH u AS (
                   UPDATE orders SET updated_at = now(),
                       status = CASE WHEN order_id % 10 = 0 THEN 'cancelled' ELSE 'paid' END
                   WHERE order_id = ANY($1::bigint[]) RETURNING order_id)
               SELECT ARRAY(SELECT order_id FROM u ORDER BY 1)""",
            updates,
        )
        deleted = await conn.fetchval(
            """WITH d AS (DELETE FROM orders WHERE order_id = ANY($1::bigint[])
                          RETURNING order_id)
               SELECT ARRAY(SELECT order_id FROM d ORDER BY 1)""",
            deletes,
        )
        if updates or deletes:
            await conn.execute(
                """UPDATE batch_control SET updated = cardinality($2::bigint[]),
                       deleted = cardinality($3::bigint[]), updated_ids = $2, deleted_ids = $3
                   WHERE batch_id = $1""",
                batch_id,
                updated,
                deleted,
            )
    await conn.execute(
        """UPDATE batch_control SET status = 'COMPLETED', end_lsn = pg_current_wal_insert_lsn(),
               completed_at = now() WHERE batch_id = $1""",
        batch_id,
    )


UPDATES = list(range(1, 26))  # 10 and 20 are cancelled, the rest paid
DELETES = list(range(31, 46))


async def load(dsn: str) -> None:
    """Batch 1 inserts 1..100; batch 2 inserts 101..160, updates 25 and deletes 15 of them."""
    conn = await asyncpg.connect(dsn)
    try:
        await mixed_batch(conn, 1, 1, 100)
        await mixed_batch(conn, 2, 101, 60, UPDATES, DELETES)
    finally:
        await conn.close()


async def fetchrow(dsn: str, query: str) -> asyncpg.Record:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(query)
        assert row is not None
        return row
    finally:
        await conn.close()


def changed(report: dict[str, Any]) -> dict[str, int]:
    return report["changes"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("identity", "unchanged", "resolved"), [("DEFAULT", 25, 0), ("FULL", 0, 25)]
)
async def test_a_mixed_load_holds_under_either_replica_identity(
    dsn: str, identity: str, unchanged: int, resolved: int
) -> None:
    await prepare_slot(dsn)
    await execute(dsn, f"ALTER TABLE orders REPLICA IDENTITY {identity}")
    await load(dsn)

    code, report = verify(dsn)

    assert code == 0, report
    assert report["holds"] and report["batches_verified"] == 2
    assert changed(report) == {
        "inserted": 160,
        "updated": 25,
        "deleted": 15,
        "unchanged_toast": unchanged,
        "resolved_toast": resolved,
    }
    assert report["changed_batches"] == [
        {
            "batch_id": 2,
            "result": "ok",
            "inserted": 60,
            "updated": 25,
            "deleted": 15,
            "unchanged_toast": unchanged,
            "resolved_toast": resolved,
        }
    ]


async def test_a_ledger_that_disagrees_with_the_stream_is_named_by_batch(dsn: str) -> None:
    await prepare_slot(dsn)
    await load(dsn)
    # After the load: the ledger claims an update the stream never carried (a dropped
    # update), and forgets a delete the stream carried.
    await execute(
        dsn,
        """UPDATE batch_control SET updated_ids = updated_ids || 99::bigint,
               deleted_ids = array_remove(deleted_ids, 40::bigint)
           WHERE batch_id = 2""",
    )

    code, report = verify(dsn)

    assert code == 1
    (violation,) = report["violations"]
    assert violation["batch_id"] == 2
    reasons = violation["reason"].split("; ")
    assert "updates missing from the stream: order ids 99 (1 of 26 it updated)" in reasons
    assert "deleted order 40, which it did not delete" in reasons


async def test_changes_of_a_transaction_no_batch_ran_are_stream_violations(dsn: str) -> None:
    await prepare_slot(dsn)
    await load(dsn)
    await execute(dsn, "UPDATE orders SET status = 'paid' WHERE order_id = 150")

    code, report = verify(dsn)

    assert code == 1
    (violation,) = report["violations"]
    assert violation["batch_id"] is None
    assert violation["reason"].startswith("UPDATE of order 150; no batch of the ledger ran it")


# --- the daemon's mixed loads -------------------------------------------------------------

MIX = "insert=60,update=25,delete=15"


async def run_mixed(dsn: str, feed_dir: Path, batches: int) -> None:
    settings = settings_for(
        dsn, feed_dir, mix=MIX, toast_bytes=NOTE_BYTES, max_batches=batches, rate=30.0, seed=5
    )
    assert await run_in_process(settings) == 0


@pytest.mark.parametrize("identity", ["DEFAULT", "FULL"])
async def test_the_daemons_mixed_load_verifies_clean(
    dsn: str, feed_dir: Path, identity: str
) -> None:
    await prepare_slot(dsn, before_slot=f"ALTER TABLE orders REPLICA IDENTITY {identity}")
    await run_mixed(dsn, feed_dir, 20)
    ledger = await fetchrow(
        dsn,
        """SELECT sum(row_count), sum(updated), sum(deleted),
                  count(*) FILTER (WHERE updated + deleted > 0) FROM batch_control""",
    )
    inserted, updated, deleted, changing = (int(v) for v in ledger)
    assert updated > 0 and deleted > 0

    code, report = verify(dsn)

    assert code == 0, report["violations"]
    assert report["batches_verified"] == 20
    # An update never touches the note: every after image lacks it. DEFAULT promises no
    # more; under FULL the old row carries it.
    full = identity == "FULL"
    assert changed(report) == {
        "inserted": inserted,
        "updated": updated,
        "deleted": deleted,
        "unchanged_toast": 0 if full else updated,
        "resolved_toast": updated if full else 0,
    }
    assert len(report["changed_batches"]) == min(20, changing)
    text = run_cli("verify", "--dsn", dsn, "--slot", SLOT, "--publication", PUBLICATION)
    assert f"changes: {inserted} inserted, {updated} updated, {deleted} deleted" in text.stdout


async def test_a_tampered_ledger_after_a_mixed_load_is_named_by_batch(
    dsn: str, feed_dir: Path
) -> None:
    await prepare_slot(dsn)
    await run_mixed(dsn, feed_dir, 12)
    # A batch that updated and one that deleted, each with an id of its window it left alone.
    dropped = await fetchrow(
        dsn,
        """SELECT batch_id, (SELECT min(order_id) FROM orders WHERE status = 'created')
           FROM batch_control WHERE updated > 0 ORDER BY batch_id DESC LIMIT 1""",
    )
    undone = await fetchrow(
        dsn,
        """SELECT batch_id, deleted_ids[1] FROM batch_control WHERE deleted > 0
           ORDER BY batch_id LIMIT 1""",
    )
    await execute(
        dsn,
        f"UPDATE batch_control SET updated_ids = updated_ids || {dropped[1]}::bigint "
        f"WHERE batch_id = {dropped[0]}",
        f"UPDATE batch_control SET deleted_ids = array_remove(deleted_ids, {undone[1]}::bigint) "
        f"WHERE batch_id = {undone[0]}",
    )

    code, report = verify(dsn)

    assert code == 1
    found = {v["batch_id"]: v["reason"] for v in report["violations"]}
    assert set(found) == {dropped[0], undone[0]}
    assert f"updates missing from the stream: order ids {dropped[1]} (1 of" in found[dropped[0]]
    assert f"deleted order {undone[1]}, which it did not delete" in found[undone[0]]


async def test_the_daemon_counts_verified_changes_continuously(dsn: str, feed_dir: Path) -> None:
    settings = settings_for(
        dsn,
        feed_dir,
        mix=MIX,
        toast_bytes=NOTE_BYTES,
        rate=20,
        batch_size=40,
        cdc={"verify": True, "poll_interval": 0.2},
    )
    async with running(settings) as daemon:

        async def verified(op: str) -> float | None:
            return (await daemon.scrape()).get(
                "cdcfeed_verified_changes_total", source="slot", op=op, result="ok"
            )

        await wait_until("updates verified", lambda: verified("update"), at_least(20), timeout=60)
        await wait_until("deletes verified", lambda: verified("delete"), at_least(10), timeout=60)
        scrape = await daemon.scrape()
        assert scrape.get("cdcfeed_unchanged_toast_total", source="slot", resolved="false") > 0
        assert scrape.get("cdcfeed_verified_batches_total", source="slot", result="violation") == 0


async def test_verify_state_of_an_older_version_is_upgraded(dsn: str) -> None:
    await prepare_slot(dsn)
    await load(dsn)
    assert verify(dsn)[0] == 0
    # The state as a version before the change mix left it, with its verdicts.
    await execute(
        dsn,
        "DROP TABLE cdcfeed_verify_pending_changes",
        "DROP INDEX cdcfeed_verify_results_changed_idx",
        """ALTER TABLE cdcfeed_verify_results DROP COLUMN updated, DROP COLUMN deleted,
               DROP COLUMN unchanged_toast, DROP COLUMN resolved_toast""",
    )
    conn = await asyncpg.connect(dsn)
    try:
        await mixed_batch(conn, 3, 161, 10, [150], [151])
    finally:
        await conn.close()

    code, report = verify(dsn)

    assert code == 0, report
    assert report["batches_verified"] == 3
    # The older verdicts count no changes; the new one does.
    assert (changed(report)["updated"], changed(report)["deleted"]) == (1, 1)
