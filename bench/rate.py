"""Rate: small batches flat out, rate fidelity, and a rate above capacity, on one server.

Goals, 100 orders per batch:
- small batches: at least 600 batches/s sustained against one database, and at concurrency
  8 and 16 at least 0.8x what pgbench completes running the same ledger protocol on the same
  server, side by side (bench/pgbench_runner.py; concurrency 4 is shown for reference),
  with cdcfeed's database layer alone between them (bench/driver_floor.py: the same
  statements and COPY through the same code, nothing else; then that with feed files);
- fidelity: at 1, 50 and 300 batches/s over 60 s the achieved rate is within 1% of the
  target, schedule lag p99 at most 5 ms, no skipped run;
- above capacity: the daemon holds its capacity, counts the skipped runs, logs no error;
- overload: asked 2x, 10x and 100x its capacity, it completes at least 0.9x its capacity at
  each, and SIGTERM stops it within the grace period.

Before the daemon runs, the scheduling floor is measured in this process, on the daemon's
event loop (uvloop): how late `call_later` and APScheduler (with cdcfeed's trigger and a job
that does nothing) fire, and what APScheduler costs per run. The daemon itself is `cdcfeed
run` in a child process; rates come from its /metrics (scraped at both ends of a window) and
from the ledger's start times, lag from its `cdcfeed_schedule_lag_seconds` histogram. Example:

    .venv/bin/python bench/rate.py --repeat 3
    .venv/bin/python bench/rate.py --sections overload   # only the overload ratios
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import uvloop

from cdcfeed.config import load_settings
from cdcfeed.embedded import PostgresCluster
from cdcfeed.endpoint import Readiness
from cdcfeed.load.profiles import arrivals_of
from cdcfeed.load.scheduler import LoadScheduler
from cdcfeed.metrics import SKIP_REASONS, Metrics
from driver_floor import flat_out_floor
from harness import (
    CpuMeter,
    Daemon,
    create_database,
    empty_tables,
    histogram_quantile,
    median,
    private_server,
    spread,
)
from pgbench_runner import pgbench_batches_per_second

BATCH_SIZE = 100
CAPACITY_GOAL = 600.0
# Small batches against pgbench running the same ledger protocol (bench/pgbench_runner.py).
PGBENCH_GOAL = 0.8
FIDELITY_TOLERANCE = 0.01
LAG_P99_GOAL = 0.005
LAG = "cdcfeed_schedule_lag_seconds"


# --- the scheduling floor, in this process -------------------------------------------------


async def call_later_lateness(count: int = 2000, delay: float = 0.0017) -> list[float]:
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    for _ in range(count):
        done: asyncio.Future[float] = loop.create_future()
        due = time.perf_counter() + delay
        loop.call_later(delay, _arrived, done, due)
        lateness.append(await done)
    return lateness


def _arrived(done: asyncio.Future[float], due: float) -> None:
    done.set_result(time.perf_counter() - due)


async def apscheduler_floor(rate: float, seconds: float) -> tuple[float, float, float, float]:
    """(runs/s, CPU µs per run, lag p50, lag p99) for cdcfeed's scheduler with a no-op batch."""
    load = load_settings(None, {"load": {"rate": rate}}, {}).load
    metrics = Metrics()

    async def nothing(_sequence: int) -> None:
        return None

    scheduler = LoadScheduler(
        arrivals=arrivals_of(load),
        concurrency=1000,
        max_batches=0,
        duration=seconds,
        grace_period=1.0,
        metrics=metrics,
        start_batch=nothing,
        blocked=lambda: None,
        stop=asyncio.Event(),
        readiness=Readiness(),
    )
    cpu = time.process_time()
    await scheduler.run()
    cpu = time.process_time() - cpu
    buckets = _buckets(_registry_samples(metrics), LAG)
    runs = scheduler.started
    return (
        runs / seconds,
        cpu / runs * 1e6,
        histogram_quantile(0.5, buckets),
        histogram_quantile(0.99, buckets),
    )


def _registry_samples(metrics: Metrics) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def _buckets(samples: dict[str, float], name: str) -> dict[float, float]:
    prefix = f'{name}_bucket{{le="'
    return {
        float(key[len(prefix) : -2]): value
        for key, value in samples.items()
        if key.startswith(prefix)
    }


# --- the daemon --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """What a daemon did between two scrapes of its /metrics."""

    seconds: float
    completed: float
    skipped: dict[str, float]
    lag_buckets: dict[float, float]
    ledger_rate: float
    server_cpu: float
    client_cpu: float
    stop_seconds: float  # from SIGTERM to exit

    @property
    def rate(self) -> float:
        return self.completed / self.seconds

    @property
    def skips(self) -> float:
        return sum(self.skipped.values())

    def lag(self, quantile: float) -> float:
        return histogram_quantile(quantile, self.lag_buckets)

    def share_within(self, seconds: float) -> float:
        total = self.lag_buckets[float("inf")]
        return self.lag_buckets[seconds] / total if total else float("nan")


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


async def _ledger_rate(dsn: str, since: datetime, until: datetime) -> float:
    """Batches started in the window over the time between the first and last start: the
    mean arrival rate, free of the ±1 batch a count over a window has at each end."""
    conn = await asyncpg.connect(dsn)
    try:
        record = await conn.fetchrow(
            """
            SELECT count(*), extract(epoch FROM max(started_at) - min(started_at))
            FROM batch_control WHERE started_at >= $1 AND started_at < $2
            """,
            since,
            until,
        )
    finally:
        await conn.close()
    if record is None or record[0] < 2:
        return float("nan")
    return float((record[0] - 1) / record[1])


async def run_window(
    cluster: PostgresCluster,
    dsn: str,
    workdir: Path,
    name: str,
    rate: float,
    concurrency: int,
    seconds: float,
    warmup: float,
    batch_size: int = BATCH_SIZE,
) -> tuple[Window, Daemon]:
    await empty_tables(dsn)
    daemon = Daemon.start(
        dsn,
        workdir,
        name,
        "--rate",
        str(rate),
        "--batch-size",
        str(batch_size),
        "--concurrency",
        str(concurrency),
    )
    try:
        await daemon.wait_ready()
        await asyncio.sleep(warmup)
        meter = CpuMeter(cluster)
        before = await asyncio.to_thread(daemon.scrape)
        meter.start(running=daemon.process.pid)
        since = datetime.now(UTC)
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        after = await asyncio.to_thread(daemon.scrape)
        elapsed = time.perf_counter() - started
        until = datetime.now(UTC)
    finally:
        stopping = time.perf_counter()
        daemon.stop()
        stop_seconds = time.perf_counter() - stopping
    _, server_cpu, client_cpu = meter.stop()
    window = Window(
        seconds=elapsed,
        completed=_delta(after, before, 'cdcfeed_batches_total{status="completed"}'),
        skipped={
            reason: _delta(after, before, f'cdcfeed_batches_skipped_total{{reason="{reason}"}}')
            for reason in SKIP_REASONS
        },
        lag_buckets={
            bound: after_count - _buckets(before, LAG).get(bound, 0.0)
            for bound, after_count in _buckets(after, LAG).items()
        },
        ledger_rate=await _ledger_rate(dsn, since, until - timedelta(milliseconds=50)),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        stop_seconds=stop_seconds,
    )
    return window, daemon


async def main(args: argparse.Namespace) -> int:
    verdicts: list[bool] = []
    if "floor" in args.sections:
        await scheduling_floor()
    with private_server() as (cluster, root):
        dsn = await create_database(cluster)
        if "capacity" in args.sections:
            verdicts += await small_batches(cluster, dsn, root, args)
        if "fidelity" in args.sections:
            verdicts += await fidelity(cluster, dsn, root, args)
        if "overload" in args.sections:
            verdicts += await overload(cluster, dsn, root, args)
    return 0 if all(verdicts) else 1


async def scheduling_floor() -> None:
    print("scheduling floor (this process, no database)")
    lateness = await call_later_lateness()
    lateness.sort()
    print(
        f"  uvloop call_later(1.7 ms): late by p50 {statistics.median(lateness) * 1e3:.3f} ms, "
        f"p99 {lateness[int(len(lateness) * 0.99)] * 1e3:.3f} ms "
        "(epoll waits whole milliseconds, rounded up)"
    )
    for rate in (300.0, 600.0):
        achieved, cpu, p50, p99 = await apscheduler_floor(rate, 10.0)
        print(
            f"  APScheduler + cdcfeed trigger, no-op batch at {rate:.0f}/s: {achieved:.1f} runs/s, "
            f"{cpu:.0f} µs CPU per run ({cpu * rate / 1e4:.1f}% of a core), "
            f"lag p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms"
        )


async def small_batches(
    cluster: PostgresCluster, dsn: str, root: Path, args: argparse.Namespace
) -> list[bool]:
    """Capacity flat out, then the rates above it (args.over_capacity_rates)."""
    verdicts: list[bool] = []
    print()
    print(
        f"small batches ({BATCH_SIZE} rows), target {args.flat_out_rate:.0f}/s (above the "
        f"goal); {args.window:.0f} s windows, {args.repeat} repetitions"
    )
    capacities: dict[int, list[float]] = {c: [] for c in args.concurrency}
    references: dict[int, list[float]] = {c: [] for c in args.concurrency}
    cpu_per_batch: dict[int, list[tuple[float, float]]] = {c: [] for c in args.concurrency}
    reference_cpu: dict[int, list[tuple[float, float]]] = {c: [] for c in args.concurrency}
    # (batches/s, server CPU per batch, client CPU per batch) of bench/driver_floor.py, without
    # and with feed files.
    floors: dict[int, list[tuple[float, float, float]]] = {c: [] for c in args.concurrency}
    feed_floors: dict[int, list[tuple[float, float, float]]] = {c: [] for c in args.concurrency}
    for repetition in range(args.repeat):
        for concurrency in args.concurrency:
            # The reference first, on the same server and empty tables, then cdcfeed: side by
            # side in one run, so the machine's drift weighs on both alike.
            await empty_tables(dsn)
            meter = CpuMeter(cluster)
            meter.start()
            reference = await asyncio.to_thread(
                pgbench_batches_per_second,
                cluster.bin_dir, dsn, root, concurrency, args.window, BATCH_SIZE,
            )  # fmt: skip
            wall, server, client = meter.stop()
            references[concurrency].append(reference)
            done = reference * wall
            reference_cpu[concurrency].append((server / done, client / done))
            # cdcfeed's database layer alone (bench/driver_floor.py): the driver's share; then
            # with the feed file written as the daemon writes it: the file's share.
            for feed_dir, into in ((None, floors), (root / "floor-feed", feed_floors)):
                await empty_tables(dsn)
                meter.start()
                measured = await asyncio.to_thread(
                    flat_out_floor, dsn, concurrency, args.window, BATCH_SIZE, feed_dir
                )
                wall, server, _ = meter.stop()
                # The server's CPU over the child's whole run, warm-up included, per batch.
                done = measured.batches_per_second * wall
                into[concurrency].append(
                    (measured.batches_per_second, server / done, measured.cpu_per_batch)
                )
            floor = floors[concurrency][-1][0]
            feed_floor = feed_floors[concurrency][-1][0]
            window, daemon = await run_window(
                cluster,
                dsn,
                root,
                f"capacity-c{concurrency}",
                args.flat_out_rate,
                concurrency,
                args.window,
                warmup=3.0,
            )
            capacities[concurrency].append(window.rate)
            cpu_per_batch[concurrency].append(
                (window.server_cpu / window.completed, window.client_cpu / window.completed)
            )
            errors = daemon.error_lines()
            print(
                f"  repetition {repetition + 1} concurrency {concurrency}: pgbench "
                f"{reference:.0f} batches/s, database layer alone {floor:.0f} (ratio "
                f"{floor / reference:.2f}), with feed files {feed_floor:.0f} (ratio "
                f"{feed_floor / reference:.2f}), cdcfeed {window.rate:.0f} batches/s "
                f"(ratio {window.rate / reference:.2f}), skipped {window.skips:.0f}, "
                f"error lines {len(errors)}",
                flush=True,
            )
    for concurrency, rates in capacities.items():
        server = median([s for s, _ in cpu_per_batch[concurrency]]) * 1e3
        client = median([c for _, c in cpu_per_batch[concurrency]]) * 1e3
        ref_server = median([s for s, _ in reference_cpu[concurrency]]) * 1e3
        ref_client = median([c for _, c in reference_cpu[concurrency]]) * 1e3
        ratios = [c / r for c, r in zip(rates, references[concurrency], strict=True)]
        met = median(ratios) >= PGBENCH_GOAL
        if concurrency >= 8:
            verdicts.append(met)
        print(
            f"  concurrency {concurrency}: cdcfeed median {median(rates):.0f} batches/s "
            f"{spread(rates, 1, 0)}, pgbench {median(references[concurrency]):.0f} "
            f"{spread(references[concurrency], 1, 0)}; cdcfeed / pgbench median "
            f"{median(ratios):.2f} {spread(ratios, 1, 2)} — goal >= {PGBENCH_GOAL}: "
            f"{'MET' if met else 'NOT MET'}"
        )
        print(
            f"    CPU per batch: server {server:.2f} ms (pgbench's {ref_server:.2f} ms), "
            f"client: cdcfeed {client:.2f} ms, pgbench {ref_client:.2f} ms"
        )
        for name, runs in (
            ("cdcfeed's database layer alone", floors[concurrency]),
            ("the same with feed files", feed_floors[concurrency]),
        ):
            floor_ratios = [
                run[0] / r for run, r in zip(runs, references[concurrency], strict=True)
            ]
            print(
                f"    {name} (bench/driver_floor.py): median "
                f"{median([run[0] for run in runs]):.0f} batches/s, / pgbench "
                f"{median(floor_ratios):.2f} {spread(floor_ratios, 1, 2)}; CPU per batch: server "
                f"{median([run[1] for run in runs]) * 1e3:.2f} ms, client "
                f"{median([run[2] for run in runs]) * 1e3:.2f} ms"
            )
    best = max(capacities, key=lambda c: median(capacities[c]))
    capacity = median(capacities[best])
    met = capacity >= CAPACITY_GOAL
    verdicts.append(met)
    print(
        f"  small batches: {capacity:.0f} batches/s at concurrency {best} — goal >= "
        f"{CAPACITY_GOAL:.0f}: {'MET' if met else 'NOT MET'}"
    )

    print()
    for over in args.over_capacity_rates:
        window, daemon = await run_window(
            cluster, dsn, root, f"over-capacity-{over:g}", over, best, args.window, warmup=3.0
        )
        errors = daemon.error_lines()
        warnings = [
            line for line in daemon.log.read_text().splitlines() if "behind its rate" in line
        ]
        holds = window.rate >= 0.9 * capacity
        met = holds and window.skips > 0 and not errors and bool(warnings)
        verdicts.append(met)
        skipped = ", ".join(f"{k}={v:.0f}" for k, v in window.skipped.items() if v)
        print(
            f"above capacity: target {over:.0f}/s at concurrency {best}: {window.rate:.0f} "
            f"batches/s ({window.rate / capacity:.2f} x capacity), skipped {skipped or 0}, "
            f"error lines {len(errors)}, 'behind its rate' warnings {len(warnings)} — "
            f"{'MET' if met else 'NOT MET'}"
        )
        if warnings:
            print(f"  the last: {warnings[-1]}")
    return verdicts


async def fidelity(
    cluster: PostgresCluster, dsn: str, root: Path, args: argparse.Namespace
) -> list[bool]:
    """Achieved rate and lag at targets well below capacity."""
    verdicts: list[bool] = []
    print()
    print(
        f"rate fidelity ({BATCH_SIZE} rows, concurrency {args.fidelity_concurrency}, "
        f"{args.fidelity_window:.0f} s windows)"
    )
    for target in args.targets:
        window, daemon = await run_window(
            cluster,
            dsn,
            root,
            f"fidelity-{target:g}",
            target,
            args.fidelity_concurrency,
            args.fidelity_window,
            warmup=2.0,
        )
        deviation = window.ledger_rate / target - 1
        errors = daemon.error_lines()
        met = (
            abs(deviation) <= FIDELITY_TOLERANCE
            and window.share_within(LAG_P99_GOAL) >= 0.99
            and window.skips == 0
            and not errors
        )
        verdicts.append(met)
        print(
            f"  target {target:g}/s: achieved {window.ledger_rate:.3f}/s by start times "
            f"({deviation:+.3%}), {window.rate:.3f}/s by completions; lag p50 "
            f"{window.lag(0.5) * 1e3:.2f} ms, p99 {window.lag(0.99) * 1e3:.2f} ms, "
            f"{window.share_within(LAG_P99_GOAL):.2%} within 5 ms; skipped "
            f"{window.skips:.0f}; error lines {len(errors)} — {'MET' if met else 'NOT MET'}",
            flush=True,
        )

    return verdicts


OVERLOADS = (2.0, 10.0, 100.0)
OVERLOAD_GOAL = 0.9
MAX_RATE = 100_000.0  # the most `--rate` accepts


async def overload(
    cluster: PostgresCluster, dsn: str, root: Path, args: argparse.Namespace
) -> list[bool]:
    """Completions asked 2x, 10x and 100x capacity, over the capacity itself.

    Capacity is what the daemon completes when asked a little more than it can do (1.2x what
    a first probe completed): above capacity, the least overload there is. Every repetition
    measures it again, before and after its overload runs, so that a noisy neighbour weighs
    on both sides of the ratio alike. The CPU cdcfeed spends per completed batch shows what
    the skipped runs cost: next to nothing when it is the same at every overload.
    """
    size, concurrency, seconds = args.overload_batch_size, args.overload_concurrency, args.window
    print()
    print(
        f"overload ({size}-row batches, concurrency {concurrency}, {seconds:.0f} s windows, "
        f"{args.repeat} repetitions)"
    )
    probe = args.overload_probe_rate
    while True:
        window, _ = await run_window(
            cluster, dsn, root, "overload-probe", probe, concurrency, seconds, 3.0, size
        )
        if window.rate < 0.95 * probe or probe >= MAX_RATE / 2:
            break
        probe *= 2  # not above capacity yet
    asked_for_capacity = min(MAX_RATE, 1.2 * window.rate)
    print(f"  probe: asked {probe:.0f}/s, completed {window.rate:.0f}/s")
    ratios: dict[float, list[float]] = {factor: [] for factor in OVERLOADS}
    capacities: list[float] = []
    for repetition in range(args.repeat):
        # Capacity before and after the overload runs, their mean the reference: the machine's
        # load drifts, and bracketing puts the drift on both sides of the ratio.
        before, _ = await run_window(
            cluster, dsn, root, "capacity", asked_for_capacity, concurrency, seconds, 3.0, size
        )
        runs: list[tuple[float, float, Window, int]] = []
        for factor in OVERLOADS:
            rate = min(MAX_RATE, factor * before.rate)
            window, daemon = await run_window(
                cluster, dsn, root, f"overload-{factor:g}x", rate, concurrency, seconds, 3.0, size
            )
            runs.append((factor, rate, window, len(daemon.error_lines())))
        after, _ = await run_window(
            cluster, dsn, root, "capacity", asked_for_capacity, concurrency, seconds, 3.0, size
        )
        capacity = (before.rate + after.rate) / 2
        capacities.append(capacity)
        line = [
            f"  repetition {repetition + 1}: capacity {capacity:.0f}/s ({before.rate:.0f} before, "
            f"{after.rate:.0f} after), cdcfeed CPU "
            f"{before.client_cpu / before.completed * 1e3:.2f} ms/batch"
        ]
        for factor, rate, window, errors in runs:
            ratios[factor].append(window.rate / capacity)
            line.append(
                f"{factor:g}x ({rate:.0f}/s): "
                f"{window.rate:.0f}/s = {window.rate / capacity:.2f}, "
                f"skipped {window.skips:.0f}, cdcfeed CPU "
                f"{window.client_cpu / window.completed * 1e3:.2f} ms/batch, "
                f"stop {window.stop_seconds:.1f} s, error lines {errors}"
            )
        print("; ".join(line), flush=True)
    verdicts = []
    print(f"  capacity: median {median(capacities):.0f}/s {spread(capacities, 1, 0)}")
    for factor, values in ratios.items():
        met = median(values) >= OVERLOAD_GOAL
        verdicts.append(met)
        print(
            f"  {factor:g}x capacity: achieved / capacity median {median(values):.2f} "
            f"{spread(values, 1, 2)} — goal >= {OVERLOAD_GOAL}: {'MET' if met else 'NOT MET'}"
        )
    return verdicts


def parse_args() -> argparse.Namespace:
    def numbers(text: str) -> list[int]:
        return [int(part) for part in text.split(",")]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="small-batch repetitions")
    parser.add_argument("--window", type=float, default=20.0, help="seconds per capacity run")
    parser.add_argument("--concurrency", type=numbers, default=[4, 8, 16])
    parser.add_argument(
        "--flat-out-rate",
        type=float,
        default=3000.0,
        help="target of the small-batch runs: above the goal, not so far above that runs the "
        "scheduler skips cost much",
    )
    parser.add_argument(
        "--targets", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 50.0, 300.0]
    )
    parser.add_argument("--fidelity-window", type=float, default=60.0)
    # Headroom for the stall an autovacuum, a checkpoint or a busy neighbour makes now and then:
    # at 300/s, batches held up for 150 ms fill 45 slots.
    parser.add_argument("--fidelity-concurrency", type=int, default=64)
    parser.add_argument(
        "--over-capacity-rates",
        type=lambda t: [float(x) for x in t.split(",")],
        default=[1000.0, 2000.0],
    )
    parser.add_argument(
        "--sections",
        type=lambda t: t.split(","),
        default=["floor", "capacity", "fidelity", "overload"],
        help="which parts to run, comma-separated: floor, capacity, fidelity, overload",
    )
    parser.add_argument("--overload-batch-size", type=int, default=10)
    parser.add_argument("--overload-concurrency", type=int, default=8)
    parser.add_argument(
        "--overload-probe-rate",
        type=float,
        default=1500.0,
        help="first rate asked to find capacity; doubled until it is above capacity",
    )
    return parser.parse_args()


if __name__ == "__main__":
    # The daemon's own event loop, so that the scheduling floor is the one it runs on.
    raise SystemExit(uvloop.run(main(parse_args())))
