"""Above capacity, without a database: missed arrivals are counted in one step from the
schedule, the scheduler holds its capacity, and the event loop stays free for everything else."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cdcfeed.config import LoadSettings, load_settings
from cdcfeed.endpoint import Readiness
from cdcfeed.load.generate import INLINE_ROWS, batch_rng, render_orders
from cdcfeed.load.profiles import Arrivals, arrivals_of, profile_of
from cdcfeed.load.scheduler import ArrivalTrigger, LoadScheduler
from cdcfeed.metrics import Metrics
from tests.support import wait_until

SHAPES: list[dict[str, Any]] = [
    {"rate": 300},
    {"profile": "ramp", "rate": 10, "ramp_to": 500, "ramp_seconds": 7},
    {"profile": "steps", "steps": [{"rate": 50, "seconds": 2}, {"rate": 0, "seconds": 1}]},
    {
        "profile": "steps",
        "steps_repeat": True,
        "steps": [{"rate": 200, "seconds": 0.5}, {"rate": 20, "seconds": 1.5}],
    },
    {"profile": "sine", "rate": 100, "sine_amplitude": 80, "sine_period": 3},
    {"profile": "bursts", "rate": 5, "burst_rate": 400, "burst_seconds": 1, "burst_every": 4},
]


def _load(**values: Any) -> LoadSettings:
    return load_settings(None, {"load": values}, {}).load


def _even(load: LoadSettings) -> Arrivals:
    return Arrivals(profile_of(load), poisson=False, rng=random.Random(0))


@pytest.mark.parametrize("shape", SHAPES)
def test_skipping_counts_exactly_the_arrivals_stepping_would(shape: dict[str, Any]) -> None:
    stepped, skipping = _even(_load(**shape)), _even(_load(**shape))
    for until in (0.37, 1.0, 1.01, 2.5, 6.2, 9.9):
        count = 0
        last = None
        while True:
            arrival = stepped.next()
            if arrival is None or arrival > until:
                break
            count, last = count + 1, arrival
        skipped, skipped_last = skipping.skip_until(until)
        assert skipped == count, until
        if count:
            assert skipped_last == pytest.approx(last, abs=1e-9)
        # Both go on with the same arrival: the first one after `until`.
        assert skipping.next() == pytest.approx(arrival, abs=1e-9)


def test_skipping_poisson_arrivals_counts_as_many_on_average() -> None:
    rate, seconds = 2000.0, 1.0
    counts = []
    for seed in range(200):
        arrivals = arrivals_of(_load(rate=rate, arrivals="poisson", seed=seed))
        counts.append(arrivals.skip_until(seconds)[0])
        assert arrivals.next() > seconds  # type: ignore[operator]
    assert statistics.mean(counts) == pytest.approx(rate * seconds, rel=0.02)
    assert statistics.stdev(counts) == pytest.approx((rate * seconds) ** 0.5, rel=0.3)


def test_a_hold_keeps_the_latest_missed_arrival_and_drops_the_rest() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = ArrivalTrigger(_even(_load(rate=1000)), start)
    first = trigger.get_next_fire_time(None, start)
    assert first == start
    # Held from the start (the fire time taken from the job) until 2.5 s: 2,501 arrivals due.
    dropped, fire = trigger.catch_up(start + timedelta(seconds=2.5), keep_latest=True)
    assert dropped == 2500
    assert fire == start + timedelta(seconds=2.5)
    assert trigger.planned.pop(fire) == fire  # as APScheduler submits it
    after = trigger.get_next_fire_time(fire, start + timedelta(seconds=2.5))
    assert after == start + timedelta(seconds=2.501)
    # Still blocked: every arrival due is dropped, the next fire time is the next arrival.
    dropped, fire = trigger.catch_up(start + timedelta(seconds=3.0), keep_latest=False)
    assert dropped == 500  # 2.501 .. 3.000
    assert fire == start + timedelta(seconds=3.001)


GRACE = 2.0


async def _run_above_capacity(
    rate: float, blocked: list[str | None], enough: Callable[[dict[str, float]], bool]
) -> dict[str, float]:
    """10 ms batches at concurrency 4 asked `rate` batches a second, with a heartbeat on the
    same loop, until `enough` holds of what happened (or a deadline fails the test); then a
    stop, which must end within the grace period."""
    metrics = Metrics()
    started = 0
    done = 0
    beats = 0

    async def batch(_: int) -> None:
        nonlocal started, done
        started += 1
        await asyncio.sleep(0.01)
        done += 1

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            beats += 1
            await asyncio.sleep(0.05)

    def seen() -> dict[str, float]:
        def skipped(reason: str) -> float:
            sample = metrics.registry.get_sample_value(
                "cdcfeed_batches_skipped_total", {"reason": reason}
            )
            return sample or 0.0

        return {
            "elapsed": time.monotonic() - began,
            "started": started,
            "completed": done,
            "beats": beats,
            "skipped_busy": skipped("busy"),
            "skipped_down": skipped("database_down"),
        }

    stop = asyncio.Event()
    scheduler = LoadScheduler(
        arrivals=arrivals_of(_load(rate=rate)),
        concurrency=4,
        max_batches=0,
        duration=0,
        grace_period=GRACE,
        metrics=metrics,
        start_batch=batch,
        blocked=lambda: blocked[0],
        stop=stop,
        readiness=Readiness(),
    )
    began = time.monotonic()
    running = asyncio.create_task(scheduler.run())
    beating = asyncio.create_task(heartbeat())
    try:
        return await wait_until(f"above capacity ({rate:g}/s asked)", seen, enough, timeout=30)
    finally:
        stop.set()
        # Stopping stays within the grace period however far above capacity it was asked.
        await asyncio.wait_for(running, timeout=GRACE + 1)
        beating.cancel()


@pytest.mark.parametrize("rate", [4_000, 100_000])
async def test_far_above_capacity_batches_go_on_and_the_loop_stays_free(rate: float) -> None:
    # Batches keep completing, the skipped runs are counted, and a heartbeat on the same loop
    # keeps beating meanwhile. Waking the loop per missed arrival (as before) starves both.
    # Capacity is at most 400/s (10 ms, 4 at once): at 4,000/s asked, a scheduler that keeps
    # every slot busy skips at most 9 runs a batch; 5 leaves room for the noise of a shared
    # machine.
    await _run_above_capacity(
        rate,
        [None],
        lambda seen: (
            seen["completed"] >= 300
            and seen["skipped_busy"] >= 5 * seen["completed"]
            and seen["beats"] >= 20
        ),
    )


async def test_far_above_capacity_every_arrival_starts_a_batch_or_is_counted_once() -> None:
    # Started and skipped add up to the arrivals due: none lost, none counted twice, however
    # the runs are coalesced while every slot is busy.
    rate = 4_000

    def accounted(seen: dict[str, float]) -> bool:
        return seen["elapsed"] >= 3

    seen = await _run_above_capacity(rate, [None], accounted)
    arrivals = seen["started"] + seen["skipped_busy"]
    assert seen["started"] >= 300
    assert 0.95 * rate * seen["elapsed"] <= arrivals <= 1.05 * rate * seen["elapsed"]


async def test_runs_blocked_by_an_outage_are_counted_without_a_run_each() -> None:
    blocked: list[str | None] = ["database_down"]

    def outage_counted(seen: dict[str, float]) -> bool:
        if blocked[0] is not None and seen["skipped_down"] >= 10_000 and seen["beats"] >= 10:
            blocked[0] = None  # the outage ends once its runs were counted, loop free
        return blocked[0] is None and seen["completed"] >= 300

    result = await _run_above_capacity(50_000, blocked, outage_counted)
    assert result["skipped_down"] >= 10_000
    assert result["completed"] >= 300  # loading again once the outage is over


async def test_a_large_batch_renders_off_the_event_loop() -> None:
    rows = 100 * INLINE_ROWS
    ticks: list[float] = []

    async def tick() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.001)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    before = len(ticks)
    data = await render_orders(1, 1, rows, batch_rng(1, 0))
    ticker.cancel()
    assert data.count(b"\n") == rows + 1
    assert len(ticks) - before >= 5  # the loop went on ticking while the rows were rendered
    small = await render_orders(2, 1, INLINE_ROWS, batch_rng(1, 1))
    assert small.count(b"\n") == INLINE_ROWS + 1
