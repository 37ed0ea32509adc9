"""A loading role with too little, or just enough: real roles on the test server.

Missing privileges at start are one line naming the privilege, its object and the GRANT (exit
2, nothing of a batch written); `init-db --grant` gives a role exactly what `run` needs; a
privilege revoked mid-run fails batches, never the daemon, which recovers when it returns.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncpg
from loguru import logger

from tests.support import (
    Daemon,
    as_role,
    at_least,
    count_batches,
    create_schema,
    daemon_args,
    execute,
    fetchval,
    one_error_line,
    run_cli,
    running,
    settings_for,
    wait_until,
)

FAILED = "status = 'FAILED'"


def run_as(dsn: str, role: str, feed_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = daemon_args(as_role(dsn, role), feed_dir, *extra, max_batches=3, rate=20)
    return run_cli(*args, timeout=90)


async def statuses(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) FROM batch_control GROUP BY 1")
    finally:
        await conn.close()
    return {row[0]: row[1] for row in rows}


async def test_run_without_grants_names_each_privilege_and_the_grant(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    await create_schema(dsn)
    line = one_error_line(
        await asyncio.to_thread(run_as, dsn, loader, feed_dir, "--no-init-schema")
    )
    assert f"role {loader} lacks" in line
    assert "SELECT, INSERT, UPDATE on table public.batch_control" in line
    assert "USAGE on sequence public.batch_control_batch_id_seq" in line
    assert f"cdcfeed init-db --grant {loader}" in line
    assert f'GRANT SELECT, INSERT ON TABLE "public"."orders" TO "{loader}"' in line
    assert await statuses(dsn) == {}


async def test_no_usage_on_the_batch_id_sequence(dsn: str, loader: str, feed_dir: Path) -> None:
    assert run_cli("init-db", "--dsn", dsn, "--grant", loader).returncode == 0
    await execute(dsn, f"REVOKE USAGE ON SEQUENCE batch_control_batch_id_seq FROM {loader}")
    line = one_error_line(await asyncio.to_thread(run_as, dsn, loader, feed_dir))
    assert "lacks USAGE on sequence public.batch_control_batch_id_seq" in line
    assert f'GRANT USAGE ON SEQUENCE "public"."batch_control_batch_id_seq" TO "{loader}"' in line
    assert await statuses(dsn) == {}


async def test_no_select_on_orders_leaves_an_earlier_runs_batches_to_a_run_that_may(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    """Settling what an earlier run left reads orders: the check comes before it."""
    assert run_cli("init-db", "--dsn", dsn, "--grant", loader).returncode == 0
    await execute(
        dsn,
        "INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id, "
        "start_lsn, started_at) SELECT id, 'crashed', 'IN_PROGRESS', 5, 1000000 + 5 * id, "
        "pg_current_wal_insert_lsn(), now() - interval '1 hour' FROM generate_series(901, 902) id",
        f"REVOKE SELECT ON orders FROM {loader}",
    )
    extra = ("--instance", "crashed")
    line = one_error_line(await asyncio.to_thread(run_as, dsn, loader, feed_dir, *extra))
    assert "lacks SELECT on table public.orders" in line
    assert await statuses(dsn) == {"IN_PROGRESS": 2}  # untouched, not half-settled

    await execute(dsn, f"GRANT SELECT ON orders TO {loader}")
    result = await asyncio.to_thread(run_as, dsn, loader, feed_dir, *extra)
    assert result.returncode == 0, result.stderr
    assert await statuses(dsn) == {"FAILED": 2, "COMPLETED": 3}


async def test_init_db_and_status_as_a_role_that_cannot_create(dsn: str, loader: str) -> None:
    as_loader = as_role(dsn, loader)
    line = one_error_line(run_cli("status", "--dsn", as_loader))
    assert "schema public holds no cdcfeed ledger" in line and "cdcfeed init-db" in line
    line = one_error_line(run_cli("init-db", "--dsn", as_loader))
    assert f"role {loader} may not create" in line
    assert f"cdcfeed init-db --grant {loader}" in line

    assert run_cli("init-db", "--dsn", dsn).returncode == 0
    line = one_error_line(run_cli("status", "--dsn", as_loader))
    assert "lacks SELECT on table public.batch_control" in line
    assert f'GRANT SELECT ON TABLE "public"."batch_control" TO "{loader}"' in line
    # On a current schema, init-db does no DDL: the role that cannot create may run it.
    assert run_cli("init-db", "--dsn", as_loader).returncode == 0


async def test_init_db_grant_is_all_a_plain_run_needs(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    result = run_cli("init-db", "--dsn", dsn, "--publication", "cdcfeed", "--grant", loader)
    assert result.returncode == 0, result.stderr
    assert f"granted {loader}" in result.stderr
    assert await fetchval(dsn, "SELECT count(*) FROM pg_publication_tables") == 2

    result = await asyncio.to_thread(run_as, dsn, loader, feed_dir)  # no --no-init-schema
    assert result.returncode == 0, result.stderr
    assert await statuses(dsn) == {"COMPLETED": 3}
    assert "Traceback" not in result.stderr

    line = one_error_line(run_cli("init-db", "--dsn", dsn, "--grant", "nobody_at_all"))
    assert "--grant: role nobody_at_all does not exist" in line


async def test_a_privilege_revoked_mid_run_fails_batches_not_the_daemon(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    assert run_cli("init-db", "--dsn", dsn, "--grant", loader).returncode == 0
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}", level="WARNING")
    settings = settings_for(as_role(dsn, loader), feed_dir, rate=20.0, batch_size=10)

    async def more_completed(daemon: Daemon) -> None:
        done = await count_batches(dsn)
        await wait_until("batches complete again", lambda: count_batches(dsn), at_least(done + 3))
        await wait_until("ready again", daemon.ready)

    try:
        async with running(settings) as daemon:
            await wait_until("the daemon is ready", daemon.ready)
            # The COPY refused: each batch is FAILED with the server's error.
            await execute(dsn, f"REVOKE INSERT ON orders FROM {loader}")
            await wait_until(
                "refused batches FAILED", lambda: count_batches(dsn, FAILED), at_least(3)
            )
            await wait_until("not ready while refused", daemon.ready, lambda ready: not ready)
            error = await fetchval(dsn, f"SELECT error FROM batch_control WHERE {FAILED} LIMIT 1")
            assert "permission denied for table orders" in error
            await execute(dsn, f"GRANT INSERT ON orders TO {loader}")
            await more_completed(daemon)

            # Even the FAILED mark refused: the batches wait for the grant, the daemon goes on.
            await execute(dsn, f"REVOKE UPDATE ON batch_control FROM {loader}")
            await wait_until("not ready", daemon.ready, lambda ready: not ready)
            await asyncio.sleep(2.0)
            assert not daemon.task.done()
            assert await count_batches(dsn, "status = 'IN_PROGRESS'") >= 1  # awaiting the mark
            await execute(dsn, f"GRANT UPDATE ON batch_control TO {loader}")
            await more_completed(daemon)
    finally:
        logger.remove(sink)
    assert await count_batches(dsn, "status = 'IN_PROGRESS'") == 0
    marks = [line for line in lines if "marking it FAILED was refused" in line]
    assert 1 <= len(marks) <= 2, marks  # throttled: one per kind per 10 s
    failed_lines = [line for line in lines if "FAILED rows=0" in line]
    assert len(failed_lines) < await count_batches(dsn, FAILED), failed_lines
