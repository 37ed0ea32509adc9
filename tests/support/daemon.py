"""The daemon in this process or as a child process, and the CLI."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.observe import Scrape, count_batches, http_get, parse_metrics
from tests.support.product import Endpoint, Settings, run_daemon
from tests.support.waiting import wait_until


async def run_in_process(settings: Settings, stop: asyncio.Event | None = None) -> int:
    """The daemon in this process until it is done (max_batches, duration); its exit code."""
    return await run_daemon(settings, stop or asyncio.Event(), environ={})


@dataclass
class Daemon:
    """A daemon running in this process, its endpoint open."""

    task: asyncio.Task[int]
    stop: asyncio.Event
    endpoint: Endpoint

    async def get(self, path: str) -> tuple[int, str]:
        return await asyncio.to_thread(http_get, self.endpoint.url + path)

    async def scrape(self) -> Scrape:
        return parse_metrics((await self.get("/metrics"))[1])

    async def metric(self, name: str, **labels: str) -> float | None:
        return (await self.scrape()).get(name, **labels)

    async def ready(self) -> bool:
        return (await self.get("/readyz"))[0] == 200


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Daemon]:
    """The daemon in this process, once its endpoint is open; stopped (and its exit code
    checked) on leaving the block."""
    stop = asyncio.Event()
    endpoints: list[Endpoint] = []
    task = asyncio.create_task(
        run_daemon(settings, stop, environ={}, on_endpoint=endpoints.append), name="daemon"
    )
    try:
        await wait_until("the daemon opens its endpoint", lambda: endpoints or task.done())
        assert endpoints, f"the daemon ended before opening its endpoint: {task.result()}"
        yield Daemon(task, stop, endpoints[0])
    finally:
        stop.set()
        code = await asyncio.wait_for(task, 60)
    assert code == 0


# --- the daemon as a child process, and the CLI ------------------------------------------------


def cdcfeed_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cdcfeed", *args]


def clean_environment(**extra: str) -> dict[str, str]:
    """The environment without any database settings, so nothing leaks in from the shell."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "CDCFEED_")) and key != "DATABASE_URL"
    }
    env.update(extra)
    return env


def daemon_args(dsn: str | None, feed_dir: Path, *extra: str, **options: object) -> list[str]:
    """`run` arguments: the feed dir, any free metrics port (unless metrics_address= says),
    `options` as flags (batch_size=5 → --batch-size 5), then `extra` as they are."""
    flags: dict[str, object] = {"feed_dir": feed_dir, "metrics_address": "127.0.0.1:0"}
    if dsn is not None:
        flags["dsn"] = dsn
    flags.update(options)
    args = ["run"]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return [*args, *extra]


def spawn(log: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    """The CLI as a child process, its output in `log` (a pipe could fill and block it)."""
    with log.open("w") as handle:
        return subprocess.Popen(
            cdcfeed_command(*args),
            env=clean_environment(**env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            text=True,
        )


def run_cli(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cdcfeed_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=clean_environment(**env),
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The error of a command that failed as a user mistake: exit 2, no traceback, and one
    `cdcfeed: …` line, the last (log lines, each connection retry say, may come first)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("cdcfeed: ")]
    assert errors == lines[-1:], result.stderr
    return lines[-1]


async def killed_and_restarted(
    dsn: str,
    logs: Path,
    args: Sequence[str],
    kill_when: Callable[[], Awaitable[object]],
    *,
    after_kill: Callable[[], Awaitable[object]] | None = None,
    timeout: float = 180,
) -> str:
    """`run` (`args`) as a child, SIGKILLed once `kill_when` returns, which must leave one
    batch IN_PROGRESS (checked after `after_kill`, which undoes what held it there); then the
    same command line for one more batch, until it exits 0 having settled that batch as an
    earlier run's. Its output; the logs are `first.log` and `again.log` in `logs`."""
    first = logs / "first.log"
    process = spawn(first, *args)
    try:
        await kill_when()
        process.kill()
        process.wait(10)
    finally:
        process.kill()
        process.wait()
    if after_kill is not None:
        await after_kill()
    assert await count_batches(dsn, "status = 'IN_PROGRESS'") == 1, first.read_text()

    again = logs / "again.log"
    process = spawn(again, *args, "--max-batches", "1")
    try:
        code = await asyncio.to_thread(process.wait, timeout)
    finally:
        process.kill()
        process.wait()
    output = again.read_text()
    assert code == 0, output
    assert "left IN_PROGRESS by an earlier run" in output
    return output
