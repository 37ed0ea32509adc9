"""Capture the Debezium event samples under tests/pipeline/samples/ from the real rig.

    PYTHONPATH=$PWD/daemon:$PWD python tests/pipeline/capture_samples.py [OUT_DIR]

For each converter form it starts PostgreSQL 15, tansu and the Debezium runner (snapshot
mode `initial`), and records: a batch loaded before the engine started (snapshot events,
op r), a batch streamed (op c, and the ledger's updates, op u), one deleted order (op d and
its tombstone) and the transaction topic. Each sample file holds one record a line:
`{"topic", "partition", "offset", "timestamp", "key", "value"}` with key and value as the
record's bytes decoded from UTF-8 (JSON text, so the bytes round-trip exactly) or null.

The `mix_*` samples hold the change mix on an orders table shaped as cdcfeed's with its mix
columns (status, updated_at, note stored EXTERNAL), under REPLICA IDENTITY DEFAULT and FULL:
four inserts in one transaction (two with a 4 KB note, TOASTed), then in a second one two
updates to 'paid' and one to 'cancelled' that leave the note alone, and one delete (and its
tombstone).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import asyncpg

from cdcfeed.embedded import PostgresCluster
from tests.pipeline.broker import Broker
from tests.pipeline.debezium_runner import DebeziumRunner

PG15 = Path("/usr/lib/postgresql/15/bin")
PREFIX = "cdcfeed"
TOPICS = (f"{PREFIX}.public.orders", f"{PREFIX}.public.batch_control", f"{PREFIX}.transaction")
FORMS = {
    "schemas_precise_tx": {"schemas": True, "decimal": "precise", "transaction_metadata": True},
    "plain_string_tx": {"schemas": False, "decimal": "string", "transaction_metadata": True},
    "plain_double": {"schemas": False, "decimal": "double", "transaction_metadata": False},
    "schemas_string": {"schemas": True, "decimal": "string", "transaction_metadata": False},
}


def load(dsn: str, feed: Path, rows: int) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "cdcfeed",
            "run",
            "--dsn",
            dsn,
            "--batch-size",
            str(rows),
            "--max-batches",
            "1",
            "--rate",
            "1",
            "--feed-dir",
            str(feed),
            "--metrics-address",
            "127.0.0.1:0",
            # One seed: every form carries the same amounts, so tests compare them.
            "--seed",
            "11",
        ],
        check=True,
        capture_output=True,
    )


async def sql(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def capture(cluster: PostgresCluster, root: Path, name: str, form: dict[str, object]) -> list[str]:
    asyncio.run(sql(cluster.dsn(), f'CREATE DATABASE "{name}"'))
    dsn = cluster.dsn(name)
    load(dsn, root / "feed", 3)  # before the engine: snapshot events
    lines: list[str] = []
    with Broker(root / f"{name}-tansu.log") as broker:
        asyncio.run(broker.create_topics(TOPICS))
        runner = _runner(root, name, dsn, broker, form)
        runner.extra = {"snapshot.mode": "initial"}
        with runner:
            load(dsn, root / "feed", 3)
            asyncio.run(
                sql(dsn, "DELETE FROM orders WHERE order_id = (SELECT max(order_id) FROM orders)")
            )
            # 3 snapshot + 3 streamed + delete + tombstone
            asyncio.run(broker.read_topic(TOPICS[0], count=8, timeout=60))
        for topic in TOPICS:
            lines += _lines(asyncio.run(broker.read_topic(topic, timeout=10, idle=1.5)))
    return lines


MIX_FORMS = {
    "mix_default_schemas_precise": ({"schemas": True, "decimal": "precise"}, "DEFAULT"),
    "mix_full_plain_string": ({"schemas": False, "decimal": "string"}, "FULL"),
}
MIX_SCHEMA = (
    "CREATE TABLE orders (order_id bigint PRIMARY KEY, batch_id bigint NOT NULL,"
    " customer_id bigint NOT NULL, amount numeric(10,2) NOT NULL,"
    " created_at timestamptz NOT NULL DEFAULT now(), status text NOT NULL DEFAULT 'created',"
    " updated_at timestamptz, note text)",
    "ALTER TABLE orders ALTER COLUMN note SET STORAGE EXTERNAL",
    "CREATE TABLE batch_control (batch_id bigint PRIMARY KEY, status text)",
)
NOTE = "x" * 4096  # above the ~2 KB a row may hold inline: stored out of line
MIX_CHANGES = (
    "INSERT INTO orders (order_id, batch_id, customer_id, amount, note) VALUES"
    f" (1, 1, 7, 12.34, '{NOTE}'), (2, 1, 8, 5.00, NULL), (3, 1, 9, 1.50, '{NOTE}'),"
    " (10, 1, 9, 2.50, NULL)",
    "BEGIN; UPDATE orders SET status = 'paid', updated_at = now() WHERE order_id IN (1, 2);"
    " UPDATE orders SET status = 'cancelled', updated_at = now() WHERE order_id = 10;"
    " DELETE FROM orders WHERE order_id = 3; COMMIT",
)


def capture_mix(
    cluster: PostgresCluster, root: Path, name: str, form: dict[str, object], identity: str
) -> list[str]:
    asyncio.run(sql(cluster.dsn(), f'CREATE DATABASE "{name}"'))
    dsn = cluster.dsn(name)
    for statement in (*MIX_SCHEMA, f"ALTER TABLE orders REPLICA IDENTITY {identity}"):
        asyncio.run(sql(dsn, statement))
    topics = (TOPICS[0], TOPICS[2])
    lines: list[str] = []
    with Broker(root / f"{name}-tansu.log") as broker:
        asyncio.run(broker.create_topics(topics))
        runner = _runner(root, name, dsn, broker, form)
        with runner:
            for statement in MIX_CHANGES:
                asyncio.run(sql(dsn, statement))
            # 4 inserts + 3 updates + delete + tombstone
            asyncio.run(broker.read_topic(TOPICS[0], count=9, timeout=60))
        for topic in topics:
            lines += _lines(asyncio.run(broker.read_topic(topic, timeout=10, idle=1.5)))
    return lines


def _runner(
    root: Path, name: str, dsn: str, broker: Broker, form: dict[str, object]
) -> DebeziumRunner:
    """An engine of its own (slot and publication named after the capture) for one form."""
    return DebeziumRunner(
        root / name,
        dsn,
        broker.bootstrap,
        slot=name,
        publication=name,
        **form,  # type: ignore[arg-type]
    )


def _lines(records: list[Any]) -> list[str]:
    return [
        json.dumps(
            {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp,
                "key": None if record.key is None else record.key.decode(),
                "value": None if record.value is None else record.value.decode(),
            }
        )
        for record in records
    ]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cdcfeed-samples-"))
    root.chmod(0o755)
    cluster = PostgresCluster(PG15, root / "pg")
    cluster.start()
    try:
        for name, form in FORMS.items():
            lines = capture(cluster, root, name, form)
            (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
            print(f"{name}: {len(lines)} records")
        for name, (form, identity) in MIX_FORMS.items():
            lines = capture_mix(cluster, root, name, form, identity)
            (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
            print(f"{name}: {len(lines)} records")
    finally:
        cluster.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
