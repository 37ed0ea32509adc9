"""The change mix's schema: a database made by an older version is upgraded by `init-db` and
`run` (never silently used without the columns), the grants a mix needs, and the replica
identity `init-db` sets."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support import (
    as_role,
    daemon_args,
    execute,
    fetchval,
    one_error_line,
    run_cli,
)

# The schema as cdcfeed made it before the change mix (no status, updated_at, note, no
# updated/deleted columns, no change cursor), with a batch of three orders.
OLD_SCHEMA = [
    "CREATE SEQUENCE batch_control_batch_id_seq",
    """CREATE TABLE orders (order_id bigint PRIMARY KEY, batch_id bigint NOT NULL,
        customer_id integer NOT NULL, amount numeric(10,2) NOT NULL,
        created_at timestamptz NOT NULL)""",
    """CREATE TABLE batch_control (batch_id bigint PRIMARY KEY, instance text NOT NULL,
        status text NOT NULL CHECK (status IN ('IN_PROGRESS', 'COMPLETED', 'FAILED')),
        row_count integer NOT NULL, first_order_id bigint NOT NULL, start_lsn pg_lsn,
        end_lsn pg_lsn, xid xid8, feed_file text, started_at timestamptz NOT NULL DEFAULT now(),
        completed_at timestamptz, error text, recovered boolean NOT NULL DEFAULT false,
        generate_seconds double precision, write_seconds double precision,
        copy_seconds double precision)""",
    """CREATE INDEX batch_control_in_progress_idx ON batch_control (instance)
        WHERE status = 'IN_PROGRESS'""",
    "CREATE INDEX batch_control_end_lsn_idx ON batch_control (end_lsn)",
    "CREATE INDEX batch_control_start_lsn_idx ON batch_control (start_lsn)",
    """CREATE TABLE cdcfeed_order_ids (orders_table text PRIMARY KEY,
        next_order_id bigint NOT NULL)""",
    """CREATE TABLE cdcfeed_instances (instance text PRIMARY KEY,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        lease_until timestamptz NOT NULL DEFAULT now())""",
    "INSERT INTO cdcfeed_order_ids VALUES ('orders', 104)",
    """INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id)
        VALUES (1, 'old', 'COMPLETED', 3, 101)""",
    "INSERT INTO orders SELECT id, 1, 7, 10.00, now() FROM generate_series(101, 103) id",
]

COLUMNS = """
    SELECT string_agg(attname || ':' || attstorage::text, ',' ORDER BY attnum) FROM pg_attribute
    WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped
"""


async def test_init_db_upgrades_an_older_schema_and_keeps_its_data(dsn: str) -> None:
    await execute(dsn, *OLD_SCHEMA)
    line = one_error_line(run_cli("status", "--dsn", dsn))
    assert "lacks batch_control.deleted" in line and "orders.status" in line, line
    assert "upgrade it by running `cdcfeed init-db` once as the schema's owner" in line, line

    result = run_cli("init-db", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert await fetchval(dsn, COLUMNS, "orders") == (
        "order_id:p,batch_id:p,customer_id:p,amount:m,created_at:p,status:x,updated_at:p,note:e"
    )
    ledger = await fetchval(dsn, COLUMNS, "batch_control")
    assert ledger.endswith(",updated:p,deleted:p,updated_ids:x,deleted_ids:x"), ledger
    # The cursor starts at the lowest order: the older orders are there to be changed.
    assert await fetchval(dsn, "SELECT next_change_id FROM cdcfeed_order_ids") == 101
    assert await fetchval(dsn, "SELECT count(*) FROM orders WHERE status = 'created'") == 3
    assert await fetchval(dsn, "SELECT updated + deleted FROM batch_control") == 0
    # Current now: status reads it as it is.
    assert run_cli("status", "--dsn", dsn).returncode == 0


async def test_a_role_that_may_not_create_is_told_to_upgrade(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    await execute(dsn, *OLD_SCHEMA)
    args = daemon_args(as_role(dsn, loader), feed_dir, max_batches=1)
    line = one_error_line(await asyncio.to_thread(run_cli, *args, timeout=90))
    assert f"role {loader} may not create" in line and "lacks batch_control.deleted" in line
    assert "(made by an older cdcfeed)" in line, line
    assert line.endswith("upgrade it by running `cdcfeed init-db` once as the schema's owner")
    assert await fetchval(dsn, "SELECT count(*) FROM batch_control") == 1


async def test_a_mix_needs_update_delete_and_temporary_which_grant_gives(
    dsn: str, loader: str, feed_dir: Path
) -> None:
    await execute(dsn, f"REVOKE TEMPORARY ON DATABASE {dsn.rsplit('/', 1)[1]} FROM PUBLIC")
    assert run_cli("init-db", "--dsn", dsn).returncode == 0
    await execute(
        dsn,
        f"GRANT USAGE ON SCHEMA public TO {loader}",
        f"GRANT SELECT, INSERT, UPDATE ON batch_control, cdcfeed_instances TO {loader}",
        f"GRANT SELECT, UPDATE ON cdcfeed_order_ids TO {loader}",
        f"GRANT SELECT, INSERT ON orders TO {loader}",
        f"GRANT USAGE ON SEQUENCE batch_control_batch_id_seq TO {loader}",
    )
    mixed = daemon_args(
        as_role(dsn, loader), feed_dir, max_batches=6, rate=20, mix="insert=60,delete=40"
    )
    line = one_error_line(await asyncio.to_thread(run_cli, *mixed, timeout=90))
    assert "UPDATE, DELETE on table public.orders" in line, line
    assert "TEMPORARY on database" in line, line
    # Insert-only needs none of it.
    plain = daemon_args(as_role(dsn, loader), feed_dir, max_batches=2, rate=20)
    assert (await asyncio.to_thread(run_cli, *plain, timeout=90)).returncode == 0

    assert run_cli("init-db", "--dsn", dsn, "--grant", loader).returncode == 0
    result = await asyncio.to_thread(run_cli, *mixed, timeout=90)
    assert result.returncode == 0, result.stderr
    assert await fetchval(dsn, "SELECT count(*) FROM batch_control WHERE status = 'COMPLETED'") == 8
    assert await fetchval(dsn, "SELECT sum(deleted) FROM batch_control") > 0


async def test_a_grant_of_temporary_the_schema_owner_may_not_give_is_said(
    dsn: str, loader: str
) -> None:
    """A schema owner that does not own the database grants TEMPORARY in vain: the server only
    warns. `--grant` says so in one line, with the GRANT the database's owner must run."""
    database = dsn.rsplit("/", 1)[1]
    owner = f"{loader}_owner"
    await execute(
        dsn,
        f"CREATE ROLE {owner} LOGIN",
        f"GRANT CREATE ON DATABASE {database} TO {owner}",
        f"GRANT CREATE ON SCHEMA public TO {owner}",
        f"REVOKE TEMPORARY ON DATABASE {database} FROM PUBLIC",
    )
    try:
        result = run_cli("init-db", "--dsn", as_role(dsn, owner), "--grant", loader)
        assert result.returncode == 0, result.stderr
        assert f"granted {loader}" in result.stderr
        warnings = [line for line in result.stderr.splitlines() if "still lacks" in line]
        assert len(warnings) == 1, result.stderr
        line = warnings[0]
        assert f"role {loader} still lacks TEMPORARY on database {database}" in line, line
        assert f"role {owner} may not grant it" in line, line
        assert f'GRANT TEMPORARY ON DATABASE "{database}" TO "{loader}"' in line, line
        held = f"SELECT has_database_privilege('{loader}', current_database(), 'TEMPORARY')"
        assert await fetchval(dsn, held) is False
        # Once granted as it says, nothing is left to say.
        await execute(dsn, f"GRANT TEMPORARY ON DATABASE {database} TO {loader}")
        again = run_cli("init-db", "--dsn", as_role(dsn, owner), "--grant", loader)
        assert again.returncode == 0, again.stderr
        assert "still lacks" not in again.stderr
    finally:
        await execute(dsn, f"DROP OWNED BY {owner}", f"DROP ROLE {owner}")


async def test_init_db_sets_the_replica_identity(dsn: str) -> None:
    identity = "SELECT relreplident::text FROM pg_class WHERE oid = 'orders'::regclass"
    assert run_cli("init-db", "--dsn", dsn, "--replica-identity", "full").returncode == 0
    assert await fetchval(dsn, identity) == "f"
    assert run_cli("init-db", "--dsn", dsn).returncode == 0  # absent: left as it is
    assert await fetchval(dsn, identity) == "f"
    assert run_cli("init-db", "--dsn", dsn, "--replica-identity", "default").returncode == 0
    assert await fetchval(dsn, identity) == "d"
