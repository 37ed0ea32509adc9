"""One log line per kind of trouble per interval, with a count of the lines it stood for.

A refusal that hits every batch (a privilege revoked, say) would otherwise log a line per
batch, hundreds a second at high rates. The first of a kind is logged at once; later ones
within the interval are counted, and the next one logged after it says how many there were.
"""

from __future__ import annotations

import time
from collections.abc import Callable

THROTTLE_SECONDS = 10.0


class Throttle:
    def __init__(
        self, interval: float = THROTTLE_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def due(self, kind: str) -> int | None:
        """None to stay quiet; else how many lines of `kind` were held back since the last."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._quiet[kind] = self._quiet.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._quiet.pop(kind, 0)

    def suffix(self, held_back: int) -> str:
        """What to append to a line that stood for others too."""
        if not held_back:
            return ""
        return f" (and {held_back} more like it in the last {self.interval:g}s)"
