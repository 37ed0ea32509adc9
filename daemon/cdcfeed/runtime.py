"""Running a command's coroutine: the event loop, and the signals that stop it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

from loguru import logger

T = TypeVar("T")


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    # uvloop where it exists (not on Windows): asyncpg's loop of choice, and a fifth to a quarter
    # less CPU per small batch than asyncio's own loop (bench/rate.py).
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[arg-type]


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set, on the running loop."""
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, _on_signal, stop, signum)
    return stop


def _on_signal(stop: asyncio.Event, signum: int) -> None:
    if not stop.is_set():
        logger.info(f"received {signal.Signals(signum).name}: stopping")
    stop.set()
