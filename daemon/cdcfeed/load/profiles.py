"""Load shapes: the target rate over time, and the arrival times that follow it.

A profile is a rate r(t) in batches per second, t in seconds since the load began. Arrivals
follow its integral W(t) = ∫₀ᵗ r: the n-th arrival is the moment W passes a target, n for
evenly spaced arrivals and a running sum of unit exponentials for Poisson ones (the
time-rescaling of a Poisson process, which is what pgbench ``-R`` does at a constant rate).
Working from the integral rather than stepping by 1/r(t) keeps every shape exact: a ramp
gets the area under its line, a burst that begins between two slow arrivals is not stepped
over, and a step to rate 0 simply has no arrivals until the rate returns.

Every profile but the sine is piecewise linear, so inverting W is a bisect and, on a ramp
segment, a quadratic; the sine's integral is closed-form and inverted by a safeguarded Newton
iteration. Both cost a few microseconds per arrival.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cdcfeed.config import LoadSettings

# Arrival times are exact to a tenth of a microsecond, finer than APScheduler's datetimes.
_PRECISION = 1e-7


class Profile(Protocol):
    def rate(self, elapsed: float) -> float:
        """The target in batches per second, `elapsed` seconds into the load."""
        ...

    def arrival_time(self, work: float) -> float | None:
        """The first moment W(t) exceeds `work` (None if it never does): where the arrival
        whose target is `work` falls."""
        ...

    def work(self, elapsed: float) -> float:
        """W(elapsed): the arrivals due by then, as a real number."""
        ...


@dataclass(frozen=True, slots=True)
class Segment:
    """A stretch of `seconds` over which the rate moves linearly from `start` to `end`."""

    seconds: float
    start: float
    end: float

    @property
    def work(self) -> float:
        return self.seconds * (self.start + self.end) / 2

    def rate_at(self, offset: float) -> float:
        if self.start == self.end:
            return self.start
        return self.start + (self.end - self.start) * offset / self.seconds

    def time_for(self, work: float) -> float:
        """The offset at which the area under the segment reaches `work` (0 <= work < area)."""
        if work <= 0:
            return 0.0
        if self.start == self.end:
            return work / self.start
        slope = (self.end - self.start) / self.seconds
        # start*t + slope*t²/2 = work, in the form that does not cancel when slope is small
        root = math.sqrt(max(0.0, self.start * self.start + 2 * slope * work))
        return min(self.seconds, 2 * work / (self.start + root))


class Piecewise:
    """Segments played once (then the last rate holds) or repeated forever."""

    def __init__(self, segments: Sequence[Segment], repeat: bool) -> None:
        self._segments = list(segments)
        self._repeat = repeat
        self._starts: list[float] = []
        self._work_before: list[float] = []
        self._work_after: list[float] = []
        clock = work = 0.0
        for segment in self._segments:
            self._starts.append(clock)
            self._work_before.append(work)
            clock += segment.seconds
            work += segment.work
            self._work_after.append(work)
        self._cycle_seconds = clock
        self._cycle_work = work
        self._hold = self._segments[-1].end

    def rate(self, elapsed: float) -> float:
        if self._repeat:
            elapsed %= self._cycle_seconds
        elif elapsed >= self._cycle_seconds:
            return self._hold
        index = max(0, bisect.bisect_right(self._starts, elapsed) - 1)
        return self._segments[index].rate_at(elapsed - self._starts[index])

    def work(self, elapsed: float) -> float:
        done = 0.0  # the work of the cycles before this one
        if self._repeat:
            cycles, elapsed = divmod(elapsed, self._cycle_seconds)
            done = cycles * self._cycle_work
        elif elapsed >= self._cycle_seconds:
            return self._cycle_work + (elapsed - self._cycle_seconds) * self._hold
        index = max(0, bisect.bisect_right(self._starts, elapsed) - 1)
        offset = elapsed - self._starts[index]
        segment = self._segments[index]
        within = offset * (segment.start + segment.rate_at(offset)) / 2
        return done + self._work_before[index] + within

    def arrival_time(self, work: float) -> float | None:
        offset = 0.0
        if self._repeat:
            if self._cycle_work <= 0:
                return None
            cycles = math.floor(work / self._cycle_work)
            work -= cycles * self._cycle_work
            offset = cycles * self._cycle_seconds
        elif work >= self._cycle_work:
            if self._hold <= 0:
                return None
            return self._cycle_seconds + (work - self._cycle_work) / self._hold
        # The first segment whose area carries W past `work`: skips segments of rate 0.
        index = bisect.bisect_right(self._work_after, work)
        if index == len(self._segments):  # only float rounding at the very end of a cycle
            return offset + self._cycle_seconds
        segment = self._segments[index]
        return offset + self._starts[index] + segment.time_for(work - self._work_before[index])


class Sine:
    """base + amplitude·sin(2πt/period): starts at the base, rising; amplitude <= base."""

    def __init__(self, base: float, amplitude: float, period: float) -> None:
        self.base = base
        self.amplitude = amplitude
        self.period = period
        self._omega = 2 * math.pi / period

    def rate(self, elapsed: float) -> float:
        return max(0.0, self.base + self.amplitude * math.sin(self._omega * elapsed))

    def work(self, elapsed: float) -> float:
        swing = self.amplitude / self._omega * (1 - math.cos(self._omega * elapsed))
        return self.base * elapsed + swing

    def arrival_time(self, work: float) -> float | None:
        # W(t) - base·t lies in [0, 2·amplitude/ω], which brackets the answer; Newton steps
        # that leave the bracket (near a zero of the rate) fall back to bisection.
        high = work / self.base
        low = max(0.0, (work - 2 * self.amplitude / self._omega) / self.base)
        guess = high
        for _ in range(100):
            error = self.work(guess) - work
            if error > 0:
                high = guess
            else:
                low = guess
            slope = self.rate(guess)
            step = error / slope if slope > 0 else math.inf
            if abs(step) < _PRECISION or high - low < _PRECISION:
                break
            newton = guess - step
            guess = newton if low < newton < high else (low + high) / 2
        return guess


class Arrivals:
    """The planned arrival times of a profile, in seconds since the load began."""

    def __init__(self, profile: Profile, poisson: bool, rng: random.Random) -> None:
        self.profile = profile
        self._poisson = poisson
        self._rng = rng
        # Evenly spaced arrivals start at once; Poisson ones after a first random gap.
        self._work = rng.expovariate(1.0) if poisson else 0.0

    def next(self) -> float | None:
        """The next arrival time, or None when the profile has no more."""
        elapsed = self.profile.arrival_time(self._work)
        self._work += self._rng.expovariate(1.0) if self._poisson else 1.0
        return elapsed

    def skip_until(self, elapsed: float) -> tuple[int, float | None]:
        """Drops every arrival due before `elapsed` in one step, however many there are:
        (how many, when the last of them was due). What a daemon above its capacity does with
        the arrivals it had no room for, at the cost of one arrival, not one per arrival."""
        reached = self.profile.work(elapsed)
        if reached < self._work:
            return 0, None
        if self._poisson:
            # The arrivals after the first form a Poisson process of their own (it has no
            # memory): their count is Poisson, the last one's distance back from `reached`
            # exponential, and the next one's forward from it too.
            count = 1 + _poisson(self._rng, reached - self._work)
            last = max(self._work, reached - self._rng.expovariate(1.0))
            self._work = reached + self._rng.expovariate(1.0)
        else:
            count = math.floor(reached - self._work) + 1
            last = self._work + count - 1
            if self.profile.arrival_time(last) is None:  # W ends on it: an arrival never due
                count, last = count - 1, last - 1
            self._work += count
        return count, self.profile.arrival_time(last) if count else None


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson-distributed count: exact for small means, the normal approximation above."""
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, product, count = math.exp(-mean), rng.random(), 0
    while product > limit:
        product *= rng.random()
        count += 1
    return count


def profile_of(load: LoadSettings) -> Profile:
    """The profile the settings describe (LoadSettings has already checked them)."""
    forever = math.inf
    if load.profile == "ramp":
        return Piecewise([Segment(load.ramp_seconds, load.rate, load.ramp_to)], repeat=False)
    if load.profile == "steps":
        steps = [Segment(step.seconds, step.rate, step.rate) for step in load.steps]
        return Piecewise(steps, repeat=load.steps_repeat)
    if load.profile == "sine":
        return Sine(load.rate, load.sine_amplitude, load.sine_period)
    if load.profile == "bursts":
        quiet = load.burst_every - load.burst_seconds
        segments = [
            Segment(quiet, load.rate, load.rate),
            Segment(load.burst_seconds, load.burst_rate, load.burst_rate),
        ]
        return Piecewise(segments, repeat=True)
    return Piecewise([Segment(forever, load.rate, load.rate)], repeat=False)


def arrivals_of(load: LoadSettings) -> Arrivals:
    """Arrivals for the settings; with a seed, Poisson gaps are the same in every run."""
    rng = random.Random(load.seed)
    return Arrivals(profile_of(load), poisson=load.arrivals == "poisson", rng=rng)


def describe_load(load: LoadSettings) -> str:
    """The load shape in one line, for the start-up log."""
    arrivals = "Poisson" if load.arrivals == "poisson" else "evenly spaced"
    if load.profile == "ramp":
        shape = f"ramp {load.rate:g} -> {load.ramp_to:g} batches/s over {load.ramp_seconds:g}s"
    elif load.profile == "steps":
        steps = ", ".join(f"{step.rate:g}/s for {step.seconds:g}s" for step in load.steps)
        shape = f"steps {steps}{', repeating' if load.steps_repeat else ''}"
    elif load.profile == "sine":
        shape = (
            f"sine {load.rate:g} ± {load.sine_amplitude:g} batches/s, period {load.sine_period:g}s"
        )
    elif load.profile == "bursts":
        shape = (
            f"{load.rate:g} batches/s with bursts of {load.burst_rate:g}/s for "
            f"{load.burst_seconds:g}s every {load.burst_every:g}s"
        )
    else:
        shape = f"{load.rate:g} batches/s"
    changes = ""
    if load.change_mix.changes or load.toast_bytes:
        changes = f", mix {load.change_mix}"
        changes += f", notes of {load.toast_bytes} bytes" if load.toast_bytes else ""
    return f"{shape} ({arrivals}) x {load.batch_size} rows, concurrency {load.concurrency}{changes}"
