"""A batch's environment around a fake database, for the unit tests of the batch protocol."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cdcfeed.config import load_settings
from cdcfeed.load.batch import BatchEnvironment
from cdcfeed.load.feed import FeedDirectory
from cdcfeed.load.ids import IdReservations
from cdcfeed.metrics import Metrics


def environment(db: Any, feed_dir: Path, **changes: Any) -> BatchEnvironment:
    """Five-row batches on `db` (a fake of `Database`), feed files in `feed_dir`; `changes`
    replace any field."""
    feed = FeedDirectory(load_settings(None, {"feed": {"dir": str(feed_dir)}}, {}).feed)
    feed.prepare()
    fields: dict[str, Any] = {
        "database": db,
        "ids": IdReservations(db, rows=5, batches=1),
        "feed": feed,
        "metrics": Metrics(),
        "instance": "test",
        "batch_size": 5,
        "seed": 1,
        "stopping": asyncio.Event(),
        "on_database_down": asyncio.Event(),
        "settle_seconds": 1.0,
    }
    return BatchEnvironment(**{**fields, **changes})
