"""`cdcfeed verify --kafka` against the real Debezium connector and a real broker: the
scenarios beyond the clean load and the per-record-commit loss (test_verify_kafka_core.py).

One database and one cdcfeed load serve the module: six batches of 200 rows, the third made
FAILED for real (a row squatting in its order-id block makes its COPY violate the primary
key). Three Debezium engines, each with its own slot, stream that one load at once, each
into its own topic prefix, between them both converter forms and every decimal mode:

- `src`: schemas, precise decimals, offsets per record. The fault cases and the
  verifier-restart case are copies of its topics with one change each (faults.py), so one
  engine serves them all.
- `two`: no schemas, double decimals, the orders topic created with two partitions before
  the engine starts.
- `paused`: no schemas, string decimals, offsets committed only at transaction ends. It
  stops itself in the middle of the second batch while the load goes on (the pipeline
  paused) and is restarted once the load is done: a txend restart, which only duplicates.

All with transaction metadata. The engines' JVMs run with the client compiler only, which
halves their start on 2 cores.

Once the load is in, the scenarios run side by side as tasks of the module's fixture (each
on topics and a consumer group of its own; a verify run mostly waits for its topics to go
quiet), and each test awaits its scenario's outcome and asserts on it.

Every verdict is read from `python -m cdcfeed verify --kafka … --format json`, run as a
user runs it, and asserted batch by batch (exit codes: 0 holds, 1 violations, 2 user error).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.pipeline.broker import Broker
from tests.pipeline.debezium_runner import QUICK_START_JVM, DebeziumRunner
from tests.pipeline.faults import LEDGER, ORDERS, TRANSACTION, Json, Record, TopicSet
from tests.pipeline.test_rig import wait_for_end
from tests.support import (
    cdcfeed_command,
    clean_environment,
    create_schema,
    execute,
    run_cli,
    run_in_process,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.pipeline

ROWS = 200  # per batch
FIRST_LOAD, SECOND_LOAD = 3, 3  # batches 1, 2, 3 (FAILED), then 4, 5, 6
FAILED_BATCH = 3
# A row squatting in the third batch's order-id block (401..600) makes its COPY violate the
# primary key. Inserted before any slot exists: no engine streams it.
TRAP = (
    f"INSERT INTO orders VALUES ({(FAILED_BATCH - 1) * ROWS + 50}, -1, 1, 10.00, now())",
    "UPDATE cdcfeed_order_ids SET next_order_id = 1",
)
# The paused engine stops after this many orders events: all of batch 1, half of batch 2.
PAUSE_AFTER = ROWS + ROWS // 2
PATIENT = "3600"  # --due-after for runs that must not call a lagging batch missing


# --- the ledger -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    batch_id: int
    status: str
    row_count: int
    first_order_id: int
    xid: int | None  # xid8, epoch included
    start_lsn: int | None
    end_lsn: int | None
    updated_ids: list[int]  # what the batch updated and deleted (a change mix); empty if none
    deleted_ids: list[int]

    @property
    def tx_id(self) -> int:
        """The 32-bit xid Debezium carries as source.txId."""
        assert self.xid is not None
        return self.xid % 2**32


async def ledger(dsn: str) -> dict[int, Batch]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT batch_id, status, row_count, first_order_id, xid::text::bigint AS xid,"
            " (start_lsn - '0/0')::bigint AS start_lsn, (end_lsn - '0/0')::bigint AS end_lsn,"
            " coalesce(updated_ids, '{}') AS updated_ids,"
            " coalesce(deleted_ids, '{}') AS deleted_ids"
            " FROM batch_control ORDER BY batch_id"
        )
    finally:
        await conn.close()
    return {row["batch_id"]: Batch(**dict(row)) for row in rows}


async def seconds_since_last_completion(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT extract(epoch FROM now() - max(completed_at)) FROM batch_control"
        )
    finally:
        await conn.close()
    return float(value)


async def load(dsn: str, feed_dir: Path, batches: int) -> None:
    settings = settings_for(dsn, feed_dir, batch_size=ROWS, max_batches=batches, concurrency=1)
    assert await run_in_process(settings) == 0


# --- the verifier, as a user runs it --------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One `verify --kafka --format json`: its exit code, report and stderr."""

    args: tuple[str, ...]
    code: int
    report: Json
    stderr: str

    @property
    def violations(self) -> dict[int | None, str]:
        """batch id -> reason (a batch named twice: its reasons joined)."""
        out: dict[int | None, str] = {}
        for v in self.report["violations"]:
            out[v["batch_id"]] = "; ".join(filter(None, (out.get(v["batch_id"]), v["reason"])))
        return out

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def __str__(self) -> str:
        return (
            f"verify {' '.join(self.args)}\nexit {self.code}\n"
            f"{json.dumps(self.report, indent=1)}\nstderr: {self.stderr[-3000:]}"
        )


def _parsed(args: tuple[str, ...], code: int, stdout: str, stderr: str) -> Run:
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        report = {"unparsed stdout": stdout[-3000:]}
    return Run(args, code, report, stderr)


def verify_args(dsn: str, bootstrap: str, prefix: str, group: str, *extra: str) -> list[str]:
    return [
        "verify", "--dsn", dsn, "--kafka", bootstrap, "--topic-prefix", prefix,
        "--group", group, "--format", "json", *extra,
    ]  # fmt: skip


async def verify(dsn: str, bootstrap: str, prefix: str, group: str, *extra: str) -> Run:
    args = verify_args(dsn, bootstrap, prefix, group, *extra)
    result = await asyncio.to_thread(run_cli, *args, timeout=120)
    return _parsed(tuple(args[1:]), result.returncode, result.stdout, result.stderr)


@dataclass
class Following:
    """`verify --kafka --follow` as a child process, stopped with SIGTERM."""

    args: tuple[str, ...]
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @classmethod
    def start(cls, work: Path, args: list[str]) -> Following:
        work.mkdir(parents=True, exist_ok=True)
        stdout, stderr = work / "stdout", work / "stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(
                cdcfeed_command(*args), stdout=out, stderr=err, env=clean_environment()
            )
        return cls(tuple(args[1:]), process, stdout, stderr)

    async def stop(self) -> Run:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(self.process.wait, 60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"verify --follow ignored SIGTERM for 60s: {self}") from None
        return _parsed(self.args, code, self.stdout.read_text(), self.stderr.read_text())


async def committed_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """The consumer group's committed offset of a partition (-1 when none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offset = await consumer.committed(TopicPartition(topic, partition))
    finally:
        await consumer.stop()
    return -1 if offset is None else int(offset)


# --- the module's pipeline ------------------------------------------------------------------

ENGINES: dict[str, dict[str, Any]] = {
    "src": {"schemas": True, "decimal": "precise"},
    "two": {"schemas": False, "decimal": "double"},
    "paused": {"schemas": False, "decimal": "string", "commit": "txend"},
}
ORDERS_PARTITIONS = {"src": 1, "two": 2, "paused": 1}


@dataclass
class Pipeline:
    bootstrap: str
    dsn: str
    work: Path
    engines: dict[str, DebeziumRunner]
    batches: dict[int, Batch] = field(default_factory=dict)
    src: TopicSet = field(default_factory=lambda: TopicSet({}))  # the fault cases' source
    two: TopicSet = field(default_factory=lambda: TopicSet({}))  # two orders partitions
    early: Run | None = None  # the paused pipeline's verify run after batch 3
    scenarios: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    def verify(self, prefix: str, group: str, *extra: str) -> Awaitable[Run]:
        return verify(self.dsn, self.bootstrap, prefix, group, *extra)

    async def outcome(self, scenario: str) -> Any:
        return await self.scenarios[scenario]

    @property
    def completed(self) -> list[Batch]:
        return [b for b in self.batches.values() if b.status == "COMPLETED"]


@pytest.fixture(scope="module")
async def pipeline(
    broker: Broker, module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Pipeline]:
    work = tmp_path_factory.mktemp("kafka-scenarios")
    dsn, bootstrap = module_dsn, broker.bootstrap
    await create_schema(dsn)
    await execute(dsn, *TRAP)
    for prefix, partitions in ORDERS_PARTITIONS.items():
        await broker.create_topics(
            {
                f"{prefix}.{ORDERS}": partitions,
                f"{prefix}.{LEDGER}": 1,
                f"{prefix}.{TRANSACTION}": 1,
            }
        )
    engines = {
        prefix: DebeziumRunner(
            work / prefix,
            dsn,
            bootstrap,
            topic_prefix=prefix,
            slot=f"kafka_{prefix}",
            publication=f"kafka_{prefix}",
            jvm_options=QUICK_START_JVM,
            **options,
        )
        for prefix, options in ENGINES.items()
    }
    engines["paused"].stop_after = PAUSE_AFTER
    pipeline = Pipeline(bootstrap, dsn, work, engines)
    try:
        await asyncio.gather(*(asyncio.to_thread(e.start) for e in engines.values()))
        await _load_all(pipeline)
        pipeline.scenarios = {
            name: asyncio.create_task(scenario(pipeline), name=name)
            for name, scenario in SCENARIOS.items()
        }
        yield pipeline
    finally:
        for task in pipeline.scenarios.values():
            task.cancel()
        await asyncio.gather(*pipeline.scenarios.values(), return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in engines.values()))


async def _load_all(p: Pipeline) -> None:
    """The load, with the `paused` engine stopping half-way through batch 2; the topics of
    `src` and `two` read once they carry it all."""
    paused = p.engines["paused"]
    # Batches 1-3 while every engine runs.
    await load(p.dsn, p.work / "feed", FIRST_LOAD)
    stopped = await asyncio.to_thread(paused.wait_exit, 60)
    assert (stopped["reason"], stopped["changes"]) == ("stop_after", PAUSE_AFTER), stopped
    p.early = await patient(p)
    # Batches 4-6 with the pipeline still paused.
    await load(p.dsn, p.work / "feed", SECOND_LOAD)
    p.batches = await ledger(p.dsn)
    statuses = [b.status for b in p.batches.values()]
    assert statuses == ["COMPLETED"] * 2 + ["FAILED"] + ["COMPLETED"] * 3, p.batches
    last = p.batches[max(p.batches)]
    await asyncio.gather(
        *(wait_for_end(p.bootstrap, prefix, last.tx_id) for prefix in ("src", "two"))
    )
    counts = {ORDERS: 5 * ROWS, LEDGER: None, TRANSACTION: None}
    src, two = await asyncio.gather(
        TopicSet.read(p.bootstrap, "src", counts), TopicSet.read(p.bootstrap, "two", counts)
    )
    p.src = src.with_partitions({ORDERS: 1, LEDGER: 1, TRANSACTION: 1})
    p.two = two.with_partitions({ORDERS: 2, LEDGER: 1, TRANSACTION: 1})


def patient(p: Pipeline) -> Awaitable[Run]:
    """The paused pipeline's verify run that must never call a lagging batch missing."""
    return p.verify("paused", "patient", "--due-after", PATIENT)


def ok_totals(run: Run) -> tuple[Any, ...]:
    """(completed, failed, pending) of a report."""
    return (run["completed"], run["failed"], run["pending"])


ALL_SETTLED = (5, 1, 0)  # every batch of the ledger verified, nothing pending


# --- Debezium restarted mid-load, committing at transaction ends; the pipeline paused ----


async def pause_and_resume(p: Pipeline) -> dict[str, Run]:
    """Verify runs over the paused pipeline (batches 4-6 loaded since), then over the
    pipeline resumed from its offsets: the END of batch 1, so batch 2 again from its BEGIN."""

    async def impatient() -> Run:
        # Another group, its deadline passed: what has not arrived is missing.
        await wait_until(
            "the last batch completed over a second ago",
            lambda: seconds_since_last_completion(p.dsn),
            lambda age: age > 1.0,
        )
        return await p.verify("paused", "impatient", "--due-after", "1")

    assert p.early is not None
    runs = {"early": p.early}
    runs["late"], runs["impatient"] = await asyncio.gather(patient(p), impatient())
    paused = p.engines["paused"]
    paused.stop_after = None
    await asyncio.to_thread(paused.start)
    await wait_for_end(p.bootstrap, "paused", p.batches[max(p.batches)].tx_id)
    runs["resumed"], runs["clean"] = await asyncio.gather(
        patient(p), p.verify("paused", "clean-paused")
    )
    return runs


async def test_txend_restart_mid_load_only_duplicates(pipeline: Pipeline) -> None:
    run = (await pipeline.outcome("paused"))["resumed"]
    assert run.code == 0, run
    assert run.violations == {}, run
    assert run["holds"] is True
    assert run["batches_verified"] == len(pipeline.batches), run
    assert ok_totals(run) == ALL_SETTLED, run
    assert run["rows"] == 5 * ROWS, run  # distinct rows: the replayed ones count once
    # Batch 2 replayed from its BEGIN: its first half arrived twice, counted, not flagged.
    assert run["duplicates"] >= ROWS // 2, run
    assert run["this_run"]["duplicates"] >= ROWS // 2, run


async def test_paused_pipeline_leaves_batches_pending_not_missing(pipeline: Pipeline) -> None:
    runs = await pipeline.outcome("paused")
    early, late = runs["early"], runs["late"]
    for run in (early, late):
        assert run.code == 0, run
        assert run.violations == {}, run
        assert run["violation_count"] == 0, run
    # Batch 1 arrived whole; batch 2 only half: pending, with the FAILED batch the only
    # other thing settled.
    assert early["completed"] == 1, early
    assert early["batches_verified"] + early["pending"] == FIRST_LOAD, early
    assert early["pending"] >= 1 and early["oldest_pending_seconds"] > 0, early
    # Three more batches while paused: pending grows by three, nothing judged.
    assert late["pending"] == early["pending"] + SECOND_LOAD, late
    assert late["this_run"]["batches_verified"] == 0, late
    assert late["oldest_pending_seconds"] >= early["oldest_pending_seconds"], late


async def test_paused_pipeline_past_the_deadline_reports_missing_batches(
    pipeline: Pipeline,
) -> None:
    run = (await pipeline.outcome("paused"))["impatient"]
    assert run.code == 1, run
    undelivered = {b.batch_id for b in pipeline.completed} - {1}
    assert set(run.violations) == undelivered, run
    second = pipeline.batches[2]
    half = second.first_order_id + ROWS // 2
    assert (
        f"missing order ids {half}..{second.first_order_id + ROWS - 1} ({ROWS // 2} of {ROWS})"
        in run.violations[2]
    ), run
    for batch_id in undelivered - {2}:
        assert "missing" in run.violations[batch_id], run
    assert run["pending"] == 0, run


# --- both converter forms, every decimal mode, two partitions: clean ----------------------


async def clean_runs(p: Pipeline) -> dict[str, Run]:
    """A fresh group's run over the topics of `src` and `two` (`paused`: once resumed)."""
    prefixes = ("src", "two")
    runs = await asyncio.gather(*(p.verify(prefix, f"clean-{prefix}") for prefix in prefixes))
    return dict(zip(prefixes, runs, strict=True))


@pytest.mark.parametrize(
    "prefix",
    [
        pytest.param("src", id="schemas-precise"),
        pytest.param("two", id="plain-double-two-partitions"),
        pytest.param("paused", id="plain-string-after-a-txend-restart"),
    ],
)
async def test_every_converter_form_and_decimal_mode_verifies_clean(
    pipeline: Pipeline, prefix: str
) -> None:
    if prefix == "paused":
        run = (await pipeline.outcome("paused"))["clean"]
    else:
        run = (await pipeline.outcome("clean"))[prefix]
    assert run.code == 0, run
    assert run.violations == {}, run
    assert run["holds"] is True
    assert run["batches_verified"] == len(pipeline.batches), run
    assert ok_totals(run) == ALL_SETTLED, run
    assert run["rows"] == 5 * ROWS, run
    assert run["this_run"]["batches_verified"] == len(pipeline.batches), run
    assert run["snapshot_events"] == 0, run
    # Only the restarted engine delivered anything twice.
    assert (run["duplicates"] > 0) is (prefix == "paused"), run


# --- injected faults, one per copy of the `src` topics -------------------------------------

UNKNOWN_BATCH = 10**6
UNKNOWN_ORDER = 10**9
FOREIGN_TX = 3_000_000_000  # a 32-bit xid no batch of this test has


def _set(path: str, value: Any) -> Callable[[Json], None]:
    """A change setting one field of an event: "source.txId", "after.batch_id" …"""

    def change(event: Json) -> None:
        *parents, name = path.split(".")
        for parent in parents:
            event = event[parent]
        event[name] = value

    return change


def _all(*changes: Callable[[Json], None]) -> Callable[[Json], None]:
    def change(event: Json) -> None:
        for one in changes:
            one(event)

    return change


def _declare_orders(count: int) -> Callable[[Json], None]:
    """An END's orders event_count set to `count` (its total adjusted to match)."""

    def change(event: Json) -> None:
        for collection in event["data_collections"]:
            if collection["data_collection"] == ORDERS:
                event["event_count"] += count - collection["event_count"]
                collection["event_count"] = count

    return change


@dataclass(frozen=True)
class Fault:
    """Topics with one fault; `later`: records appended after a first run, which must hold
    (the fault arrives after the verdict on its batch)."""

    topics: TopicSet
    batch_id: int | None  # the batch the verifier must name; None: no violation
    says: str  # what its reason must say
    later: list[Record] | None = None


def faults(p: Pipeline) -> dict[str, Fault]:
    src, batches = p.src, p.batches
    out: dict[str, Fault] = {}

    second = batches[2]
    gone = second.first_order_id + 57
    (victim,) = [r for r in src.orders if r.row["order_id"] == gone]
    out["dropped event"] = Fault(src.without(victim), 2, f"missing order ids {gone} (1 of {ROWS})")

    # A whole transaction skipped: batch 4's rows, its ledger update and its BEGIN and END.
    fourth = batches[4].tx_id
    skipped = src
    for suffix in (ORDERS, LEDGER, TRANSACTION):
        for record in src.records[suffix]:
            if record.tx_id == fourth:
                skipped = skipped.without(record)
    out["dropped transaction"] = Fault(skipped, 4, "missing from the stream")

    record = src.orders_of(4)[123]
    out["altered txId"] = Fault(
        src.replacing(record, record.altered(_set("source.txId", FOREIGN_TX))), 4, str(FOREIGN_TX)
    )

    fifth = batches[5]
    assert fifth.start_lsn is not None
    record = src.orders_of(5)[10]
    moved = record.altered(_set("source.lsn", fifth.start_lsn))  # (start_lsn, end_lsn]: out
    out["moved lsn"] = Fault(src.replacing(record, moved), 5, "outside")

    record = src.orders_of(4)[50]
    stranger = record.altered(
        _all(
            _set("after.batch_id", UNKNOWN_BATCH),
            _set("after.order_id", UNKNOWN_ORDER),
            _set("source.txId", FOREIGN_TX),
        ),
        key=_set("order_id", UNKNOWN_ORDER),
    )
    out["unknown batch id"] = Fault(src.inserting(record, stranger), UNKNOWN_BATCH, "ledger")

    failed = batches[FAILED_BATCH]
    record = src.orders_of(4)[60]
    resurrected = record.altered(
        _all(
            _set("after.batch_id", FAILED_BATCH),
            _set("after.order_id", failed.first_order_id),
            _set("source.txId", failed.tx_id if failed.xid is not None else FOREIGN_TX),
        ),
        key=_set("order_id", failed.first_order_id),
    )
    out["rows of a FAILED batch"] = Fault(
        src.inserting(record, resurrected), FAILED_BATCH, "FAILED"
    )
    out["rows of a FAILED batch, after its verdict"] = Fault(
        src, FAILED_BATCH, "FAILED", later=[resurrected]
    )

    end = src.end_of(batches[4].tx_id)
    out["END with a wrong count"] = Fault(
        src.replacing(end, end.altered(_declare_orders(ROWS - 1))), 4, str(ROWS - 1)
    )

    # Redeliveries: the same event again is a duplicate; one with another txId, LSN or value
    # is a violation, whether it comes before the verdict on its batch or after.
    record = src.orders_of(2)[30]
    differing = record.altered(_set("after.customer_id", record.row["customer_id"] + 1))
    twice = f"order {record.row['order_id']} delivered twice"
    out["a differing redelivery"] = Fault(src.inserting(record, differing), 2, twice)
    # After the verdict only the batch must be named: how is the verifier's to word.
    out["a differing redelivery, after the verdict"] = Fault(src, 2, "", later=[differing])
    elsewhere = next(r.lsn for r in src.orders_of(2) if r.lsn != record.lsn)  # in its bracket
    moved_copy = record.altered(_set("source.lsn", elsewhere))
    out["a redelivery at another LSN, after the verdict"] = Fault(src, 2, "", later=[moved_copy])
    out["an identical redelivery, after the verdict"] = Fault(src, None, "", later=[record])
    return out


def _prefix(name: str) -> str:
    return "fault-" + "".join(c if c.isalnum() else "-" for c in name.lower())


async def fault_runs(p: Pipeline) -> dict[str, tuple[Fault, list[Run]]]:
    """Each fault case on topics of its own, read by a group of its own; all at once."""

    async def one(name: str, fault: Fault) -> tuple[Fault, list[Run]]:
        prefix = _prefix(name)
        await fault.topics.publish(p.bootstrap, prefix)
        runs = [await p.verify(prefix, prefix, "--due-after", PATIENT)]
        if fault.later is not None:
            later = TopicSet(dict(fault.topics.partitions), {s: [] for s in fault.topics.records})
            for record in fault.later:
                later.records[record.suffix].append(record)
            await later.publish(p.bootstrap, prefix)
            runs.append(await p.verify(prefix, prefix, "--due-after", PATIENT))
        return fault, runs

    cases = faults(p)
    runs = await asyncio.gather(*(one(name, fault) for name, fault in cases.items()))
    return dict(zip(cases, runs, strict=True))


FAULTS = [
    "dropped event",
    "dropped transaction",
    "altered txId",
    "moved lsn",
    "unknown batch id",
    "rows of a FAILED batch",
    "rows of a FAILED batch, after its verdict",
    "END with a wrong count",
    "a differing redelivery",
    "a differing redelivery, after the verdict",
    "a redelivery at another LSN, after the verdict",
]


@pytest.mark.parametrize("name", FAULTS)
async def test_an_injected_fault_is_caught_and_named_by_batch(
    pipeline: Pipeline, name: str
) -> None:
    fault, runs = (await pipeline.outcome("faults"))[name]
    if fault.later is not None:
        before = runs[0]  # the clean topics: every batch verified
        assert before.code == 0, before
        assert before.violations == {}, before
        assert ok_totals(before) == ALL_SETTLED, before
    run = runs[-1]
    assert run.code == 1, run
    assert set(run.violations) == {fault.batch_id}, run
    assert fault.says in run.violations[fault.batch_id], run
    assert run["holds"] is False
    # The other batches are judged all the same, and nothing is left pending.
    assert ok_totals(run) == ALL_SETTLED, run


async def test_an_identical_redelivery_after_the_verdict_is_a_duplicate(
    pipeline: Pipeline,
) -> None:
    outcomes = await pipeline.outcome("faults")
    _, (before, after) = outcomes["an identical redelivery, after the verdict"]
    assert (before.code, before["duplicates"]) == (0, 0), before
    assert after.code == 0, after
    assert after.violations == {}, after
    assert (after["duplicates"], after["this_run"]["duplicates"]) == (1, 1), after
    assert after["this_run"]["batches_verified"] == 0, after


async def group_reused(p: Pipeline) -> Run:
    """The group that verified `src` pointed at another pipeline's topics (the dropped-event
    copy): a second connector, or one re-created under a new topic prefix."""
    await p.outcome("clean")
    await p.outcome("faults")
    return await p.verify(_prefix("dropped event"), "clean-src", "--due-after", PATIENT)


async def test_a_group_reused_for_another_pipeline_does_not_hide_its_faults(
    pipeline: Pipeline,
) -> None:
    run = await pipeline.outcome("group reused")
    # Refused with one line naming the group, the topics it verifies and the fix: a group
    # verifies one pipeline, so it never "holds" over another's lost event.
    assert run.code == 2, run
    (line,) = run.stderr.strip().splitlines()
    assert "clean-src" in line and "--group" in line, run


# --- two partitions: a dropped event caught once every partition moved past it -------------


async def lagging_partition(p: Pipeline) -> tuple[Run, Run, Record]:
    """An event of batch 2 lost on partition 0. First partition 0 (and the ledger and
    transaction topics) stops at batch 2 while partition 1 delivers everything; then
    partition 0 catches up. The same group reads both times."""
    two, second = p.two, p.batches[2]
    assert {r.partition for r in two.orders} == {0, 1}
    assert second.end_lsn is not None
    end_lsn = second.end_lsn
    victim = [r for r in two.orders_of(2) if r.partition == 0][7]
    dropped = two.without(victim)
    end = dropped.end_of(second.tx_id)

    def keep(record: Record) -> bool:
        if record.suffix == ORDERS:
            return record.partition == 1 or record.lsn <= end_lsn
        if record.suffix == LEDGER:
            return record.lsn <= end_lsn
        return record.offset <= end.offset

    head, tail = dropped.split(keep)
    prefix = group = "two-lagging"
    await head.publish(p.bootstrap, prefix)
    lagging = await p.verify(prefix, group, "--due-after", PATIENT)
    await tail.publish(p.bootstrap, prefix)
    caught = await p.verify(prefix, group, "--due-after", PATIENT)
    return lagging, caught, victim


async def test_two_partitions_catch_a_drop_once_every_partition_moved_past(
    pipeline: Pipeline,
) -> None:
    lagging, caught, victim = await pipeline.outcome("two partitions")
    # Partition 0 has not moved past batch 2: the gap may still fill. Batch 1 is whole;
    # 2 and 4-6 wait for partition 0.
    assert lagging.code == 0, lagging
    assert lagging.violations == {}, lagging
    assert lagging["completed"] == 1, lagging
    assert lagging["pending"] == 4, lagging
    # Partition 0 moved on: the gap is a loss, named by batch and id.
    gone = victim.row["order_id"]
    assert caught.code == 1, caught
    assert set(caught.violations) == {2}, caught
    assert f"missing order ids {gone} (1 of {ROWS})" in caught.violations[2], caught
    assert caught["batches_verified"] == len(pipeline.batches), caught
    assert ok_totals(caught) == ALL_SETTLED, caught


# --- verify --kafka stopped mid-stream and run again ----------------------------------------


async def verifier_restart(p: Pipeline) -> tuple[Run, Run, Run, dict[int, str]]:
    """Faulted `src` topics (batch 2 loses an event before the stop, batch 5 carries a
    foreign txId after it, so the verdicts compared are not all "ok"), delivered up to
    half-way through batch 4 to `verify --follow`, which is stopped with SIGTERM once it
    committed an offset; the rest delivered, then a one-shot run of the same group, and one
    of a fresh group over everything."""
    src, batches = p.src, p.batches
    gone = batches[2].first_order_id + 11
    (victim,) = [r for r in src.orders if r.row["order_id"] == gone]
    altered = src.orders_of(5)[77]
    faulted = src.without(victim).replacing(
        altered, altered.altered(_set("source.txId", FOREIGN_TX))
    )
    cut = faulted.orders_of(4)[ROWS // 2 - 1]
    end = faulted.end_of(batches[4].tx_id)

    def keep(record: Record) -> bool:
        if record.suffix == ORDERS:
            return record.offset <= cut.offset
        if record.suffix == LEDGER:
            return record.lsn <= cut.lsn
        return record.offset < end.offset

    head, tail = faulted.split(keep)
    prefix, group = "restart", "resumable"
    await head.publish(p.bootstrap, prefix)
    follow = Following.start(
        p.work / "follow",
        verify_args(p.dsn, p.bootstrap, prefix, group, "--follow", "--due-after", PATIENT),
    )
    # Offsets are committed only once the verdicts they support are stored, and never past
    # the first record of a batch not judged yet: the first of batch 4, once 1-3 are judged.
    unjudged = next(i for i, r in enumerate(head.orders) if r.row["batch_id"] == 4)
    try:
        await wait_until(
            "verify --follow judges batches 1-3 and commits up to batch 4",
            lambda: committed_offset(p.bootstrap, group, f"{prefix}.{ORDERS}", 0),
            lambda offset: offset >= unjudged,
            timeout=60,
        )
    finally:
        first = await follow.stop()
    # Batch 4's first half is not judged: a restart must read it again.
    assert await committed_offset(p.bootstrap, group, f"{prefix}.{ORDERS}", 0) == unjudged
    await tail.publish(p.bootstrap, prefix)
    second, whole = await asyncio.gather(
        p.verify(prefix, group, "--due-after", PATIENT),
        p.verify(prefix, "uninterrupted", "--due-after", PATIENT),
    )
    expected = {2: f"missing order ids {gone} (1 of {ROWS})", 5: str(FOREIGN_TX)}
    return first, second, whole, expected


async def test_verify_restarted_mid_stream_gives_the_same_verdicts(pipeline: Pipeline) -> None:
    first, second, whole, expected = await pipeline.outcome("verifier restart")
    batches = len(pipeline.batches)
    assert whole.code == 1, whole
    assert set(whole.violations) == set(expected), whole
    for batch_id, says in expected.items():
        assert says in whole.violations[batch_id], whole
    assert whole["this_run"]["batches_verified"] == batches, whole

    assert first.code == 1, first  # batch 2 was judged before the stop
    assert first["this_run"]["batches_verified"] == 3, first
    assert first["pending"] >= 1, first  # batch 4, half read
    assert set(first.violations) == {2}, first
    assert second.code == 1, second
    # Same final verdicts, nothing judged twice, nothing skipped.
    assert second.violations == whole.violations, (second, whole)
    assert second["violation_count"] == whole["violation_count"], second
    assert (
        first["this_run"]["batches_verified"] + second["this_run"]["batches_verified"] == batches
    ), (first, second)
    assert second["batches_verified"] == batches, second
    assert ok_totals(second) == ok_totals(whole) == ALL_SETTLED, (second, whole)
    assert second["rows"] == whole["rows"] == 5 * ROWS - 1, (second, whole)
    # Batch 4's first half, read again after the restart, is no duplicate.
    assert second["duplicates"] == whole["duplicates"] == 0, (second, whole)


SCENARIOS: dict[str, Callable[[Pipeline], Awaitable[Any]]] = {
    "paused": pause_and_resume,
    "clean": clean_runs,
    "faults": fault_runs,
    "two partitions": lagging_partition,
    "verifier restart": verifier_restart,
    "group reused": group_reused,
}
