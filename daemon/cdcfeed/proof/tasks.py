"""The daemon's CDC-side background tasks: the slot monitor, and verification of the slot and
of Kafka when enabled."""

from __future__ import annotations

import asyncio

from cdcfeed.config import CdcSettings, DatabaseSettings, KafkaSettings
from cdcfeed.database import Database, Names
from cdcfeed.metrics import Metrics
from cdcfeed.proof.kafka.runner import verify_kafka_continuously
from cdcfeed.proof.slot.runner import verify_continuously
from cdcfeed.proof.slots import watch_slots


def start_cdc_tasks(
    db: Database,
    database: DatabaseSettings,
    names: Names,
    cdc: CdcSettings,
    kafka: KafkaSettings,
    metrics: Metrics,
) -> list[asyncio.Task[None]]:
    """Starts the tasks, named for supervision; the caller supervises and cancels them."""
    tasks = [
        asyncio.create_task(
            watch_slots(db, cdc.slots, cdc.poll_interval, metrics), name="slot-monitor"
        )
    ]
    if cdc.verify:
        # Not on the pool: the verifier holds its slot's verify lock on its own connection.
        tasks.append(
            asyncio.create_task(
                verify_continuously(
                    database, names, cdc.verify_slot, cdc.publication, cdc.poll_interval, metrics
                ),
                name="verify",
            )
        )
    if cdc.verify_kafka and kafka.bootstrap:
        # Its own connection too (the group's verify lock), and its own consumer; it rides
        # out broker and database outages itself, so it ends only when cancelled.
        tasks.append(
            asyncio.create_task(
                verify_kafka_continuously(database, names, kafka, metrics), name="verify-kafka"
            )
        )
    return tasks
