"""Waiting until a condition holds, with a deadline: never a fixed sleep."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


def at_least(minimum: float) -> Callable[[Any], bool]:
    return lambda value: value is not None and value >= minimum


def equals(expected: Any) -> Callable[[Any], bool]:
    return lambda value: bool(value == expected)


def _timed_out(what: str, timeout: float, value: Any, detail: Callable[[], str] | None) -> str:
    message = f"timed out after {timeout:g}s waiting until {what} (last: {value!r})"
    return message + ("\n" + detail() if detail is not None else "")


async def wait_until(
    what: str,
    probe: Callable[[], Any],
    holds: Callable[[Any], bool] = bool,
    *,
    timeout: float = 30.0,
    every: float = 0.1,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Calls `probe` (sync or async) until `holds(value)`, and returns that value. After
    `timeout` seconds, fails the test naming `what`, the last value and `detail()` (a log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if inspect.isawaitable(value):
            value = await value
        if holds(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, value, detail))
        await asyncio.sleep(every)


def wait_until_blocking(
    what: str,
    probe: Callable[[], Any],
    holds: Callable[[Any], bool] = bool,
    *,
    timeout: float = 30.0,
    every: float = 0.25,
) -> Any:
    """`wait_until` for code outside an event loop (fixtures that start other servers)."""
    deadline = time.monotonic() + timeout
    while not holds(value := probe()):
        if time.monotonic() >= deadline:
            raise AssertionError(_timed_out(what, timeout, value, None))
        time.sleep(every)
    return value
