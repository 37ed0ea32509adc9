"""The batch protocol end to end on real servers: the ledger and the change stream agree."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest
from loguru import logger

from cdcfeed.config import load_settings
from cdcfeed.database.schema import init_schema
from tests.support import (
    check_invariant,
    ledger_rows,
    names_for,
    prepare_slot,
    read_stream,
    run_in_process,
    settings_for,
)


@pytest.mark.parametrize("server", ["pg15", "pg18"], indirect=True)
async def test_every_batch_lands_whole_in_its_own_transaction(dsn: str, feed_dir: Path) -> None:
    await prepare_slot(dsn)
    settings = settings_for(dsn, feed_dir, rate=20, batch_size=500, max_batches=100)

    assert await run_in_process(settings) == 0

    stream = await read_stream(dsn)
    counts = await check_invariant(dsn, stream)
    assert counts == {"COMPLETED": 100}
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM orders") == 100 * 500
    finally:
        await conn.close()
    assert len(list(feed_dir.glob("orders_batch_*.csv"))) == 100


async def test_a_failed_copy_leaves_no_rows_and_the_load_goes_on(dsn: str, feed_dir: Path) -> None:
    # A row squatting in the third batch's order-id block makes that COPY violate the key.
    await prepare_slot(
        dsn,
        before_slot="""
        INSERT INTO orders VALUES (250, -1, 1, 10.00, now());
        UPDATE cdcfeed_order_ids SET next_order_id = 1;
    """,
    )
    settings = settings_for(dsn, feed_dir, rate=20, batch_size=100, max_batches=8, concurrency=1)

    assert await run_in_process(settings) == 0

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM orders WHERE batch_id = -1")  # the trap, not a batch
        failed = await conn.fetchrow(
            "SELECT batch_id, error FROM batch_control WHERE status = 'FAILED'"
        )
    finally:
        await conn.close()
    counts = await check_invariant(dsn, await read_stream(dsn))
    assert counts == {"COMPLETED": 7, "FAILED": 1}
    assert failed["batch_id"] == 3
    assert "UniqueViolation" in failed["error"]


async def test_two_instances_on_one_database_never_collide(dsn: str, tmp_path: Path) -> None:
    await prepare_slot(dsn)
    first = settings_for(
        dsn, tmp_path / "a", rate=40, batch_size=200, max_batches=40, daemon={"instance": "alpha"}
    )
    second = settings_for(
        dsn, tmp_path / "b", rate=40, batch_size=300, max_batches=40, daemon={"instance": "beta"}
    )

    codes = await asyncio.gather(run_in_process(first), run_in_process(second))

    assert codes == [0, 0]
    assert await check_invariant(dsn, await read_stream(dsn)) == {"COMPLETED": 80}
    conn = await asyncpg.connect(dsn)
    try:
        per_instance = dict(
            await conn.fetch("SELECT instance, count(*) FROM batch_control GROUP BY 1")
        )
        assert per_instance == {"alpha": 40, "beta": 40}
        assert await conn.fetchval("SELECT count(*) FROM orders") == 40 * 200 + 40 * 300
    finally:
        await conn.close()


async def test_runs_are_skipped_while_the_feed_disk_is_short_of_space(
    dsn: str, feed_dir: Path
) -> None:
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        settings = settings_for(
            dsn, feed_dir, rate=20, duration=1.0, feed={"min_free_bytes": 10**18}
        )
        assert await run_in_process(settings) == 0
    finally:
        logger.remove(sink)
    assert await ledger_rows(dsn) == []
    assert any("disk_full=" in message for message in messages), messages


async def test_init_db_twice_and_from_several_clients_at_once(dsn: str) -> None:
    names = names_for(dsn)
    connections = [await asyncpg.connect(dsn) for _ in range(4)]
    try:
        await asyncio.gather(*(init_schema(conn, names) for conn in connections))
        await init_schema(connections[0], names)
        tables = await connections[0].fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
        next_id = await connections[0].fetchval("SELECT next_order_id FROM cdcfeed_order_ids")
    finally:
        for conn in connections:
            await conn.close()
    assert tables == 4  # orders, batch_control, cdcfeed_order_ids, cdcfeed_instances
    assert next_id == 1


async def test_configured_names_are_quoted_identifiers(dsn: str, feed_dir: Path) -> None:
    settings = load_settings(
        None,
        {
            "database": {
                "dsn": dsn,
                "schema_name": "Load Test",
                "orders_table": 'Or"ders',
                "batch_table": "batch ledger",
            },
            "load": {"rate": 20, "max_batches": 3},
            "feed": {"dir": feed_dir},
            "metrics": {"address": "127.0.0.1:0"},
        },
        environ={},
    )
    assert await run_in_process(settings) == 0
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval('SELECT count(*) FROM "Load Test"."Or""ders"') == 300
        assert (
            await conn.fetchval(
                """SELECT count(*) FROM "Load Test"."batch ledger" WHERE status = 'COMPLETED'"""
            )
            == 3
        )
    finally:
        await conn.close()
