"""Far above its capacity the daemon holds it: batches keep completing, skipped runs are
counted, the lease is renewed, health answers, and a stop ends within the grace period."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path

import asyncpg
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families

from cdcfeed.app import run_daemon
from cdcfeed.config import load_settings
from cdcfeed.endpoint import Endpoint

GRACE = 5.0
INSTANCE = "overloaded"
# 10-row batches at concurrency 4 complete a few hundred a second here: this is a hundred
# times that or more, the rate of `run --rate 100000 --batch-size 10 --concurrency 8`, which
# once left a daemon with no batch completed after 12 s and a 28 s stop.
RATE = 100_000.0


class LoopWatch:
    """The longest the event loop went without running a 10 ms ticker: how starved it was."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, time.monotonic() - before - 0.01)

    def stop(self) -> None:
        self._task.cancel()


async def _until(what: str, check: Callable[[], Awaitable[bool]], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not within {seconds:g}s: {what}"
        await asyncio.sleep(0.1)


async def _fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


async def _completed(dsn: str) -> int:
    try:
        count = await _fetch(dsn, "SELECT count(*) FROM batch_control WHERE status = 'COMPLETED'")
    except asyncpg.UndefinedTableError:  # the daemon has not made its schema yet
        return 0
    assert isinstance(count, int)
    return count


async def _heartbeat(dsn: str) -> datetime:
    beat = await _fetch(
        dsn, f"SELECT heartbeat_at FROM cdcfeed_instances WHERE instance = '{INSTANCE}'"
    )
    assert isinstance(beat, datetime)
    return beat


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def _skipped(endpoint: Endpoint) -> float:
    _, text = _get(f"{endpoint.url}/metrics")
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cdcfeed_batches_skipped_total" and sample.labels == {
                "reason": "busy"
            }:
                return sample.value
    raise AssertionError("cdcfeed_batches_skipped_total{reason=busy} not exposed")


async def test_ten_times_capacity_holds_capacity_and_stays_responsive(
    dsn: str, tmp_path: Path
) -> None:
    settings = load_settings(
        None,
        {
            "database": {"dsn": dsn, "connect_attempts": 2},
            "load": {"rate": RATE, "batch_size": 10, "concurrency": 4},
            "feed": {"dir": tmp_path / "feed"},
            "metrics": {"address": "127.0.0.1:0"},
            "daemon": {
                "instance": INSTANCE,
                "grace_period": GRACE,
                "heartbeat_interval": 1.0,
                "lease_duration": 5.0,
            },
        },
        environ={},
    )
    warnings: list[str] = []
    sink = logger.add(lambda message: warnings.append(str(message)), level="WARNING")
    stop = asyncio.Event()
    endpoints: list[Endpoint] = []
    daemon = asyncio.create_task(
        run_daemon(settings, stop, environ={}, on_endpoint=endpoints.append), name="daemon"
    )
    watch = LoopWatch()
    try:
        await _until("the first 20 batches", lambda: _at_least(dsn, 20, daemon), 60)
        endpoint = endpoints[0]
        first_beat = await _heartbeat(dsn)
        completed = await _completed(dsn)
        skipped = await asyncio.to_thread(_skipped, endpoint)

        # Batches keep completing, several hundred more, while most arrivals are skipped.
        await _until("200 more batches", lambda: _at_least(dsn, completed + 200, daemon), 60)
        assert await asyncio.to_thread(_get, f"{endpoint.url}/healthz") == (200, "ok\n")
        assert (await asyncio.to_thread(_get, f"{endpoint.url}/readyz"))[0] == 200
        more_skipped = await asyncio.to_thread(_skipped, endpoint)
        assert more_skipped - skipped > 200, "the skipped runs are counted"

        # The lease is renewed on its heartbeat (every second here) while overloaded.
        async def renewed() -> bool:
            return await _heartbeat(dsn) > first_beat

        await _until("a renewed lease", renewed, 10)
        # Nothing held the loop for long: the ticker ran at least every second throughout.
        assert watch.worst < 1.0, f"the event loop stalled for {watch.worst:.1f}s"
    finally:
        watch.stop()
        stop.set()
        stopping = time.monotonic()
        code = await asyncio.wait_for(daemon, timeout=GRACE + 10)
        stopped_in = time.monotonic() - stopping
        logger.remove(sink)
    assert code == 0
    assert stopped_in <= GRACE + 1.0, f"stopped in {stopped_in:.1f}s, grace {GRACE:g}s"
    assert await _fetch(dsn, "SELECT count(*) FROM batch_control WHERE status = 'IN_PROGRESS'") == 0
    starved = [
        line for line in warnings if "database unreachable" in line or "lease not renewed" in line
    ]
    assert starved == [], "a healthy server looked down to a starved event loop"


async def _at_least(dsn: str, count: int, daemon: asyncio.Task[int]) -> bool:
    assert not daemon.done(), f"the daemon ended early: {daemon.result()}"
    return await _completed(dsn) >= count
