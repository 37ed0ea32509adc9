"""PostgreSQL servers and a fresh database per test."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg

from tests.support.product import PostgresCluster, wheel_bin_dir

DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")
_database_numbers = itertools.count(1)


def pg15_bin_dir() -> Path | None:
    """Debian's PostgreSQL 15, when installed."""
    return DEBIAN_PG15 if (DEBIAN_PG15 / "postgres").exists() else None


def any_bin_dir() -> Path:
    """PostgreSQL 15 if installed, else the embedded wheel's server."""
    return pg15_bin_dir() or wheel_bin_dir()


@asynccontextmanager
async def fresh_database(cluster: PostgresCluster) -> AsyncIterator[str]:
    """A new, empty database on `cluster` for one test, dropped after it with its slots.

    The server is started again first if a fault test left it stopped."""
    if cluster.running_port() is None:
        await asyncio.to_thread(cluster.start)
    name = f"t{os.getpid()}_{next(_database_numbers)}"
    admin = await asyncpg.connect(cluster.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield cluster.dsn(name)
    if cluster.running_port() is None:
        await asyncio.to_thread(cluster.start)
    admin = await asyncpg.connect(cluster.dsn())
    try:
        for slot in await admin.fetch(
            "SELECT slot_name FROM pg_replication_slots WHERE database = $1", name
        ):
            await admin.execute("SELECT pg_drop_replication_slot($1)", slot[0])
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()
