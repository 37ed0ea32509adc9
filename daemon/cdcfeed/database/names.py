"""The names cdcfeed's statements use, and the one place identifiers are quoted.

Schema and table names come from configuration, so every identifier that reaches SQL text
goes through `quote_ident` here; values are always parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cdcfeed.config import Settings

ORDER_COLUMNS = ("order_id", "batch_id", "customer_id", "amount", "created_at")
# An insert-only batch with notes (toast_bytes) COPies these; a batch that updates or deletes
# COPies STAGED_COLUMNS into the session's staging table.
NOTED_ORDER_COLUMNS = (*ORDER_COLUMNS, "note")
STAGED_COLUMNS = (*NOTED_ORDER_COLUMNS, "op", "status", "updated_at")
STAGING_TABLE = "cdcfeed_staging"

# Serialises concurrent `init-db` runs: CREATE ... IF NOT EXISTS alone races on the catalog.
SCHEMA_LOCK_KEY = 0x63646366  # "cdcf"

ORDER_IDS_TABLE = "cdcfeed_order_ids"
INSTANCES_TABLE = "cdcfeed_instances"
PROGRESS_TABLE = "cdcfeed_verify_progress"
PENDING_TABLE = "cdcfeed_verify_pending"
PENDING_CHANGES_TABLE = "cdcfeed_verify_pending_changes"
RESULTS_TABLE = "cdcfeed_verify_results"


# PostgreSQL keeps the first 63 bytes of an identifier (NAMEDATALEN - 1) and drops the rest.
MAX_IDENTIFIER_BYTES = 63


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A string as an SQL literal, whatever `standard_conforming_strings` says: the E'' form,
    backslashes and quotes doubled. Only for the one statement sent as a simple query, which
    takes no parameters (see `Statements.open_and_claim`)."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def derived_name(base: str, suffix: str) -> str:
    """`base` + `suffix`, as the server will keep it: within 63 bytes, deterministically.

    A name that fits is exactly that, so databases made before long names were handled keep
    their objects. One that does not keeps as much of `base` as fits (whole characters), then
    `_` and 8 hex digits of a hash of the whole `base`, then `suffix`: two long table names
    never share a derived name, and the server never cuts one back onto the table's own.
    """
    name = base + suffix
    if len(name.encode()) <= MAX_IDENTIFIER_BYTES:
        return name
    tag = "_" + hashlib.sha256(base.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER_BYTES - len(tag.encode()) - len(suffix.encode())
    head = base.encode()[:room].decode(errors="ignore")  # never half a character
    return head + tag + suffix


@dataclass(frozen=True)
class Names:
    schema: str
    orders: str
    batches: str

    def table(self, name: str) -> str:
        """A table (or sequence) of cdcfeed's schema, schema-qualified and quoted."""
        return f"{quote_ident(self.schema)}.{quote_ident(name)}"

    @property
    def batch_sequence(self) -> str:
        return derived_name(self.batches, "_batch_id_seq")

    def batches_index(self, purpose: str) -> str:
        """The quoted name of one of the ledger's indexes (`in_progress`, `end_lsn`, ...)."""
        return quote_ident(self.batches_index_name(purpose))

    def batches_index_name(self, purpose: str) -> str:
        return derived_name(self.batches, f"_{purpose}_idx")

    @property
    def regclass_batch_sequence(self) -> str:
        return self.table(self.batch_sequence)

    @property
    def orders_relation(self) -> tuple[str, str]:
        """Orders as (schema, table), as the replication stream names it."""
        return (self.schema, self.orders)


def names_of(settings: Settings) -> Names:
    return Names(
        schema=settings.database.schema_name,
        orders=settings.database.orders_table,
        batches=settings.database.batch_table,
    )
