"""A server that keeps CDC consumers out (wal_level = replica, no replication slots): cdcfeed
loads all the same, and says so at start, in `status`, and in a gauge."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import (
    any_bin_dir,
    count_batches,
    daemon_args,
    fresh_database,
    run_cli,
    running,
    settings_for,
    wait_until,
)
from tests.support.product import LOGICAL_SETTINGS, PostgresCluster


@pytest.fixture(scope="module")
def replica_server(scratch: Path) -> Iterator[PostgresCluster]:
    settings = {**LOGICAL_SETTINGS, "wal_level": "replica", "max_replication_slots": "0"}
    cluster = PostgresCluster(any_bin_dir(), scratch / f"replica-{os.getpid()}", settings=settings)
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
async def replica_dsn(replica_server: PostgresCluster) -> AsyncIterator[str]:
    async with fresh_database(replica_server) as database:
        yield database


def test_init_db_run_and_status_warn(replica_dsn: str, feed_dir: Path) -> None:
    result = run_cli("init-db", "--dsn", replica_dsn, "--publication", "cdcfeed")
    assert result.returncode == 0, result.stderr
    assert "wal_level is replica" in result.stderr and "set wal_level = logical" in result.stderr

    result = run_cli(*daemon_args(replica_dsn, feed_dir, max_batches=2, rate=20), timeout=90)
    assert result.returncode == 0, result.stderr
    assert "server: wal_level is replica" in result.stderr
    assert "max_replication_slots = 0" in result.stderr
    assert "max_wal_senders" not in result.stderr  # 10 of them, none in use

    result = run_cli("status", "--dsn", replica_dsn)
    assert result.returncode == 0, result.stderr
    assert "server: wal_level is replica" in result.stdout
    assert "COMPLETED" in result.stdout


async def test_the_gauge_says_which_setting(replica_dsn: str, feed_dir: Path) -> None:
    async with running(settings_for(replica_dsn, feed_dir, rate=5.0)) as daemon:
        await wait_until("a batch completes", lambda: count_batches(replica_dsn), bool)
        scrape = await daemon.scrape()
        assert scrape.get("cdcfeed_server_setting_ok", setting="wal_level") == 0
        assert scrape.get("cdcfeed_server_setting_ok", setting="max_replication_slots") == 0
        assert scrape.get("cdcfeed_server_setting_ok", setting="max_wal_senders") == 1


async def test_a_logical_server_is_ok(dsn: str, feed_dir: Path) -> None:
    async with running(settings_for(dsn, feed_dir, rate=5.0)) as daemon:
        await wait_until("a batch completes", lambda: count_batches(dsn), bool)
        scrape = await daemon.scrape()
        for setting in ("wal_level", "max_replication_slots", "max_wal_senders"):
            assert scrape.get("cdcfeed_server_setting_ok", setting=setting) == 1
