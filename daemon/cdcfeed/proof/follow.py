"""Following a change stream: a verifier's step, again and again, until stopped.

Both verifiers (slot and Kafka) ride out outages the same way: a step that fails with a
condition worth waiting out closes the verifier; the one retry helper waits with backoff and
reopens it; the state it keeps in the database makes the reopened verifier resume where the
last step stored. When stopped, the last report.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from loguru import logger

from cdcfeed.retry import Backoff, pause_until, retry

R = TypeVar("R", covariant=True)


class Followed(Protocol[R]):
    async def close(self) -> None: ...

    async def report(self) -> R: ...


V = TypeVar("V", bound=Followed[object])


async def follow(
    verifier: V | None,
    reopen: Callable[[], Awaitable[V]],
    step: Callable[[V], Awaitable[None]],
    *,
    what: str,
    interval: float,
    stop: asyncio.Event | None,
    retry_on: tuple[type[BaseException], ...],
    pause_between: bool = True,
    again: Callable[[V], str] | None = None,
) -> object:
    """Runs `step` every `interval` seconds until `stop` is set (forever without one), then
    returns the verifier's report. `pause_between`: wait `interval` between steps (a step that
    waits for new data itself does not need it). `again`: what to log when reading resumes."""
    backoff = Backoff(initial=interval, maximum=max(interval, 10.0))
    current = verifier
    paused = False

    def log(attempt: int, exc: BaseException, pause: float) -> None:
        nonlocal paused
        if not paused:
            logger.warning(f"{what} paused: {getattr(exc, 'message', None) or exc}; retrying")
        paused = True

    async def one_step() -> None:
        nonlocal current, paused
        try:
            if current is None:
                current = await reopen()
                if paused:
                    logger.info(f"{what}: {again(current) if again else 'reading again'}")
                paused = False
            await step(current)
        except retry_on:
            if current is not None:
                await current.close()
                current = None
            raise

    try:
        while stop is None or not stop.is_set():
            try:
                await retry(
                    one_step, what=what, backoff=backoff, stop=stop, retry_on=retry_on, log=log
                )
            except retry_on:
                break  # stopped while waiting for what was away
            if pause_between:
                await pause_until(stop, interval)
        if current is None:
            current = await reopen()
        return await current.report()
    finally:
        if current is not None:
            await current.close()
