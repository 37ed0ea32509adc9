"""The one retry helper: a delay policy, and the loop that waits on it.

Every loop that waits for the database or a slot goes through `retry`: connecting, the
database and slot monitors, the lease heartbeat, settling a batch whose outcome is unknown,
and the verifier's passes. A failure it may retry is logged once (by default), then quietly
until the operation succeeds or the loop gives up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from loguru import logger

from cdcfeed.errors import DatabaseUnavailable

T = TypeVar("T")

# (attempt number, the failure, the pause before the next attempt): one line, or nothing.
RetryLog = Callable[[int, BaseException, float], None]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff from `initial` to `maximum` seconds; with jitter, each delay is
    drawn from its upper half, so that many waiters never retry in step."""

    initial: float = 0.5
    maximum: float = 10.0
    jitter: bool = True

    def delay(self, attempt: int) -> float:
        """The pause after the `attempt`-th failure (counted from 1)."""
        ceiling = min(self.maximum, self.initial * 2 ** (min(max(attempt, 1), 32) - 1))
        return random.uniform(ceiling / 2, ceiling) if self.jitter else ceiling


def first_failure(message: Callable[[BaseException], str]) -> RetryLog:
    """Logs the first failure of a run of them: an outage is one line, not one per attempt."""

    def log(attempt: int, exc: BaseException, pause: float) -> None:
        if attempt == 1:
            logger.warning(message(exc))

    return log


async def pause_until(stop: asyncio.Event | None, seconds: float) -> None:
    """Sleeps `seconds`, or less when `stop` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff,
    attempts: int | None = None,
    deadline: float | None = None,
    stop: asyncio.Event | None = None,
    retry_on: tuple[type[BaseException], ...] = (DatabaseUnavailable,),
    log: RetryLog | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> T:
    """Runs `operation` until it returns, retrying the failures in `retry_on` with backoff.

    Gives up, raising the last failure, after `attempts` attempts, once the monotonic
    `deadline` has passed, or when `stop` is set; any other error propagates at once.
    `sleep` replaces the pause (a monitor that wakes early when told to, say).
    """
    report = first_failure(lambda exc: f"{what}: {exc}; retrying") if log is None else log
    attempt = 0
    while True:
        attempt += 1
        try:
            return await operation()
        except retry_on as exc:
            if attempts is not None and attempt >= attempts:
                raise
            now = time.monotonic()
            if (deadline is not None and now >= deadline) or (stop is not None and stop.is_set()):
                raise
            pause = backoff.delay(attempt)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - now))
            report(attempt, exc, pause)
        if sleep is not None:
            await sleep(pause)
        else:
            await pause_until(stop, pause)
