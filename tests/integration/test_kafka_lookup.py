"""`verify --kafka` looking up, on a real server, the batches an earlier run judged whose
transactions' changes arrive again: found by the LSN of a change as well as the 32-bit xid
(the ledger's xid8 repeats it every epoch), through the ledger's start_lsn index."""

from __future__ import annotations

import asyncpg

from cdcfeed.database import KafkaSession
from cdcfeed.database.kafka_catalog import KafkaStatements
from tests.support import create_schema, names_for

SOURCE = "kafka:test"
XID32 = 4242
# Two judged batches of the same 32-bit xid, an epoch apart, and one batch not judged.
BATCHES = [(1, XID32, 0x1000, 0x2000), (2, XID32 + 2**32, 0x5000, 0x6000), (3, 77, 0x7000, 0x8000)]


async def test_judged_batches_are_found_by_xid_and_the_lsn_of_a_change(dsn: str) -> None:
    await create_schema(dsn)
    names = names_for(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        db = KafkaSession(conn, names)
        assert await db.create_kafka_state(SOURCE)
        for batch_id, xid, start, end in BATCHES:
            await conn.execute(
                """INSERT INTO batch_control (batch_id, instance, status, row_count,
                                              first_order_id, start_lsn, end_lsn, xid)
                   VALUES ($1, 'test', 'COMPLETED', 1, $1, $2, $3, $4::text::xid8)""",
                batch_id,
                start,
                end,
                str(xid),
            )
            if batch_id != 3:
                await db.record_verdict(SOURCE, batch_id, "COMPLETED", "ok", 1, xid, end, None)

        async def found(xid: int, lsn: int) -> list[int]:
            return [r["batch_id"] for r in await db.judged_by_xid(SOURCE, [(xid, lsn)])]

        assert await found(XID32, 0x1800) == [1]
        assert await found(XID32, 0x5800) == [2]
        assert await found(77, 0x7800) == []  # not judged: a candidate's, not a lookup's
        assert await found(99, 0x5800) == []  # no batch ran it

        # The ledger's start_lsn index, not a join of every verdict with the ledger.
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            plan = await conn.fetchval(
                "EXPLAIN (FORMAT JSON) " + KafkaStatements(names).judged_by_xid,
                SOURCE,
                [XID32],
                [0x5800],
            )
        index = names.batches_index("start_lsn").strip('"')
        assert f'"Index Name": "{index}"' in plan, plan
    finally:
        await conn.close()
