"""The database boundary: the only package that imports asyncpg or holds SQL text.

`Database` owns the pool, the statement catalog (`catalog.py`, `cdc_catalog.py`) and the
translation of driver errors (`errors.py`); `VerifySession` is the verifier's connection of
its own. Callers never see a connection, a statement or a driver exception.
"""

from cdcfeed.database.connect import connect_kwargs
from cdcfeed.database.database import BatchSession, Database
from cdcfeed.database.errors import describe_error, is_unavailable
from cdcfeed.database.kafka_store import KafkaSession
from cdcfeed.database.ledger import Allocation, Changes, Settled, Settlement
from cdcfeed.database.names import Names, names_of, quote_ident
from cdcfeed.database.schema import ensure_database
from cdcfeed.database.server import CHECKED_SETTINGS, ServerSettings
from cdcfeed.database.slots import SlotSnapshot, SlotState
from cdcfeed.database.verify_store import VerifySession

__all__ = [
    "CHECKED_SETTINGS",
    "Allocation",
    "BatchSession",
    "Changes",
    "Database",
    "KafkaSession",
    "Names",
    "ServerSettings",
    "Settled",
    "Settlement",
    "SlotSnapshot",
    "SlotState",
    "VerifySession",
    "connect_kwargs",
    "describe_error",
    "ensure_database",
    "is_unavailable",
    "names_of",
    "quote_ident",
]
