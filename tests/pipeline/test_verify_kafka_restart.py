"""`verify --kafka` restarted over a backlog, against real PostgreSQL and a tansu broker: a
judging step taken before the re-read from the committed offset reaches a batch left
unjudged at the stop must not judge that batch missing (for good: its rows, re-read later,
would fall below what the stored state accounts for)."""

from __future__ import annotations

import asyncpg
import pytest

from cdcfeed.config import load_settings
from cdcfeed.database import names_of
from cdcfeed.proof.kafka.runner import open_kafka_verifier
from tests.pipeline.broker import Broker, produce
from tests.pipeline.test_rig import prepare
from tests.pipeline.test_verify_kafka_core import change, report_of, verify_kafka

pytestmark = pytest.mark.pipeline

LEDGER = (
    "INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id,"
    " start_lsn, end_lsn, xid, completed_at)"
    " VALUES ($1, 't', $2, $3, $4, $5::text::pg_lsn, $6::text::pg_lsn, $7::text::xid8,"
    " CASE WHEN $2 = 'COMPLETED' THEN now() END)"
)


async def test_a_step_before_the_re_read_reaches_an_unjudged_batch_judges_it_not(
    broker: Broker, dsn: str
) -> None:
    await prepare(broker, dsn, "fm")
    conn = await asyncpg.connect(dsn)
    try:
        # Batches 1 and 3 are still IN_PROGRESS when the first run judges: it commits at
        # batch 1's first record, having read past batch 3.
        await conn.executemany(
            LEDGER,
            [(1, "IN_PROGRESS", 2, 1, "0/1000", None, "701"),
             (2, "COMPLETED", 2, 3, "0/3000", "0/4000", "702"),
             (3, "IN_PROGRESS", 2, 5, "0/5000", None, "703"),
             (4, "COMPLETED", 2, 7, "0/7000", "0/8000", "704")],
        )  # fmt: skip
        await produce(
            broker.bootstrap,
            "fm.public.orders",
            [change(1, 1, 701, 0x1800), change(2, 1, 701, 0x1800),
             change(3, 2, 702, 0x3800), change(4, 2, 702, 0x3800),
             change(5, 3, 703, 0x5800), change(6, 3, 703, 0x5800),
             change(7, 4, 704, 0x7800), change(8, 4, 704, 0x7800)],
        )  # fmt: skip
        code, output = await verify_kafka(dsn, broker, "fm", "--format", "json")
        assert (code, report_of(output)["violations"]) == (0, []), output
        for batch_id, end_lsn in ((1, "0/2000"), (3, "0/6000")):  # the daemon settles them
            await conn.execute(
                "UPDATE batch_control SET status = 'COMPLETED', end_lsn = $2::text::pg_lsn,"
                " completed_at = now() WHERE batch_id = $1",
                batch_id,
                end_lsn,
            )
    finally:
        await conn.close()

    settings = load_settings(
        None,
        {"database": {"dsn": dsn}, "kafka": {"bootstrap": broker.bootstrap, "topic_prefix": "fm"}},
        {},
    )
    verifier = await open_kafka_verifier(settings.database, names_of(settings), settings.kafka)
    try:
        early = await verifier.step()  # before any fetch: as with a backlog larger than a read
        assert [v for v in early.verdicts if v.reason is not None] == []
        await verifier.read_to_end(idle=2.0)
        await verifier.step()
    finally:
        await verifier.close()
    code, output = await verify_kafka(dsn, broker, "fm", "--format", "json")
    report = report_of(output)
    assert (code, report["violations"]) == (0, []), output
    assert report["batches_verified"] == 3  # 1, 2 and 3; 4 waits for its END (or a later change)
