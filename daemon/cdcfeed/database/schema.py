"""The schema: creating or upgrading the ledger, and the publication CDC reads it through."""

from __future__ import annotations

import contextlib

import asyncpg

from cdcfeed.database.catalog import DATABASE_EXISTS, create_database, statements
from cdcfeed.database.ledger import Connection
from cdcfeed.database.names import SCHEMA_LOCK_KEY, Names
from cdcfeed.database.privileges import missing_relations


async def init_schema(conn: Connection, names: Names) -> bool:
    """Creates or upgrades the schema; idempotent and safe from several instances at once.

    A schema that is current (every relation and every column there) is only looked at, so
    a role that may not create runs this as well as the owner; one made by an older version
    gets the columns it lacks. Returns True when DDL ran.
    """
    if not await missing_relations(conn, names):
        return False
    q = statements(names)
    async with conn.transaction():
        await conn.execute(q.lock_schema, SCHEMA_LOCK_KEY)
        await conn.execute(q.schema_ddl)
        await conn.execute(q.cdc.ledger_indexes_ddl)  # for the slot metrics
        await conn.execute(q.seed_order_ids, names.orders)
        await conn.execute(q.seed_change_cursor, names.orders)
    return True


async def ensure_publication(conn: Connection, names: Names, publication: str) -> bool:
    """Creates the publication over orders and the ledger; adds a table it lacks. Idempotent.

    Returns True when something changed. A slot decodes only with publications that existed
    at its position, so this belongs before the slot is created.
    """
    q = statements(names)
    cdc = q.cdc
    async with conn.transaction():
        await conn.execute(q.lock_schema, SCHEMA_LOCK_KEY)
        record = await conn.fetchrow(cdc.publication, publication)
        if record is None:
            await conn.execute(cdc.create_publication(publication, cdc.publication_tables))
            return True
        if record[0]:  # FOR ALL TABLES covers ours already
            return False
        missing = [table for table, relation in cdc.published if relation not in record[1]]
        for table in missing:
            await conn.execute(cdc.add_to_publication(publication, table))
        return bool(missing)


async def ensure_database(dsn: str, name: str) -> None:
    """Creates database `name` on the server at `dsn` (the embedded one) unless it exists."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        if not await conn.fetchval(DATABASE_EXISTS, name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # created meanwhile
                await conn.execute(create_database(name))
    finally:
        await conn.close()
