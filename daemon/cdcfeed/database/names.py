"""The names cdcfeed's statements use, and the one place identifiers are quoted.

Schema and table names come from configuration, so every identifier that reaches SQL text
goes through `quote_ident` here; values are always parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdcfeed.config import Settings

ORDER_COLUMNS = ("order_id", "batch_id", "customer_id", "amount", "created_at")

# Serialises concurrent `init-db` runs: CREATE ... IF NOT EXISTS alone races on the catalog.
SCHEMA_LOCK_KEY = 0x63646366  # "cdcf"

ORDER_IDS_TABLE = "cdcfeed_order_ids"
INSTANCES_TABLE = "cdcfeed_instances"
PROGRESS_TABLE = "cdcfeed_verify_progress"
PENDING_TABLE = "cdcfeed_verify_pending"
RESULTS_TABLE = "cdcfeed_verify_results"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


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
        return f"{self.batches}_batch_id_seq"

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
