"""Operator-facing pieces without a server: derived names, the name validator, the server
settings check, GRANT statements, the log throttle, readiness, and batches whose refusal
reaches even their FAILED mark."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cdcfeed.config import load_settings
from cdcfeed.database import Allocation, ServerSettings, names_of
from cdcfeed.database.names import derived_name
from cdcfeed.database.privileges import grant_statements, needs_of
from cdcfeed.endpoint import Readiness
from cdcfeed.errors import PrivilegeRefused, UserError
from cdcfeed.load import batch
from cdcfeed.load.batch import BatchEnvironment, run_batch
from cdcfeed.retry import Backoff
from cdcfeed.throttle import Throttle
from tests.unit.batch_environment import environment as batch_environment

DENIED = PrivilegeRefused("InsufficientPrivilegeError [42501]: permission denied for table x")


# --- names ----------------------------------------------------------------------------------


def test_names_that_fit_are_exactly_as_before() -> None:
    names = names_of(load_settings(None, {}, {}))
    assert names.batch_sequence == "batch_control_batch_id_seq"
    assert names.batches_index_name("in_progress") == "batch_control_in_progress_idx"
    assert derived_name("b" * 50, "_batch_id_seq") == "b" * 50 + "_batch_id_seq"  # 63 bytes


@pytest.mark.parametrize("base", ["b" * 63, "é" * 31, "a" * 51])
def test_long_derived_names_fit_deterministically(base: str) -> None:
    name = derived_name(base, "_batch_id_seq")
    assert len(name.encode()) <= 63 and name.endswith("_batch_id_seq")
    assert name == derived_name(base, "_batch_id_seq")
    assert name != derived_name(base[:-1] + "x", "_batch_id_seq")
    assert not name.startswith(base)  # never cut back onto the table's own name


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("batch_table", "b" * 64, "64 bytes is too long"),
        ("orders_table", "é" * 32, "64 bytes is too long"),
        ("schema_name", "", "cannot be empty"),
        ("batch_table", "a\x00b", "NUL"),
    ],
)
def test_names_the_server_would_change_are_rejected(key: str, value: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected) as raised:
        load_settings(None, {"database": {key: value}}, {})
    assert raised.value.setting == f"database.{key}"


def test_quotes_are_fine_in_names() -> None:
    settings = load_settings(None, {"cdc": {"publication": 'My"Pub'}}, {})
    assert settings.cdc.publication == 'My"Pub'


def test_grants_quote_every_name() -> None:
    settings = load_settings(None, {"database": {"schema_name": "Odd Schema"}}, {})
    grants = grant_statements(needs_of(names_of(settings), "load"), 'lo"ader')
    assert grants[0] == 'GRANT USAGE ON SCHEMA "Odd Schema" TO "lo""ader"'
    assert 'GRANT USAGE ON SEQUENCE "Odd Schema"."batch_control_batch_id_seq"' in grants[-1]
    assert not any("DELETE" in grant for grant in grants)  # nothing of cdcfeed deletes


# --- server settings ------------------------------------------------------------------------


def test_server_settings_that_keep_a_consumer_out() -> None:
    assert ServerSettings("logical", 10, 10, 2, 1).problems() == {}
    problems = ServerSettings("replica", 0, 10, 0, 0).problems()
    assert set(problems) == {"wal_level", "max_replication_slots"}
    assert "wal_level = logical" in problems["wal_level"]
    full = ServerSettings("logical", 2, 2, 2, 2).problems()
    assert set(full) == {"max_replication_slots", "max_wal_senders"}


# --- throttle and readiness -----------------------------------------------------------------


def test_one_line_per_kind_per_interval_with_a_count() -> None:
    now = [0.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.due("a") == 0
    assert throttle.due("a") is None and throttle.due("a") is None
    assert throttle.due("b") == 0  # another kind has its own interval
    now[0] = 10.5
    held_back = throttle.due("a")
    assert held_back == 2
    assert throttle.suffix(held_back) == " (and 2 more like it in the last 10s)"
    assert throttle.suffix(0) == ""


def test_not_ready_while_every_batch_is_refused() -> None:
    readiness = Readiness(database_up=True, scheduler_running=True)
    readiness.batch_refused()
    assert readiness.ready  # one refused batch is that batch's trouble
    readiness.batch_refused()
    readiness.batch_refused()
    assert not readiness.ready
    readiness.batch_completed()
    assert readiness.ready


# --- refusals in a batch --------------------------------------------------------------------


class RefusingDatabase:
    """Refuses the COPY; refuses the FAILED mark `mark_refusals` times (None: always)."""

    def __init__(self, mark_refusals: int | None, reserve_error: BaseException | None = None):
        self.mark_refusals = mark_refusals
        self.reserve_error = reserve_error
        self.marks = 0
        self.failed: list[int] = []
        self.refused_often = asyncio.Event()

    async def reserve_ids(self, rows: int, batches: int) -> list[Allocation]:
        if self.reserve_error is not None:
            raise self.reserve_error
        return [Allocation(batch_id=7, first_order_id=1)]

    @asynccontextmanager
    async def batch_session(self) -> AsyncIterator[Any]:
        yield self

    async def open_batch(self, *args: Any, **options: Any) -> None:
        return None

    async def copy(self, *args: Any) -> None:
        raise DENIED

    async def fail_batch(self, batch_id: int, error: str, seconds: float | None) -> None:
        self.marks += 1
        if self.marks >= 5:
            self.refused_often.set()
        if self.mark_refusals is None or self.marks <= self.mark_refusals:
            raise DENIED
        self.failed.append(batch_id)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch, "MARK_BACKOFF", Backoff(0.0, 0.0))


def environment(db: RefusingDatabase, feed_dir: Path) -> BatchEnvironment:
    readiness = Readiness(database_up=True, scheduler_running=True)
    return batch_environment(db, feed_dir, readiness=readiness)


async def test_a_refused_mark_is_retried_until_it_is_written(tmp_path: Path) -> None:
    db = RefusingDatabase(mark_refusals=3)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.failed == [7] and db.marks == 4
    assert env.metrics.registry.get_sample_value("cdcfeed_batches_total", {"status": "failed"})
    assert not env.readiness.ready  # the batch and its three refused marks


async def test_a_mark_refused_until_the_stop_leaves_the_batch_to_reconciliation(
    tmp_path: Path,
) -> None:
    db = RefusingDatabase(mark_refusals=None)
    env = environment(db, tmp_path)
    task = asyncio.create_task(run_batch(env, 0))
    await asyncio.wait_for(db.refused_often.wait(), 5)
    env.stopping.set()
    await asyncio.wait_for(task, 5)  # returns, never raises
    assert db.failed == []


async def test_refused_batch_ids_skip_the_run(tmp_path: Path) -> None:
    env = environment(RefusingDatabase(0, reserve_error=DENIED), tmp_path)
    await run_batch(env, 0)
    skipped = env.metrics.registry.get_sample_value(
        "cdcfeed_batches_skipped_total", {"reason": "database_refused"}
    )
    assert skipped == 1
