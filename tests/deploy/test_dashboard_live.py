"""The dashboard against the real thing: Prometheus scrapes a running cdcfeed that watches a
logical slot and verifies continuously; every dashboard query must return series."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cdcfeed.embedded import free_port
from tests.support import daemon_args, prepare_slot, spawn


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def test_every_dashboard_query_returns_series_from_a_live_cdcfeed(
    dsn: str,
    tmp_path: Path,
    prometheus_server: Callable[..., str],
    prometheus_scrapes: Callable[..., None],
    dashboard_query_checker: Callable[..., list[str]],
) -> None:
    await prepare_slot(dsn, slot="debezium")  # a consumer-less slot, as Debezium's would be
    port = free_port()
    log = tmp_path / "cdcfeed.log"
    daemon = spawn(
        log,
        *daemon_args(dsn, tmp_path, rate=10, batch_size=50),
        "--metrics-address",
        f"127.0.0.1:{port}",
        CDCFEED_CDC__VERIFY="true",
    )
    try:
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(_ready, f"http://127.0.0.1:{port}/readyz"):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.2)
        base = await asyncio.to_thread(prometheus_server, [f"127.0.0.1:{port}"])
        await asyncio.to_thread(prometheus_scrapes, base, scrapes=6)
        problems = await asyncio.to_thread(dashboard_query_checker, base)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    assert problems == [], "\n".join(problems) + "\n" + log.read_text()[-3000:]
