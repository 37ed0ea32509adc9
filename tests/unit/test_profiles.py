"""Load shapes and their arrivals: exact counts from the rate's integral, no drift, seeds."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import statistics
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from cdcfeed.cli import to_toml
from cdcfeed.config import LoadSettings, effective_view, load_settings
from cdcfeed.endpoint import Readiness
from cdcfeed.errors import UserError
from cdcfeed.load.profiles import Arrivals, Profile, arrivals_of, profile_of
from cdcfeed.load.scheduler import EARLY_SECONDS, ArrivalTrigger, LoadScheduler, SkipLog
from cdcfeed.metrics import Metrics


def _load(**values: Any) -> LoadSettings:
    return load_settings(None, {"load": values}, {}).load


def _times(arrivals: Arrivals, until: float) -> list[float]:
    times = []
    while (elapsed := arrivals.next()) is not None and elapsed < until:
        times.append(elapsed)
    return times


def _even(load: LoadSettings) -> Arrivals:
    return Arrivals(profile_of(load), poisson=False, rng=random.Random(0))


def _area(profile: Profile, start: float, end: float, steps: int = 20_000) -> float:
    width = (end - start) / steps
    return sum(profile.rate(start + (i + 0.5) * width) for i in range(steps)) * width


def test_the_trigger_spaces_arrivals_without_drift() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = ArrivalTrigger(_even(_load(rate=300)), start)
    fire = trigger.get_next_fire_time(None, start)
    for _ in range(30_000):
        fire = trigger.get_next_fire_time(fire, start)
    assert fire is not None
    assert abs((fire - start) - timedelta(seconds=100)) < timedelta(microseconds=2)


@pytest.mark.parametrize(
    "load",
    [
        {"profile": "ramp", "rate": 2, "ramp_to": 50, "ramp_seconds": 30},
        {"profile": "ramp", "rate": 40, "ramp_to": 5, "ramp_seconds": 20},
        {
            "profile": "steps",
            "steps": [
                {"rate": 5, "seconds": 4},
                {"rate": 0, "seconds": 3},
                {"rate": 30, "seconds": 2.5},
            ],
            "steps_repeat": True,
        },
        {"profile": "sine", "rate": 20, "sine_amplitude": 20, "sine_period": 7},
        {"profile": "bursts", "rate": 1, "burst_rate": 80, "burst_seconds": 2, "burst_every": 9},
        {"profile": "bursts", "rate": 0, "burst_rate": 50, "burst_seconds": 1.5, "burst_every": 4},
    ],
)
def test_even_arrivals_follow_the_area_under_the_rate(load: dict[str, Any]) -> None:
    settings = _load(**load)
    profile = profile_of(settings)
    times = _times(_even(settings), 60.0)
    # The n-th arrival is where the area reaches n: in every window the count is the area,
    # give or take the one arrival straddling each edge.
    for start in range(0, 60, 3):
        inside = sum(start <= t < start + 3 for t in times)
        assert abs(inside - _area(profile, start, start + 3)) <= 1.01, start
    assert all(later > earlier for earlier, later in itertools.pairwise(times))
    assert all(profile.rate(t) > 0 or profile.rate(t + 1e-6) > 0 for t in times)


def test_a_ramp_puts_the_n_th_arrival_where_its_area_is_n() -> None:
    # From 0 to 10/s over 10 s: W(t) = t²/2, so the n-th arrival is at sqrt(2n).
    arrivals = _even(_load(profile="ramp", rate=0, ramp_to=10, ramp_seconds=10))
    times = _times(arrivals, 10.0)
    assert len(times) == 50
    assert all(math.isclose(t, math.sqrt(2 * n), abs_tol=1e-9) for n, t in enumerate(times))


def test_bursts_over_a_zero_base_fire_only_inside_the_bursts() -> None:
    settings = _load(profile="bursts", rate=0, burst_rate=10, burst_seconds=2, burst_every=5)
    times = _times(_even(settings), 20.0)
    assert len(times) == 4 * 20
    assert all(3 <= t % 5 < 5 for t in times)
    assert profile_of(settings).rate(1.0) == 0 and profile_of(settings).rate(4.0) == 10


def test_steps_that_end_at_zero_end_the_arrivals() -> None:
    settings = _load(profile="steps", steps=[{"rate": 10, "seconds": 2}, {"rate": 0, "seconds": 1}])
    arrivals = _even(settings)
    times = []
    while (elapsed := arrivals.next()) is not None:
        times.append(elapsed)
    assert len(times) == 20 and times[-1] == pytest.approx(1.9)


def test_steps_hold_the_last_rate_and_a_ramp_its_target() -> None:
    steps = profile_of(_load(profile="steps", steps=[{"rate": 3, "seconds": 1}]))
    assert steps.rate(0.5) == 3 and steps.rate(1000) == 3
    ramp = profile_of(_load(profile="ramp", rate=1, ramp_to=9, ramp_seconds=8))
    assert ramp.rate(4) == pytest.approx(5) and ramp.rate(100) == 9


def test_poisson_arrivals_have_exponential_gaps_and_follow_the_seed() -> None:
    settings = _load(rate=200, arrivals="poisson", seed=7)
    times = _times(arrivals_of(settings), 100.0)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # 20,000 expected; the standard deviation of a Poisson count is its square root (141).
    assert abs(len(times) - 20_000) < 5 * 141
    assert statistics.mean(gaps) == pytest.approx(1 / 200, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)
    assert times[:50] == _times(arrivals_of(settings), 100.0)[:50]
    assert times[:50] != _times(arrivals_of(_load(rate=200, arrivals="poisson", seed=8)), 1)[:50]


def test_poisson_arrivals_follow_a_shape_too() -> None:
    settings = _load(profile="ramp", rate=0, ramp_to=400, ramp_seconds=50, arrivals="poisson")
    times = _times(arrivals_of(settings), 50.0)
    first_half = sum(t < 25 for t in times)
    # Areas 2,500 and 7,500: a quarter of the arrivals fall in the first half.
    assert abs(first_half - 2_500) < 5 * 50
    assert abs(len(times) - 10_000) < 5 * 100


def test_the_trigger_answers_the_same_question_the_same_way() -> None:
    # APScheduler asks twice after the last run it collected: the Poisson gap is drawn once.
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = ArrivalTrigger(arrivals_of(_load(rate=50, arrivals="poisson")), start)
    first = trigger.get_next_fire_time(None, start)
    second = trigger.get_next_fire_time(first, start)
    assert trigger.get_next_fire_time(first, start) == second
    assert trigger.get_next_fire_time(None, start) == first


def test_arrivals_inside_one_microsecond_stay_in_order() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = ArrivalTrigger(_even(_load(rate=100_000)), start)
    fire = trigger.get_next_fire_time(None, start)
    for _ in range(1000):
        later = trigger.get_next_fire_time(fire, start)
        assert fire is not None and later is not None and later > fire
        fire = later


@pytest.mark.parametrize(
    ("load", "setting"),
    [
        ({"rate": 0}, "load.rate"),
        ({"profile": "sine", "rate": 5, "sine_amplitude": 6}, "load.sine_amplitude"),
        ({"profile": "steps"}, "load.steps"),
        ({"profile": "steps", "steps": [{"rate": 0, "seconds": 5}]}, "load.steps"),
        ({"profile": "bursts", "burst_seconds": 60, "burst_every": 60}, "load.burst_seconds"),
        ({"profile": "bursts", "burst_rate": 0}, "load.burst_rate"),
        ({"profile": "ramp", "rate": 0, "ramp_to": 0}, "load.ramp_to"),
        ({"profile": "wave"}, "load.profile"),
        ({"arrivals": "bursty"}, "load.arrivals"),
    ],
)
def test_a_shape_that_cannot_load_names_the_key_to_fix(load: dict[str, Any], setting: str) -> None:
    with pytest.raises(UserError) as caught:
        _load(**load)
    assert caught.value.setting == setting


def test_a_profile_reads_back_from_config_output(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        {
            "load": {
                "profile": "steps",
                "steps": [{"rate": 5, "seconds": 30}],
                "arrivals": "poisson",
            }
        },
        {},
    )
    text = to_toml(effective_view(settings))
    path = tmp_path / "round.toml"
    path.write_text(text)
    assert tomllib.loads(text)["load"]["steps"] == [{"rate": 5.0, "seconds": 30.0}]
    assert load_settings(path, {}, {}).load == settings.load


def test_after_a_long_gap_the_trigger_fires_early_and_keeps_the_arrival_time() -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    trigger = ArrivalTrigger(_even(_load(rate=1)), start)
    first = trigger.get_next_fire_time(None, start)
    second = trigger.get_next_fire_time(first, start)
    assert first is not None and second is not None
    assert first == start and trigger.planned[first] == start  # no gap before the first
    assert trigger.planned[second] == start + timedelta(seconds=1)
    assert second == start + timedelta(seconds=1 - EARLY_SECONDS)


@pytest.mark.parametrize("rate", [100, 10])  # 10/s: every run fired early, waits itself
async def test_the_scheduler_ends_with_the_profile_and_logs_no_warning(rate: int) -> None:
    # `rate` for 0.3 s, then nothing: an exact count of arrivals, whatever the machine's speed.
    arrivals = round(rate * 0.3)
    load = _load(profile="steps", steps=[{"rate": rate, "seconds": 0.3}, {"rate": 0, "seconds": 1}])
    metrics = Metrics()
    started: list[int] = []

    async def batch(sequence: int) -> None:
        started.append(sequence)

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        scheduler = LoadScheduler(
            arrivals=arrivals_of(load),
            concurrency=4,
            max_batches=0,
            duration=30.0,
            grace_period=1.0,
            metrics=metrics,
            start_batch=batch,
            blocked=lambda: None,
            stop=asyncio.Event(),
            readiness=Readiness(),
        )
        await asyncio.wait_for(scheduler.run(), timeout=20)
    finally:
        logger.remove(sink)
    assert started == list(range(arrivals))
    assert metrics.registry.get_sample_value("cdcfeed_schedule_lag_seconds_count") == arrivals
    assert metrics.registry.get_sample_value("cdcfeed_target_batches_per_second") == 0
    assert messages == []


def test_late_and_skipped_runs_become_a_warning_never_silence() -> None:
    metrics = Metrics()
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        log = SkipLog(metrics)
        log.started(0.001)  # on time: nothing to say
        log.started(0.6)  # the first trouble is logged at once
        log.skipped("busy")  # then at most one summary per interval
        log.skipped("busy")
        log.flush()
    finally:
        logger.remove(sink)
    assert len(messages) == 2, messages
    assert "1 run(s) started over 250ms late (worst 0.600s)" in messages[0]
    assert "skipped scheduled runs (busy=2): the daemon is behind its rate" in messages[1]
    skipped = metrics.registry.get_sample_value("cdcfeed_batches_skipped_total", {"reason": "busy"})
    assert skipped == 2
