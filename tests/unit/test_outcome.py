"""Every branch of a batch's outcome, driven through `run_batch` with a fake database.

No server and no sleeping: the fake answers at once, or waits on an event the test sets.
The real-server tests (test_faults.py, test_ledger.py) prove the same paths end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cdcfeed.database import Allocation, Settlement
from cdcfeed.errors import (
    BatchAborted,
    DatabaseBusy,
    DatabaseRefused,
    DatabaseSilent,
    DatabaseUnavailable,
)
from cdcfeed.load import batch
from cdcfeed.load.batch import BatchEnvironment, run_batch
from cdcfeed.load.outcome import Action, Outcome, Reached, decide
from cdcfeed.retry import Backoff
from tests.unit.batch_environment import environment as batch_environment

LOST = DatabaseUnavailable("ConnectionDoesNotExistError: connection was closed")
REFUSED = DatabaseRefused("UniqueViolationError [23505]: duplicate key", "23505")
TIMED_OUT = DatabaseBusy("QueryCanceledError [57014]: canceling statement", "57014")
SILENT = DatabaseSilent("TimeoutError: TimeoutError")
ABORTED = BatchAborted("settled by another instance before its COPY")


class FakeSession:
    def __init__(self, db: FakeDatabase) -> None:
        self.db = db

    async def open_batch(self, allocation: Allocation, *args: Any, **options: Any) -> None:
        await self.db.step("open")

    async def copy(self, batch_id: int, data: bytes, timeout: float | None) -> None:
        await self.db.step("copy")

    async def complete(
        self, batch_id: int, rows: int, seconds: float
    ) -> tuple[str, str, str] | None:
        await self.db.step("complete")
        return ("0/10", "0/20", "777")


class FakeDatabase:
    """Raises `error` at step `fail_at` ("reserve", "acquire", "open", "copy", "complete");
    waits on `hold` at step `wait_at`; `settlements` answer `settle` in turn."""

    def __init__(
        self,
        fail_at: str | None = None,
        error: BaseException | None = None,
        settlements: list[Settlement | BaseException] | None = None,
        fail_batch_error: BaseException | None = None,
        wait_at: str | None = None,
    ) -> None:
        self.fail_at = fail_at
        self.error = error
        self.settlements = list(settlements or [])
        self.fail_batch_error = fail_batch_error
        self.wait_at = wait_at
        self.reached = asyncio.Event()
        self.hold = asyncio.Event()
        self.steps: list[str] = []
        self.failed: list[tuple[int, str]] = []
        self.settled: list[tuple[int, str]] = []

    async def step(self, name: str) -> None:
        self.steps.append(name)
        if name == self.wait_at:
            self.reached.set()
            await self.hold.wait()
        if name == self.fail_at:
            assert self.error is not None
            raise self.error

    async def reserve_ids(self, rows: int, batches: int) -> list[Allocation]:
        await self.step("reserve")
        return [Allocation(batch_id=7, first_order_id=1)]

    @asynccontextmanager
    async def batch_session(self) -> AsyncIterator[FakeSession]:
        await self.step("acquire")
        yield FakeSession(self)

    async def fail_batch(self, batch_id: int, error: str, seconds: float | None) -> None:
        if self.fail_batch_error is not None:
            raise self.fail_batch_error
        self.failed.append((batch_id, error))

    async def settle(self, batch_id: int, reason: str) -> Settlement:
        self.settled.append((batch_id, reason))
        answer = self.settlements.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def record_unstarted_failure(self, *args: Any) -> None:
        raise AssertionError("not reached in these tests")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # Retries go round at once: these tests never sleep.
    monkeypatch.setattr(batch, "SETTLE_BACKOFF", Backoff(0.0, 0.0))


def environment(db: FakeDatabase, feed_dir: Path) -> BatchEnvironment:
    return batch_environment(db, feed_dir, copy_timeout=6.0)


def count(env: BatchEnvironment, metric: str, **labels: str) -> float:
    value = env.metrics.registry.get_sample_value(metric, labels)
    return 0.0 if value is None else value


def completed(env: BatchEnvironment) -> float:
    return count(env, "cdcfeed_batches_total", status="completed")


def failed(env: BatchEnvironment) -> float:
    return count(env, "cdcfeed_batches_total", status="failed")


def skipped(env: BatchEnvironment) -> float:
    return count(env, "cdcfeed_batches_skipped_total", reason="database_down")


# --- the decision itself ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reached", "error", "expected"),
    [
        (Reached.NOTHING, LOST, Outcome(Action.SKIP, str(LOST), database_down=True)),
        (Reached.NOTHING, asyncio.CancelledError(), Outcome(Action.SKIP, "cut off by shutdown")),
        (Reached.NOTHING, REFUSED, Outcome(Action.SKIP, str(REFUSED), refused=True)),
        (
            Reached.SERVER,
            asyncio.CancelledError(),
            Outcome(Action.SETTLE, "cut off by shutdown", shutdown=True),
        ),
        (Reached.SERVER, REFUSED, Outcome(Action.FAIL, str(REFUSED))),
        (Reached.SERVER, TIMED_OUT, Outcome(Action.FAIL, str(TIMED_OUT))),
        (
            Reached.SERVER,
            LOST,
            Outcome(Action.SETTLE, f"database unavailable: {LOST}", database_down=True),
        ),
        (
            Reached.SERVER,
            SILENT,
            Outcome(
                Action.SETTLE, "COPY got no answer within 6s (hung server?)", database_down=True
            ),
        ),
        (Reached.SERVER, ABORTED, Outcome(Action.SETTLE, f"BatchAborted: {ABORTED}")),
        (Reached.COMMIT, LOST, Outcome(Action.SETTLE, f"database unavailable: {LOST}")),
        (Reached.COMMIT, REFUSED, Outcome(Action.SETTLE, str(REFUSED))),
        (Reached.SERVER, RuntimeError("a bug"), None),
    ],
)
def test_the_outcome_of_each_way_a_batch_can_stop(
    reached: Reached, error: BaseException, expected: Outcome | None
) -> None:
    assert decide(reached, error, copy_timeout=6.0) == expected


def test_a_silent_server_without_a_copy_timeout_is_an_outage() -> None:
    outcome = decide(Reached.SERVER, SILENT, copy_timeout=None)
    assert outcome == Outcome(Action.SETTLE, f"database unavailable: {SILENT}", database_down=True)


# --- run_batch carrying it out ----------------------------------------------------------------


async def test_a_batch_that_runs_through_is_completed(tmp_path: Path) -> None:
    db = FakeDatabase()
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.steps == ["reserve", "acquire", "open", "copy", "complete"]
    assert (completed(env), failed(env), db.settled) == (1, 0, [])


async def test_no_ids_to_be_had_skips_the_run(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="reserve", error=LOST)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.steps == ["reserve"]
    assert skipped(env) == 1 and env.on_database_down.is_set()


async def test_no_connection_to_be_had_skips_the_run(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="acquire", error=LOST)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert (skipped(env), failed(env), db.failed, db.settled) == (1, 0, [], [])
    assert env.on_database_down.is_set()


async def test_a_connection_the_server_refuses_is_a_refused_run_not_a_failed_batch(
    tmp_path: Path,
) -> None:
    # A login refused when the pool opens a connection (a rotated password, say): nothing of
    # the batch was sent, so there is no row to mark FAILED.
    db = FakeDatabase(fail_at="acquire", error=REFUSED)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert (db.failed, db.settled, failed(env)) == ([], [], 0)
    assert count(env, "cdcfeed_batches_skipped_total", reason="database_refused") == 1


@pytest.mark.parametrize("step", ["open", "copy"])
async def test_a_refused_statement_fails_the_batch_with_the_error(
    tmp_path: Path, step: str
) -> None:
    db = FakeDatabase(fail_at=step, error=TIMED_OUT)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.failed == [(7, str(TIMED_OUT))]
    assert (failed(env), db.settled) == (1, [])
    assert not env.on_database_down.is_set()


async def test_a_failure_that_cannot_be_recorded_is_settled(tmp_path: Path) -> None:
    db = FakeDatabase(
        fail_at="copy", error=REFUSED, fail_batch_error=LOST, settlements=[Settlement("FAILED")]
    )
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.settled == [(7, str(REFUSED))]
    assert failed(env) == 1


async def test_a_connection_lost_mid_copy_is_settled_from_the_database(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="copy", error=LOST, settlements=[Settlement("COMPLETED", "0/30", 5)])
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.settled == [(7, f"database unavailable: {LOST}")]
    assert (completed(env), failed(env)) == (1, 0)
    assert env.on_database_down.is_set()


async def test_a_copy_the_server_never_answers_is_settled(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="copy", error=SILENT, settlements=[Settlement("FAILED")])
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.settled == [(7, "COPY got no answer within 6s (hung server?)")]
    assert failed(env) == 1


@pytest.mark.parametrize("error", [LOST, REFUSED])
async def test_a_mark_lost_after_the_commit_is_settled_never_failed(
    tmp_path: Path, error: BaseException
) -> None:
    db = FakeDatabase(
        fail_at="complete", error=error, settlements=[Settlement("COMPLETED", "0/30", 5)]
    )
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.failed == []
    assert len(db.settled) == 1 and completed(env) == 1
    # The COPY committed: the database answered, it is not down.
    assert not env.on_database_down.is_set()


async def test_a_batch_settled_by_another_instance_is_read_back_not_failed_again(
    tmp_path: Path,
) -> None:
    db = FakeDatabase(fail_at="copy", error=ABORTED, settlements=[Settlement("FAILED")])
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert db.failed == []
    assert db.settled == [(7, f"BatchAborted: {ABORTED}")]
    assert failed(env) == 1 and not env.on_database_down.is_set()


async def test_a_batch_whose_row_never_arrived_is_skipped(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="open", error=LOST, settlements=[Settlement("NOT_STARTED")])
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert (skipped(env), failed(env), completed(env)) == (1, 0, 0)


async def test_settling_waits_out_a_copy_still_running_and_an_outage(tmp_path: Path) -> None:
    answers: list[Settlement | BaseException] = [
        Settlement("IN_PROGRESS"),
        LOST,
        Settlement("COMPLETED", "0/30", 5),
    ]
    db = FakeDatabase(fail_at="copy", error=LOST, settlements=answers)
    env = environment(db, tmp_path)
    await run_batch(env, 0)
    assert len(db.settled) == 3 and completed(env) == 1


async def test_a_stopping_daemon_leaves_an_unknown_batch_for_reconciliation(
    tmp_path: Path,
) -> None:
    db = FakeDatabase(fail_at="copy", error=LOST, settlements=[LOST])
    env = environment(db, tmp_path)
    env.stopping.set()
    await run_batch(env, 0)
    assert len(db.settled) == 1
    assert (completed(env), failed(env), skipped(env)) == (0, 0, 0)


async def test_a_batch_cut_off_by_shutdown_mid_copy_is_settled_then_cancelled(
    tmp_path: Path,
) -> None:
    db = FakeDatabase(wait_at="copy", settlements=[Settlement("FAILED")])
    env = environment(db, tmp_path)
    task = asyncio.ensure_future(run_batch(env, 0))
    await db.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert db.settled == [(7, "cut off by shutdown")]
    assert failed(env) == 1


async def test_a_batch_cut_off_before_a_connection_is_only_cancelled(tmp_path: Path) -> None:
    db = FakeDatabase(wait_at="acquire")
    env = environment(db, tmp_path)
    task = asyncio.ensure_future(run_batch(env, 0))
    await db.reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (db.settled, db.failed) == ([], [])
    assert (skipped(env), failed(env)) == (0, 0)


async def test_a_bug_is_not_taken_for_an_outcome(tmp_path: Path) -> None:
    db = FakeDatabase(fail_at="copy", error=RuntimeError("a bug"))
    env = environment(db, tmp_path)
    with pytest.raises(RuntimeError, match="a bug"):
        await run_batch(env, 0)
    assert (db.settled, db.failed) == ([], [])
