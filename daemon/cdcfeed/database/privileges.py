"""What a role needs of the schema, checked before it is needed and granted by `init-db --grant`.

One list per purpose (`load`: the daemon's batches, leases and reconciliation, and with a
change mix the updates and deletes; `status`: reading the ledger), from which both the check
and the GRANT statements are made, so the two cannot drift apart. The check reads the catalog
only, which needs no privileges, and runs before the first batch: a role that lacks
something is told which privilege on which object, and the GRANT that fixes it, before
anything of a batch is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cdcfeed.database.catalog import (
    CURRENT_DATABASE,
    CURRENT_ROLE,
    EXISTING_RELATIONS,
    LACKING_PRIVILEGES,
    MISSING_COLUMNS,
)
from cdcfeed.database.ledger import Connection
from cdcfeed.database.names import INSTANCES_TABLE, ORDER_IDS_TABLE, Names, quote_ident
from cdcfeed.errors import PrivilegeRefused

Purpose = Literal["load", "status", "schema"]


@dataclass(frozen=True)
class Need:
    kind: Literal["SCHEMA", "TABLE", "SEQUENCE", "DATABASE"]
    # A relation's quoted, qualified name; a schema's or database's own name (as has_* takes it)
    name: str
    shown: str  # as a user reads it: schema.name
    privileges: tuple[str, ...]

    @property
    def granted_on(self) -> str:
        """The object as GRANT names it."""
        plain = self.kind in ("SCHEMA", "DATABASE")
        return f"{self.kind} {quote_ident(self.name) if plain else self.name}"


def _relation(names: Names, kind: Literal["TABLE", "SEQUENCE"], name: str, *privs: str) -> Need:
    return Need(kind, names.table(name), f"{names.schema}.{name}", privs)


def needs_of(names: Names, purpose: Purpose, database: str | None = None) -> tuple[Need, ...]:
    """What a role doing `purpose` needs; `schema` (init-db itself) needs nothing more.

    `database`: the database's name when batches update and delete (a change mix), which
    needs more of `orders` and a temporary staging table.
    """
    schema = Need("SCHEMA", names.schema, names.schema, ("USAGE",))
    if purpose == "status":
        return (schema, _relation(names, "TABLE", names.batches, "SELECT"))
    if purpose == "schema":
        return ()
    return (
        schema,
        # Batch rows: opened, claimed, completed or failed; settled rows are read FOR UPDATE.
        _relation(names, "TABLE", names.batches, "SELECT", "INSERT", "UPDATE"),
        # Leases: registered and renewed (an upsert), released (an UPDATE); never deleted.
        _relation(names, "TABLE", INSTANCES_TABLE, "SELECT", "INSERT", "UPDATE"),
        # Order-id blocks are taken by an UPDATE ... RETURNING.
        _relation(names, "TABLE", ORDER_IDS_TABLE, "SELECT", "UPDATE"),
        # The COPY; settling reads an order-id block back; a change mix updates and deletes.
        _relation(
            names,
            "TABLE",
            names.orders,
            *(("SELECT", "INSERT", "UPDATE", "DELETE") if database else ("SELECT", "INSERT")),
        ),
        # Batch ids: nextval.
        _relation(names, "SEQUENCE", names.batch_sequence, "USAGE"),
        # The staging table a batch with updates or deletes COPies its changes into.
        *((Need("DATABASE", database, database, ("TEMPORARY",)),) if database else ()),
    )


async def needs_for(
    conn: Connection, names: Names, purpose: Purpose, changes: bool = False
) -> tuple[Need, ...]:
    """`needs_of`, with the database's name read when `changes` asks for it."""
    database = await current_database(conn) if changes and purpose == "load" else None
    return needs_of(names, purpose, database)


def grant_statements(needs: tuple[Need, ...], role: str) -> list[str]:
    return [
        f"GRANT {', '.join(need.privileges)} ON {need.granted_on} TO {quote_ident(role)}"
        for need in needs
    ]


def schema_relations(names: Names) -> list[str]:
    """Every relation `init_schema` makes (tables, the sequence, the ledger's indexes)."""
    return [
        names.orders,
        names.batches,
        ORDER_IDS_TABLE,
        INSTANCES_TABLE,
        names.batch_sequence,
        *(names.batches_index_name(purpose) for purpose in ("in_progress", "end_lsn", "start_lsn")),
    ]


def added_columns(names: Names) -> list[tuple[str, str]]:
    """(table, column) of the columns later versions added to tables older ones made."""
    added = {
        names.orders: ("status", "updated_at", "note"),
        names.batches: ("updated", "deleted", "updated_ids", "deleted_ids"),
        ORDER_IDS_TABLE: ("next_change_id",),
    }
    return [(table, column) for table, columns in added.items() for column in columns]


async def missing_relations(conn: Connection, names: Names) -> list[str]:
    """The schema's relations that do not exist (yet), then the columns an existing table
    lacks (`table.column`): empty when the schema is current."""
    expected = schema_relations(names)
    existing = {row[0] for row in await conn.fetch(EXISTING_RELATIONS, names.schema, expected)}
    missing = [name for name in expected if name not in existing]
    columns = added_columns(names)
    rows = await conn.fetch(
        MISSING_COLUMNS,
        names.schema,
        [table for table, _ in columns],
        [column for _, column in columns],
    )
    return missing + sorted(row[0] for row in rows)


async def current_role(conn: Connection) -> str:
    return str(await conn.fetchval(CURRENT_ROLE))


async def current_database(conn: Connection) -> str:
    return str(await conn.fetchval(CURRENT_DATABASE))


async def lacking(
    conn: Connection, needs: tuple[Need, ...], role: str | None = None
) -> list[tuple[Need, str]]:
    """Each (object, privilege) of `needs` `role` (default: the connection's) does not hold.

    Schemas first: without USAGE on its schema, the server will not even look a relation up
    for the role, so that is all there is to say until it is granted.
    """
    schemas = tuple(need for need in needs if need.kind == "SCHEMA")
    if schemas and len(schemas) < len(needs):
        missing = await lacking(conn, schemas, role)
        if missing:
            return missing
        needs = tuple(need for need in needs if need.kind != "SCHEMA")
    pairs = [(need, privilege) for need in needs for privilege in need.privileges]
    if not pairs:
        return []
    rows = await conn.fetch(
        LACKING_PRIVILEGES,
        [need.kind for need, _ in pairs],
        [need.name for need, _ in pairs],
        [privilege for _, privilege in pairs],
        role,
    )
    return [pairs[row[0] - 1] for row in rows]


def refusal(role: str, missing: list[tuple[Need, str]], server: str = "") -> PrivilegeRefused:
    """One line: what the role lacks, on what, and the GRANTs (run by the schema's owner)."""
    what, grants = _lacking(role, missing)
    said = f" ({server})" if server else ""
    return PrivilegeRefused(
        f"role {role} lacks {what}{said}; as the schema's owner, run "
        f"`cdcfeed init-db --grant {role}` or: {'; '.join(grants)}",
        grants=grants,
    )


def ungranted(role: str, grantor: str, missing: list[tuple[Need, str]]) -> str:
    """One line: what `init-db --grant` could not give `role`, and the GRANTs to run instead.

    A GRANT by a role that neither owns the object nor holds the privilege WITH GRANT OPTION
    grants nothing and only warns (TEMPORARY on a database the schema's owner does not own,
    say): without this line, `--grant` would seem to have done it.
    """
    what, grants = _lacking(role, missing)
    databases_only = all(need.kind == "DATABASE" for need, _ in missing)
    mix = " (a change mix needs it)" if databases_only else ""
    return (
        f"role {role} still lacks {what}{mix}: role {grantor} may not grant it; "
        f"as its owner (or a superuser), run: {'; '.join(grants)}"
    )


def _lacking(role: str, missing: list[tuple[Need, str]]) -> tuple[str, tuple[str, ...]]:
    """What `role` lacks, object by object, as a user reads it, and the GRANTs that give it."""
    by_object: dict[Need, list[str]] = {}
    for need, privilege in missing:
        by_object.setdefault(need, []).append(privilege)
    what = "; ".join(
        f"{', '.join(privileges)} on {need.kind.lower()} {need.shown}"
        for need, privileges in by_object.items()
    )
    grants = tuple(
        f"GRANT {', '.join(privileges)} ON {need.granted_on} TO {quote_ident(role)}"
        for need, privileges in by_object.items()
    )
    return what, grants


async def check_privileges(
    conn: Connection, names: Names, purpose: Purpose, server: str = "", changes: bool = False
) -> PrivilegeRefused | None:
    """The refusal naming what the role lacks for `purpose` (with `changes`: a change mix);
    None when it lacks nothing."""
    missing = await lacking(conn, await needs_for(conn, names, purpose, changes))
    if not missing:
        return None
    return refusal(await current_role(conn), missing, server)
