"""The dashboard against the real thing: Prometheus scrapes a running cdcfeed that watches a
logical slot and verifies continuously; every dashboard query must return series."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

from tests.support import (
    answers_200,
    daemon_args,
    free_port,
    prepare_slot,
    spawn,
    wait_until,
)


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
        *daemon_args(
            dsn, tmp_path / "feed", rate=10, batch_size=50, metrics_address=f"127.0.0.1:{port}"
        ),
        CDCFEED_CDC__VERIFY="true",
    )
    try:

        def ready() -> bool:
            assert daemon.poll() is None, log.read_text()
            return answers_200(f"http://127.0.0.1:{port}/readyz")

        await wait_until(
            "cdcfeed is ready",
            lambda: asyncio.to_thread(ready),
            timeout=60,
            every=0.2,
            detail=log.read_text,
        )
        base = await asyncio.to_thread(prometheus_server, [f"127.0.0.1:{port}"])
        await asyncio.to_thread(prometheus_scrapes, base, scrapes=6)
        problems = await asyncio.to_thread(dashboard_query_checker, base)
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 30)
    assert problems == [], "\n".join(problems) + "\n" + log.read_text()[-3000:]
