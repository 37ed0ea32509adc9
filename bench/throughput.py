"""Throughput: cdcfeed end to end against PostgreSQL's own COPY, on one server, in one run.

Goal (issue 5): at 10,000-row batches and the best concurrency, cdcfeed's sustained rows/s
(generation, feed file, COPY, ledger, everything) is at least 0.9x server-side
`COPY orders FROM 'file' (FORMAT csv)` of equal pre-generated files with two sessions.
For context it also runs server-side COPY with one session, `psql \\copy` of the same files
with two sessions, and `pgbench -i` (client-side generate) at a similar row count.

Every repetition runs every contender once, in rotating order, each from empty tables after a
checkpoint; the goal is judged on the median of the per-repetition ratios, which cancels
most of the noise of a shared machine. Example:

    .venv/bin/python bench/throughput.py --repeat 5

With `--mix` (and `--toast-bytes`), cdcfeed also runs that change mix at each concurrency;
its figure is changes per second (orders inserted, updated and deleted), printed next to the
insert-only one.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import asyncpg

from cdcfeed.embedded import PostgresCluster
from cdcfeed.load.generate import batch_rng, orders_csv
from harness import (
    DEBIAN_PG15,
    CpuMeter,
    Daemon,
    create_database,
    empty_tables,
    ledger_span,
    median,
    private_server,
    spread,
)

GOAL_RATIO = 0.9
REFERENCE = "server COPY FROM file, 2 sessions"
# Reference files take order ids far above the daemon's, although every run starts empty.
REFERENCE_FIRST_ID = 10**12
# The columns of the reference files: orders has more (status, updated_at, note: defaults).
COLUMNS = "(order_id, batch_id, customer_id, amount, created_at)"


@dataclass
class Contender:
    name: str
    rows_per_second: list[float] = field(default_factory=list)
    server_cpu_per_row: list[float] = field(default_factory=list)
    client_cpu_per_row: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    rows: int
    seconds: float


def write_reference_files(directory: Path, count: int, rows: int) -> list[Path]:
    """Feed files like the daemon's, made once by the same generator, for the COPYs."""
    directory.mkdir()
    directory.chmod(0o755)  # the server reads them as its own user
    files = []
    for index in range(count):
        path = directory / f"reference_{index:05d}.csv"
        first = REFERENCE_FIRST_ID + index * rows
        path.write_bytes(orders_csv(index + 1, first, rows, batch_rng(1, index)))
        path.chmod(0o644)
        files.append(path)
    return files


async def server_copy(dsn: str, files: list[Path], sessions: int) -> Outcome:
    connections = [await asyncpg.connect(dsn) for _ in range(sessions)]
    queue = list(files)

    async def session(conn: asyncpg.Connection) -> None:
        while queue:
            path = queue.pop(0)
            await conn.execute(f"COPY orders {COLUMNS} FROM '{path}' (FORMAT csv, HEADER)")

    try:
        started = time.perf_counter()
        await asyncio.gather(*(session(conn) for conn in connections))
        seconds = time.perf_counter() - started
    finally:
        for conn in connections:
            await conn.close()
    return Outcome(len(files) * _rows_in(files[0]), seconds)


def _rows_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") - 1


def psql_copy(cluster: PostgresCluster, dsn: str, files: list[Path], sessions: int) -> Outcome:
    scripts = []
    for index in range(sessions):
        script = files[0].parent.parent / f"copy_{index}.sql"
        script.write_text(
            "".join(
                f"\\copy orders {COLUMNS} FROM '{path}' (FORMAT csv, HEADER)\n"
                for path in files[index::sessions]
            )
        )
        scripts.append(script)
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                str(DEBIAN_PG15 / "psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                dsn,
                "-f",
                str(script),
            ],
            stdout=subprocess.DEVNULL,
        )
        for script in scripts
    ]
    codes = [process.wait() for process in processes]
    seconds = time.perf_counter() - started
    if any(codes):
        raise RuntimeError(f"psql failed: exit codes {codes}")
    return Outcome(len(files) * _rows_in(files[0]), seconds)


def pgbench_init(dsn: str, rows: int) -> Outcome:
    """`pgbench -i`'s client-side generate step (pgbench_accounts, 100,000 rows per scale)."""
    scale = max(1, round(rows / 100_000))
    result = subprocess.run(
        [str(DEBIAN_PG15 / "pgbench"), "-i", "-I", "dtg", "-s", str(scale), "-q", dsn],
        capture_output=True,
        text=True,
        check=True,
    )
    match = re.search(r"client-side generate ([0-9.]+) s", result.stderr + result.stdout)
    if match is None:
        raise RuntimeError(f"no generate time in pgbench's output: {result.stderr}")
    return Outcome(scale * 100_000, float(match.group(1)))


async def cdcfeed_run(
    dsn: str,
    workdir: Path,
    batches: int,
    batch_size: int,
    concurrency: int,
    rate: float,
    meter: CpuMeter,
    mix: str | None = None,
    toast_bytes: int = 0,
) -> Outcome:
    changes: tuple[str, ...] = ()
    if mix is not None:
        changes = ("--mix", mix, "--toast-bytes", str(toast_bytes))
        await restart_change_cursor(dsn)
    daemon = Daemon.start(
        dsn,
        workdir,
        f"throughput-c{concurrency}{'-mixed' if mix else ''}",
        "--rate",
        str(rate),
        "--batch-size",
        str(batch_size),
        "--concurrency",
        str(concurrency),
        "--max-batches",
        str(batches),
        *changes,
    )
    # Start-up (imports, schema, connections) is not load: measure from readiness, which is
    # also when the first batch starts (the ledger span begins with it).
    await daemon.wait_ready()
    meter.start(running=daemon.process.pid)
    code = await daemon.wait()
    if code != 0 or daemon.error_lines():
        raise RuntimeError(f"cdcfeed exited {code}; see {daemon.log}")
    span = await ledger_span(dsn)
    if mix is None:
        return Outcome(span.rows, span.seconds)
    return Outcome(await changed_orders(dsn), span.seconds)


async def restart_change_cursor(dsn: str) -> None:
    """The tables were emptied: the change cursor starts again at the next insert, so that
    the mixed run's windows hold its own orders (not those truncated before it)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE cdcfeed_order_ids SET next_change_id = next_order_id")
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        pass  # no schema yet: the daemon makes it, the cursor at the start
    finally:
        await conn.close()


async def changed_orders(dsn: str) -> int:
    """Orders inserted, updated and deleted by the completed batches."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT coalesce(sum(row_count + updated + deleted), 0) FROM batch_control "
                "WHERE status = 'COMPLETED'"
            )
        )
    finally:
        await conn.close()


async def measure(
    contender: Contender,
    cluster: PostgresCluster,
    dsn: str,
    run: Callable[[CpuMeter], Awaitable[Outcome]],
) -> float:
    await empty_tables(dsn)
    meter = CpuMeter(cluster)
    meter.start()
    outcome = await run(meter)
    _, server_cpu, client_cpu = meter.stop()
    rate = outcome.rows / outcome.seconds
    contender.rows_per_second.append(rate)
    contender.server_cpu_per_row.append(server_cpu / outcome.rows)
    contender.client_cpu_per_row.append(client_cpu / outcome.rows)
    print(f"  {contender.name:42s} {rate / 1e6:6.3f} M rows/s", flush=True)
    return rate


async def main(args: argparse.Namespace) -> int:
    batches = args.rows // args.batch_size
    with private_server() as (cluster, root):
        dsn = await create_database(cluster)
        print(f"server: PostgreSQL 15 ({DEBIAN_PG15}), wal_level=logical, default durability")
        files = write_reference_files(root / "reference", batches, args.batch_size)
        one = Contender("server COPY FROM file, 1 session")
        two = Contender(REFERENCE)
        psql = Contender("psql \\copy, 2 sessions")
        pgbench = Contender("pgbench -i (client-side generate, no key)")
        daemons = {c: Contender(f"cdcfeed, concurrency {c}") for c in args.concurrency}
        runs: list[tuple[Contender, Callable[[CpuMeter], Awaitable[Outcome]]]] = [
            (two, lambda _: server_copy(dsn, files, 2)),
            (one, lambda _: server_copy(dsn, files, 1)),
            (psql, lambda _: asyncio.to_thread(psql_copy, cluster, dsn, files, 2)),
            (pgbench, lambda _: asyncio.to_thread(pgbench_init, dsn, args.rows)),
        ]
        for concurrency, contender in daemons.items():
            daemon_run = partial(
                cdcfeed_run, dsn, root, batches, args.batch_size, concurrency, args.rate
            )
            runs.append((contender, daemon_run))
        mixed = {c: Contender(f"cdcfeed mix, concurrency {c}") for c in args.concurrency}
        for concurrency, contender in mixed.items() if args.mix else ():
            mixed_run = partial(
                cdcfeed_run,
                dsn,
                root,
                batches,
                args.batch_size,
                concurrency,
                args.rate,
                mix=args.mix,
                toast_bytes=args.toast_bytes,
            )
            runs.append((contender, mixed_run))
        for repetition in range(args.repeat):
            print(f"repetition {repetition + 1}/{args.repeat}", flush=True)
            shift = repetition % len(runs)
            for contender, run in runs[shift:] + runs[:shift]:
                await measure(contender, cluster, dsn, run)
    code = report(args, [one, two, psql, pgbench, *daemons.values()], two, psql, pgbench, daemons)
    if args.mix:
        report_mixed(args, daemons, mixed)
    return code


def report_mixed(
    args: argparse.Namespace, daemons: dict[int, Contender], mixed: dict[int, Contender]
) -> None:
    """The change mix's changes/s next to the insert-only rows/s at each concurrency."""
    print()
    toast = f", notes of {args.toast_bytes} bytes" if args.toast_bytes else ""
    print(f"change mix {args.mix}{toast} (M changes/s) next to insert-only (M rows/s):")
    for concurrency, contender in mixed.items():
        plain = median(daemons[concurrency].rows_per_second)
        changes = median(contender.rows_per_second)
        print(
            f"  concurrency {concurrency}: mixed {changes / 1e6:6.3f}  insert-only "
            f"{plain / 1e6:6.3f}  ratio {changes / plain:.3f}  "
            f"{spread(contender.rows_per_second, 1e-6)}"
        )


def report(
    args: argparse.Namespace,
    contenders: list[Contender],
    reference: Contender,
    psql: Contender,
    pgbench: Contender,
    daemons: dict[int, Contender],
) -> int:
    print()
    print(
        f"throughput, {args.batch_size:,}-row batches, {args.rows:,} rows per measurement, "
        f"{args.repeat} repetitions (median; each repetition in brackets, M rows/s)"
    )
    print(f"{'':44s} {'M rows/s':>9s}  {'server µs/row':>13s} {'client µs/row':>13s}")
    for contender in contenders:
        print(
            f"  {contender.name:42s} {median(contender.rows_per_second) / 1e6:9.3f}  "
            f"{median(contender.server_cpu_per_row) * 1e6:13.2f} "
            f"{median(contender.client_cpu_per_row) * 1e6:13.2f}  "
            f"{spread(contender.rows_per_second, 1e-6)}"
        )
    best = max(daemons, key=lambda c: median(daemons[c].rows_per_second))
    ours = daemons[best]

    def ratios(other: Contender) -> list[float]:
        return [a / b for a, b in zip(ours.rows_per_second, other.rows_per_second, strict=True)]

    to_reference = ratios(reference)
    verdict = "MET" if median(to_reference) >= GOAL_RATIO else "NOT MET"
    print()
    print(f"best cdcfeed concurrency: {best}")
    print(
        f"cdcfeed / {REFERENCE}: {median(to_reference):.3f} (per repetition "
        f"{spread(to_reference)}) — goal >= {GOAL_RATIO}: {verdict}"
    )
    print(f"cdcfeed / psql \\copy, 2 sessions: {median(ratios(psql)):.3f}  (context)")
    # The ceiling for any client-side COPY on this machine: psql only reads the finished files
    # and streams them, yet its CPU, like cdcfeed's, comes out of the server's cores.
    ceiling = [a / b for a, b in zip(psql.rows_per_second, reference.rows_per_second, strict=True)]
    print(
        f"psql \\copy / {REFERENCE}: {median(ceiling):.3f} (per repetition {spread(ceiling)})"
        "  (context: a client that only streams the finished files)"
    )
    print(f"cdcfeed / pgbench -i generate: {median(ratios(pgbench)):.3f}  (context)")
    return 0 if verdict == "MET" else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows per measurement")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument(
        "--concurrency", type=lambda text: [int(c) for c in text.split(",")], default=[2, 3, 4]
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=150.0,
        help="cdcfeed's target batches/s: above what the server can take, so it runs flat out",
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--mix",
        help="also run cdcfeed with this change mix (e.g. insert=60,update=25,delete=15)",
    )
    parser.add_argument(
        "--toast-bytes", type=int, default=0, help="with --mix: each insert's note size"
    )
    return parser.parse_args()


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(parse_args())))
