"""`cdcfeed verify --kafka` against real parts: PostgreSQL, Debezium 3.6.3 and a tansu broker.

A clean load verifies whole; Debezium committing offsets per record, closed cleanly after 49
rows of a 500-row COPY batch and restarted, loses the rows sharing the LSN of its last
committed one, and verify names the batch and the ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.pipeline.broker import Broker, produce
from tests.pipeline.debezium_runner import DebeziumRunner
from tests.pipeline.test_rig import delivered_orders, load_batch, prepare, wait_for_end

pytestmark = pytest.mark.pipeline

MakeRunner = Callable[..., DebeziumRunner]


async def verify_kafka(dsn: str, broker: Broker, prefix: str, *args: str) -> tuple[int, str]:
    """`cdcfeed verify --kafka` as a user runs it; (exit code, stdout + stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cdcfeed", "verify", "--kafka", broker.bootstrap,
        "--topic-prefix", prefix, "--dsn", dsn, *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CDCFEED_LOG__LEVEL": "WARNING"},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


def report_of(output: str) -> dict[str, Any]:
    start = output.index("{")
    report: dict[str, Any] = json.JSONDecoder().raw_decode(output[start:])[0]
    return report


async def test_a_clean_load_is_verified_batch_by_batch(
    broker: Broker, dsn: str, debezium: MakeRunner, feed_dir: Path
) -> None:
    await prepare(broker, dsn, "clean")
    runner = debezium(dsn, topic_prefix="clean", schemas=False, decimal="string")
    await asyncio.to_thread(runner.start)
    batches = [await load_batch(dsn, feed_dir, rows) for rows in (300, 1, 250)]
    await wait_for_end(broker.bootstrap, "clean", batches[-1]["xid"] % 2**32)

    code, output = await verify_kafka(dsn, broker, "clean", "--format", "json")
    report = report_of(output)
    assert code == 0, output
    assert report["source"] == "kafka" and report["holds"] is True
    assert (report["batches_verified"], report["completed"], report["rows"]) == (3, 3, 551)
    assert (report["pending"], report["violations"], report["duplicates"]) == (0, [], 0)

    # Run again: nothing new to judge, nothing judged twice.
    code, output = await verify_kafka(dsn, broker, "clean", "--format", "json")
    again = report_of(output)
    assert code == 0, output
    assert again["batches_verified"] == 3 and again["this_run"]["batches_verified"] == 0
    await asyncio.to_thread(runner.stop)


async def test_the_rows_lost_by_a_restart_mid_batch_are_named(
    broker: Broker, dsn: str, debezium: MakeRunner, feed_dir: Path
) -> None:
    await prepare(broker, dsn, "loss")
    runner = debezium(dsn, topic_prefix="loss", commit="record", stop_after=49)
    await asyncio.to_thread(runner.start)
    lossy = await load_batch(dsn, feed_dir, 500)
    first_run = await asyncio.to_thread(runner.wait_exit, 60)
    assert (first_run["reason"], first_run["changes"]) == ("stop_after", 49)

    runner.stop_after = None
    await asyncio.to_thread(runner.start)
    await wait_for_end(broker.bootstrap, "loss", lossy["xid"] % 2**32)
    # A later batch: the pipeline provably moves past the lossy one.
    later = await load_batch(dsn, feed_dir, 20)
    await wait_for_end(broker.bootstrap, "loss", later["xid"] % 2**32)
    await asyncio.to_thread(runner.stop)

    code, output = await verify_kafka(dsn, broker, "loss")
    print(output)
    assert code == 1, output
    # What the topic lacks, read from it independently of the verifier: the rows after the
    # 49th up to the end of the heap multi-insert WAL record they share (how many depends on
    # the orders rows' width).
    first = lossy["first_order_id"]
    delivered = {e.order_id for e in await delivered_orders(broker, "loss")}
    lost = sorted(set(range(first, first + 500)) - delivered)
    assert lost and lost == list(range(first + 49, lost[-1] + 1))
    missing = f"missing order ids {first + 49}..{lost[-1]} ({len(lost)} of 500)"
    assert f"violation: batch {lossy['batch_id']}: " in output
    assert missing in output
    assert f"batch {later['batch_id']}" not in output

    # `cdcfeed status` shows per batch whether Kafka delivered it, once Kafka is configured.
    status = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cdcfeed", "status", "--dsn", dsn, "--format", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "CDCFEED_KAFKA__BOOTSTRAP": broker.bootstrap},
    )  # fmt: skip
    out, err = await asyncio.wait_for(status.communicate(), 60)
    assert status.returncode == 0, err.decode()
    delivered = {b["batch_id"]: b["delivered_by"] for b in json.loads(out)}
    assert delivered[lossy["batch_id"]] == {"kafka": False}
    assert delivered[later["batch_id"]] == {"kafka": True}


async def test_an_event_of_unknown_shape_is_one_line_and_exit_2(broker: Broker, dsn: str) -> None:
    await prepare(broker, dsn, "avro")
    # Confluent's Avro wire format: a magic byte and a schema id, then binary.
    await produce(broker.bootstrap, "avro.public.orders", [(b"k", b"\x00\x00\x00\x00\x01\x02\x06")])
    code, output = await verify_kafka(dsn, broker, "avro")
    assert code == 2, output
    lines = output.strip().splitlines()
    assert lines[-1].startswith("cdcfeed: avro.public.orders: "), output
    assert "Traceback" not in output


def change(order_id: int, batch_id: int, xid: int, lsn: int) -> tuple[bytes, bytes]:
    """An orders insert as Debezium's JsonConverter writes it without schemas."""
    row = {"order_id": order_id, "batch_id": batch_id, "customer_id": 3, "amount": "9.50"}
    source = {"ts_ms": 1, "snapshot": "false", "txId": xid, "lsn": lsn}
    value = {"before": None, "after": row, "source": source, "op": "c", "ts_ms": 1}
    return json.dumps({"order_id": order_id}).encode(), json.dumps(value).encode()


def end(xid: int, orders: int) -> tuple[bytes, bytes]:
    """A transaction END event with its per-table counts."""
    counts = [
        {"data_collection": "public.orders", "event_count": orders},
        {"data_collection": "public.batch_control", "event_count": 1},
    ]
    value = {"status": "END", "id": f"{xid}:1", "event_count": orders + 1,
             "data_collections": counts, "ts_ms": 1}  # fmt: skip
    return json.dumps({"id": f"{xid}:1"}).encode(), json.dumps(value).encode()


async def test_a_restarted_verify_reads_again_only_what_it_has_not_judged(
    broker: Broker, dsn: str
) -> None:
    """Two partitions; the first run leaves batch 1 pending (half delivered), the second finds
    the rest: batch 1 is judged from rows read by both runs, nothing twice."""
    await prepare(broker, dsn, "again")
    topic = "again.public.orders"
    await broker.create_topics({topic: 2})
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            "INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id,"
            " start_lsn, end_lsn, xid, completed_at)"
            " VALUES ($1, 't', 'COMPLETED', $2, $3, $4::text::pg_lsn, $5::text::pg_lsn,"
            " $6::text::xid8, now())",
            [(1, 40, 1, "0/1000", "0/2000", "701"), (2, 10, 41, "0/3000", "0/4000", "702")],
        )
    finally:
        await conn.close()
    await produce(broker.bootstrap, topic, [change(i, 1, 701, 0x1800) for i in range(1, 21)])
    code, output = await verify_kafka(dsn, broker, "again", "--format", "json")
    first = report_of(output)
    assert code == 0, output
    assert (first["batches_verified"], first["pending"]) == (0, 2)  # neither passed yet

    await produce(
        broker.bootstrap,
        topic,
        [change(i, 1, 701, 0x1800) for i in range(21, 41)]
        + [change(i, 2, 702, 0x3800) for i in range(41, 51)],
    )
    await produce(broker.bootstrap, "again.transaction", [end(701, 40), end(702, 10)])
    code, output = await verify_kafka(dsn, broker, "again", "--format", "json")
    second = report_of(output)
    assert code == 0, output
    assert (second["batches_verified"], second["rows"], second["pending"]) == (2, 50, 0)
    assert (second["duplicates"], second["violations"]) == (0, [])
