"""What the speed benches share: a private server, the daemon as users run it, CPU accounting.

The server is Debian's PostgreSQL 15 started with `wal_level=logical` and otherwise default
settings, durability included (fsync, synchronous_commit, full_page_writes on). The daemon
is `python -m cdcfeed run` in a child process with its log in a file, exactly as a user runs
it; throughput is read from the ledger, rates and lag from its own /metrics.

The machine is shared and noisy, so every bench interleaves reference and cdcfeed runs in
one process and reports medians and ratios, never a lone figure.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psutil
from prometheus_client.parser import text_string_to_metric_families

from cdcfeed.config import load_settings
from cdcfeed.database import names_of
from cdcfeed.database.schema import init_schema
from cdcfeed.embedded import PostgresCluster, free_port

DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")
DATABASE = "bench"


@contextmanager
def private_server() -> Iterator[tuple[PostgresCluster, Path]]:
    """A server in a scratch directory (readable by the server user, for COPY FROM a file)."""
    if not (DEBIAN_PG15 / "postgres").exists():
        sys.exit(f"{DEBIAN_PG15} is missing: apt-get install postgresql-15")
    root = Path(tempfile.mkdtemp(prefix="cdcfeed-bench-"))
    root.chmod(0o755)
    cluster = PostgresCluster(DEBIAN_PG15, root / "pgdata")
    cluster.start()
    try:
        yield cluster, root
    finally:
        cluster.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


async def create_database(cluster: PostgresCluster) -> str:
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {DATABASE}")
    finally:
        await conn.close()
    dsn = cluster.dsn(DATABASE)
    conn = await asyncpg.connect(dsn)
    try:
        settings = load_settings(None, {"database": {"dsn": dsn}}, {})
        await init_schema(conn, names_of(settings))
    finally:
        await conn.close()
    return dsn


async def empty_tables(dsn: str) -> None:
    """Every measurement starts from empty tables and a fresh checkpoint: equal conditions."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("TRUNCATE orders, batch_control")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


class CpuMeter:
    """CPU seconds of the server (every process of the cluster, exited ones included) and of
    this process's children (the daemon, psql, pgbench), between `start` and `stop`.

    A child's CPU reaches the counters only once it has exited; `start(running=pid)` takes
    off what a child running at the start (the daemon, once ready) had used by then.
    """

    def __init__(self, cluster: PostgresCluster) -> None:
        pid_file = cluster.data_dir / "postmaster.pid"
        self._postmaster = psutil.Process(int(pid_file.read_text().split()[0]))

    def _server(self) -> float:
        own = self._postmaster.cpu_times()
        # Backends that exited were reaped by the postmaster: they are in its children_* times.
        total = float(own.user + own.system + own.children_user + own.children_system)
        for child in self._postmaster.children():
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    @staticmethod
    def _children() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def start(self, running: int | None = None) -> None:
        self._t0 = time.perf_counter()
        self._server0 = self._server()
        self._children0 = self._children()
        if running is not None:
            times = psutil.Process(running).cpu_times()
            self._children0 += float(times.user + times.system)

    def stop(self) -> tuple[float, float, float]:
        """(wall seconds, server CPU seconds, client CPU seconds) since `start`."""
        wall = time.perf_counter() - self._t0
        # Backends of closed connections exit and are reaped a moment later; one caught in
        # between would be counted in neither place.
        time.sleep(0.3)
        return wall, self._server() - self._server0, self._children() - self._children0


@dataclass
class Daemon:
    """`cdcfeed run` as a child process, its log in a file, its /metrics on a known port."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @classmethod
    def start(cls, dsn: str, workdir: Path, name: str, *args: str) -> Daemon:
        port = free_port()
        log = workdir / f"{name}.log"
        command = [
            sys.executable,
            "-m",
            "cdcfeed",
            "run",
            "--dsn",
            dsn,
            "--feed-dir",
            str(workdir / "feed"),
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--instance",
            name,
            *args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "CDCFEED_"))}
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
        return cls(process, port, log)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as page:
                return bool(page.status == 200)
        except OSError:
            return False

    def scrape(self) -> dict[str, float]:
        """Every sample of /metrics by name and labels, e.g. 'cdcfeed_batches_total{...}'."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as page:
            text = page.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    async def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited early; see {self.log}")
            if await asyncio.to_thread(self._ready):
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the daemon never became ready; see {self.log}")

    async def wait(self, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not finish in {timeout:.0f}s")
            await asyncio.sleep(0.05)
        return self.process.returncode

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def error_lines(self) -> list[str]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [line for line in lines if "| ERROR" in line or "Traceback" in line]


@dataclass(frozen=True)
class LedgerSpan:
    batches: int
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds


async def ledger_span(dsn: str) -> LedgerSpan:
    """Completed batches and rows, over the span from the first batch's id allocation (its
    start less its generate and write time) to the last commit mark: end to end."""
    conn = await asyncpg.connect(dsn)
    try:
        record = await conn.fetchrow(
            """
            SELECT count(*), coalesce(sum(row_count), 0),
                   extract(epoch FROM max(completed_at) - min(started_at
                       - make_interval(secs => generate_seconds + write_seconds)))
            FROM batch_control WHERE status = 'COMPLETED'
            """
        )
        bad = await conn.fetchval("SELECT count(*) FROM batch_control WHERE status <> 'COMPLETED'")
    finally:
        await conn.close()
    if record is None or not record[0]:
        raise RuntimeError("no batch completed")
    if bad:
        raise RuntimeError(f"{bad} batch(es) did not complete")
    return LedgerSpan(int(record[0]), int(record[1]), float(record[2]))


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], scale: float = 1.0, digits: int = 3) -> str:
    """The values of the repetitions, for the printout: medians hide nothing that way."""
    return "[" + ", ".join(f"{value * scale:.{digits}f}" for value in values) + "]"


def histogram_quantile(quantile: float, buckets: dict[float, float]) -> float:
    """Prometheus's histogram_quantile over cumulative bucket counts {upper bound: count}."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return float("nan")
    rank = quantile * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower
