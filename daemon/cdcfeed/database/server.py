"""Whether the server lets a CDC consumer in: wal_level, replication slots, WAL senders.

cdcfeed loads on any server, but the ledger is only worth something when a consumer can
decode the changes: that takes `wal_level = logical`, a free replication slot for a new
consumer, and a WAL sender for a streaming one (Debezium). A server that denies any of it is
said so at start-up, by `status`, and by the `cdcfeed_server_setting_ok` gauge.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdcfeed.database.catalog import SERVER_SETTINGS
from cdcfeed.database.ledger import Connection

# The settings the gauge reports, one series each.
CHECKED_SETTINGS = ("wal_level", "max_replication_slots", "max_wal_senders")


@dataclass(frozen=True)
class ServerSettings:
    wal_level: str
    max_replication_slots: int
    max_wal_senders: int
    slots_in_use: int
    senders_in_use: int

    def problems(self) -> dict[str, str]:
        """Per setting that keeps a consumer out, why and the fix; empty when none does."""
        found: dict[str, str] = {}
        if self.wal_level != "logical":
            found["wal_level"] = (
                f"wal_level is {self.wal_level}: no consumer can decode changes (Debezium, "
                "cdcfeed verify); set wal_level = logical and restart the server"
            )
        if self.max_replication_slots == 0 or self.slots_in_use >= self.max_replication_slots:
            found["max_replication_slots"] = (
                f"{self.slots_in_use} of max_replication_slots = {self.max_replication_slots} "
                "in use: a new consumer gets no slot; raise it and restart the server"
            )
        if self.max_wal_senders == 0 or self.senders_in_use >= self.max_wal_senders:
            found["max_wal_senders"] = (
                f"{self.senders_in_use} of max_wal_senders = {self.max_wal_senders} in use: "
                "a streaming consumer cannot connect; raise it and restart the server"
            )
        return found


async def read_server_settings(conn: Connection) -> ServerSettings:
    row = await conn.fetchrow(SERVER_SETTINGS)
    assert row is not None
    return ServerSettings(str(row[0]), int(row[1]), int(row[2]), int(row[3]), int(row[4]))
