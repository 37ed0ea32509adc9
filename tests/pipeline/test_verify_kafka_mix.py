"""`cdcfeed verify --kafka` on the change mix, against the real Debezium connector.

Two databases, each loaded once with the same mixed batches (`--mix insert=60,update=25,
delete=15 --toast-bytes 4096`: every insert writes a TOASTed note, an update leaves it
alone): one under REPLICA IDENTITY DEFAULT (schemas, precise decimals), one under FULL (no
schemas, string decimals), each streamed by its own engine into its own topic prefix.

- Both verify clean: DEFAULT's updates carry Debezium's placeholder for the note (counted as
  unchanged TOAST values, no violation), FULL's carry the note itself.
- Copies of the topics with one change each (faults.py): a dropped update, a stale after
  image, a dropped tombstone, a forged delete in a batch's transaction, and under FULL a
  placeholder where the value is promised, and a before image with the key only where the
  whole old row is: each caught and named by batch (exit 1).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cdcfeed.proof.kafka.debezium import UNAVAILABLE
from tests.pipeline.broker import Broker
from tests.pipeline.debezium_runner import QUICK_START_JVM, DebeziumRunner
from tests.pipeline.faults import LEDGER, ORDERS, TRANSACTION, Json, TopicSet
from tests.pipeline.test_rig import wait_for_end
from tests.pipeline.test_verify_kafka_scenarios import PATIENT, Batch, Run, ledger, verify
from tests.support import create_schema, execute, run_cli, run_in_process, settings_for

pytestmark = pytest.mark.pipeline

ROWS, BATCHES = 100, 4
MIX, TOAST_BYTES = "insert=60,update=25,delete=15", 4096
IDENTITIES = {
    "default": {"schemas": True, "decimal": "precise"},
    "full": {"schemas": False, "decimal": "string"},
}
FAULTY = 2  # the batch the fault cases alter: neither the first nor the last


@dataclass
class Loaded:
    dsn: str
    prefix: str
    batches: dict[int, Batch]
    topics: TopicSet
    clean: Run | None = None


@dataclass
class Mix:
    bootstrap: str
    loaded: dict[str, Loaded] = field(default_factory=dict)
    faults: dict[str, asyncio.Task[Run]] = field(default_factory=dict)

    def verify(self, identity: str, prefix: str, group: str) -> Any:
        return verify(
            self.loaded[identity].dsn, self.bootstrap, prefix, group, "--due-after", PATIENT
        )


async def _database(module_dsn: str, name: str) -> str:
    await execute(module_dsn, f'CREATE DATABASE "{name}"')
    base, _, _ = module_dsn.rpartition("/")
    return f"{base}/{name}"


async def _load(
    broker: Broker, module_dsn: str, work: Path, identity: str, options: dict[str, Any]
) -> tuple[Loaded, DebeziumRunner]:
    dsn = await _database(module_dsn, f"{module_dsn.rpartition('/')[2]}_{identity}")
    await create_schema(dsn)
    result = await asyncio.to_thread(
        run_cli, "init-db", "--dsn", dsn, "--replica-identity", identity
    )
    assert result.returncode == 0, result.stderr
    prefix = f"mix-{identity}"
    await broker.create_topics(
        {f"{prefix}.{ORDERS}": 1, f"{prefix}.{LEDGER}": 1, f"{prefix}.{TRANSACTION}": 1}
    )
    engine = DebeziumRunner(
        work / prefix, dsn, broker.bootstrap, topic_prefix=prefix, slot=f"mix_{identity}",
        publication=f"mix_{identity}", jvm_options=QUICK_START_JVM, **options,
    )  # fmt: skip
    await asyncio.to_thread(engine.start)
    settings = settings_for(
        dsn, work / f"feed-{identity}", batch_size=ROWS, max_batches=BATCHES, concurrency=1,
        mix=MIX, toast_bytes=TOAST_BYTES,
    )  # fmt: skip
    assert await run_in_process(settings) == 0
    batches = await ledger(dsn)
    assert [b.status for b in batches.values()] == ["COMPLETED"] * BATCHES, batches
    last = batches[max(batches)]
    await wait_for_end(broker.bootstrap, prefix, last.tx_id)
    counts = {ORDERS: None, LEDGER: None, TRANSACTION: None}
    topics = await TopicSet.read(broker.bootstrap, prefix, counts)
    topics = topics.with_partitions({ORDERS: 1, LEDGER: 1, TRANSACTION: 1})
    return Loaded(dsn, prefix, batches, topics), engine


@pytest.fixture(scope="module")
async def mix(
    broker: Broker, module_dsn: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Mix]:
    work = tmp_path_factory.mktemp("kafka-mix")
    out = Mix(broker.bootstrap)
    engines: list[DebeziumRunner] = []
    try:
        for identity, options in IDENTITIES.items():
            loaded, engine = await _load(broker, module_dsn, work, identity, options)
            engines.append(engine)
            out.loaded[identity] = loaded
        for identity, loaded in out.loaded.items():
            changed = [b for b in loaded.batches.values() if b.updated_ids and b.deleted_ids]
            assert changed, f"no batch of the {identity} load both updated and deleted"
        runs = await asyncio.gather(
            *(
                out.verify(i, loaded.prefix, f"clean-{loaded.prefix}")
                for i, loaded in out.loaded.items()
            )
        )
        for loaded, run in zip(out.loaded.values(), runs, strict=True):
            loaded.clean = run
        out.faults = {
            name: asyncio.create_task(_fault_run(out, name, identity, topics))
            for name, (identity, topics) in faults(out).items()
        }
        yield out
    finally:
        for task in out.faults.values():
            task.cancel()
        await asyncio.gather(*out.faults.values(), return_exceptions=True)
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in engines))


# --- clean ------------------------------------------------------------------------------------


@pytest.mark.parametrize("identity", list(IDENTITIES))
async def test_a_mixed_load_verifies_clean(mix: Mix, identity: str) -> None:
    loaded = mix.loaded[identity]
    run = loaded.clean
    assert run is not None
    assert run.code == 0, run
    assert run.violations == {}, run
    batches = loaded.batches.values()
    assert run["batches_verified"] == BATCHES, run
    assert run["rows"] == sum(b.row_count for b in batches), run
    assert run["updated"] == sum(len(b.updated_ids) for b in batches) > 0, run
    assert run["deleted"] == sum(len(b.deleted_ids) for b in batches) > 0, run
    # Every update left a TOASTed note alone: DEFAULT carries the placeholder (counted, no
    # violation), FULL the value.
    assert run["unchanged_toast"] == (run["updated"] if identity == "default" else 0), run


async def test_deletes_are_followed_by_their_tombstones(mix: Mix) -> None:
    topics, batches = mix.loaded["default"].topics, mix.loaded["default"].batches
    for batch in batches.values():
        deletes = topics.changes_of(batch.tx_id, "d")
        assert sorted(d.key_order_id for d in deletes) == batch.deleted_ids
        for delete in deletes:
            assert topics.tombstone_of(delete).key_order_id == delete.key_order_id


# --- injected faults --------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[Json], None]:
    def change(event: Json) -> None:
        *parents, name = path.split(".")
        for parent in parents:
            event = event[parent]
        event[name] = value

    return change


def faults(mix: Mix) -> dict[str, tuple[str, TopicSet]]:
    out: dict[str, tuple[str, TopicSet]] = {}
    default, full = mix.loaded["default"], mix.loaded["full"]
    batch = default.batches[FAULTY]
    src = default.topics
    updates, deletes = src.changes_of(batch.tx_id, "u"), src.changes_of(batch.tx_id, "d")
    out["dropped update"] = ("default", src.without(updates[0]))
    out["stale after image"] = (
        "default",
        src.replacing(updates[-1], updates[-1].altered(_set("after.status", "created"))),
    )
    out["dropped tombstone"] = ("default", src.without(src.tombstone_of(deletes[0])))
    # A delete of an order no batch deleted, in the batch's transaction (its txId and LSN).
    changed = {i for b in default.batches.values() for i in b.updated_ids + b.deleted_ids}
    victim = next(i for i in range(1, 10**6) if i not in changed)
    tombstone = src.tombstone_of(deletes[-1])
    forged = deletes[-1].altered(_set("before.order_id", victim), key=_set("order_id", victim))
    out["forged delete"] = (
        "default",
        src.inserting(tombstone, forged).inserting(forged, tombstone.rekeyed(victim)),
    )
    full_batch = full.batches[FAULTY]
    update = full.topics.changes_of(full_batch.tx_id, "u")[0]
    out["placeholder under FULL"] = (
        "full",
        full.topics.replacing(update, update.altered(_set("after.note", UNAVAILABLE))),
    )
    delete = full.topics.changes_of(full_batch.tx_id, "d")[0]
    out["key-only before under FULL"] = (
        "full",
        full.topics.replacing(delete, delete.altered(_key_only)),
    )
    return out


def _key_only(event: Json) -> None:
    """The before image as REPLICA IDENTITY DEFAULT gives it: the key, and Debezium's
    defaults (no row's values) for the other columns."""
    before = event["before"]
    before.update(batch_id=0, customer_id=0, amount="0.00", status="created")


SAYS = {
    "dropped update": "updates missing",
    "stale after image": "stale after image",
    "dropped tombstone": "missing tombstone",
    "forged delete": "which it did not delete",
    "placeholder under FULL": "TOAST",
    "key-only before under FULL": "carry the key only",
}


async def _fault_run(mix: Mix, name: str, identity: str, topics: TopicSet) -> Run:
    prefix = "mixfault-" + "".join(c if c.isalnum() else "-" for c in name.lower())
    await topics.publish(mix.bootstrap, prefix)
    return await mix.verify(identity, prefix, prefix)


@pytest.mark.parametrize("name", list(SAYS))
async def test_an_injected_change_fault_is_caught_and_named_by_batch(mix: Mix, name: str) -> None:
    run = await mix.faults[name]
    assert run.code == 1, run
    assert set(run.violations) == {FAULTY}, run
    assert SAYS[name] in run.violations[FAULTY], run
    assert run["batches_verified"] == BATCHES, run
