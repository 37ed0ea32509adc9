"""Looking at a running daemon and its ledger: HTTP, metrics, batch counts."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from tests.support.waiting import wait_until


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def answers_200(url: str) -> bool:
    try:
        return http_get(url, timeout=2)[0] == 200
    except OSError:
        return False


@dataclass
class Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


def parse_metrics(text: str) -> Scrape:
    result = Scrape()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return result


async def fetchval(dsn: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def execute(dsn: str, *statements: str) -> None:
    """Runs SQL as the test server's superuser, one statement after the other."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def count_batches(dsn: str, where: str = "status = 'COMPLETED'", *args: Any) -> int:
    """Batches in the ledger matching `where`; -1 while the server or the schema is not there."""
    try:
        return int(await fetchval(dsn, f"SELECT count(*) FROM batch_control WHERE {where}", *args))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return -1


async def wait_for_batches(
    dsn: str,
    *,
    at_least: int | None = None,
    more_than: int | None = None,
    where: str = "status = 'COMPLETED'",
    timeout: float = 30.0,
    every: float = 0.1,
) -> int:
    """Waits until the ledger holds at least (or more than) so many batches matching
    `where`; returns how many it held then."""
    minimum = more_than + 1 if more_than is not None else at_least
    assert minimum is not None, "at_least or more_than"
    return int(
        await wait_until(
            f"{minimum} batches with {where}",
            lambda: count_batches(dsn, where),
            lambda value: value >= minimum,
            timeout=timeout,
            every=every,
        )
    )
