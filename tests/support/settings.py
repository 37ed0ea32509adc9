"""One settings builder for every test, and the table names they give."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg

from tests.support.product import Names, Settings, init_schema, load_settings, names_of

SECTIONS = ("database", "load", "feed", "metrics", "daemon", "cdc")
# Small, quick batches; any free metrics port; connection attempts few enough to fail fast.
QUICK: dict[str, dict[str, Any]] = {
    "database": {"connect_attempts": 2},
    "load": {"rate": 50.0, "batch_size": 100, "concurrency": 2},
    "metrics": {"address": "127.0.0.1:0"},
    "daemon": {"grace_period": 5.0},
}
# For fault tests, over QUICK: short connect timeouts and leases, so faults show quickly.
FAULTS: dict[str, dict[str, Any]] = {
    "database": {"connect_timeout": 3.0},
    "load": {"rate": 20.0, "batch_size": 500, "concurrency": 3},
    "feed": {"keep_files": 20},
    "daemon": {"heartbeat_interval": 0.5, "lease_duration": 1.5},
}


def settings_for(
    dsn: str, feed_dir: Path, *presets: Mapping[str, Mapping[str, Any]], **values: Any
) -> Settings:
    """Settings for a test, isolated from the process environment: QUICK, then each preset
    (FAULTS, say), then `values`. A value named after a section is a dict merged into it
    (daemon={"instance": "a"}); any other is a load key (batch_size=5)."""
    overrides: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    overrides["database"]["dsn"] = dsn
    overrides["feed"]["dir"] = feed_dir
    for preset in (QUICK, *presets):
        for section, keys in preset.items():
            overrides[section].update(keys)
    for name, value in values.items():
        if name in SECTIONS:
            overrides[name].update(value)
        else:
            overrides["load"][name] = value
    return load_settings(None, overrides, environ={})


def as_role(dsn: str, role: str) -> str:
    """The test database's DSN for `role` (the test server trusts loopback)."""
    return dsn.replace("postgresql://postgres@", f"postgresql://{role}@", 1)


def names_for(dsn: str) -> Names:
    """The table names of the default settings."""
    return names_of(settings_for(dsn, Path("/nonexistent")))


async def create_schema(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await init_schema(conn, names_for(dsn))
    finally:
        await conn.close()
