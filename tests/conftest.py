"""Real PostgreSQL servers for the suite: Debian's PostgreSQL 15 and the embedded wheel's 18.

Each server starts once per session, as an unprivileged user, on a free loopback port with
wal_level=logical (and default durability: logical decoding only sees flushed WAL). Each test
gets a database of its own.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support import (
    PostgresCluster,
    any_bin_dir,
    execute,
    fresh_database,
    pg15_bin_dir,
    wheel_bin_dir,
)

SERVERS = ("pg15", "pg18")


def _bin_dir(name: str) -> Path | None:
    return wheel_bin_dir() if name == "pg18" else pg15_bin_dir()


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    # Under /tmp, not the work tree: the server user must be able to traverse the path.
    root = Path(tempfile.mkdtemp(prefix="cdcfeed-tests-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def clusters(scratch: Path) -> Iterator[dict[str, PostgresCluster]]:
    started: dict[str, PostgresCluster] = {}
    yield started
    for cluster in started.values():
        cluster.stop("immediate")


def _cluster(name: str, clusters: dict[str, PostgresCluster], scratch: Path) -> PostgresCluster:
    if name not in clusters:
        bin_dir = _bin_dir(name)
        if bin_dir is None:
            if os.environ.get("CI"):
                pytest.fail(f"{name} binaries missing; .ci/run installs postgresql-15")
            pytest.skip(f"{name} binaries not installed")
        cluster = PostgresCluster(bin_dir, scratch / name)
        cluster.start()
        clusters[name] = cluster
    return clusters[name]


@pytest.fixture
def server(
    request: pytest.FixtureRequest, clusters: dict[str, PostgresCluster], scratch: Path
) -> PostgresCluster:
    """The server of a test: PostgreSQL 15 unless parametrized (indirect) with 'pg18'."""
    name = getattr(request, "param", "pg15")
    cluster = _cluster(name, clusters, scratch)
    if cluster.running_port() is None:  # a fault test stopped it
        cluster.start()
    return cluster


@pytest.fixture
async def dsn(server: PostgresCluster) -> AsyncIterator[str]:
    """A fresh, empty database on the test's server."""
    async with fresh_database(server) as database:
        yield database


@pytest.fixture(scope="module")
async def module_dsn(clusters: dict[str, PostgresCluster], scratch: Path) -> AsyncIterator[str]:
    """A fresh, empty database on PostgreSQL 15 shared by the test module's tests (for
    fixtures that load once and serve several tests)."""
    cluster = _cluster("pg15", clusters, scratch)
    async with fresh_database(cluster) as database:
        yield database


_roles = itertools.count(1)


@pytest.fixture
async def loader(dsn: str) -> AsyncIterator[str]:
    """A login role with no privileges on the test database's schema (roles are the server's:
    its name is unique to this test, and it is dropped after it)."""
    role = f"loader_{os.getpid()}_{next(_roles)}"
    await execute(dsn, f"CREATE ROLE {role} LOGIN")
    yield role
    await execute(dsn, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


@pytest.fixture
def feed_dir(tmp_path: Path) -> Path:
    return tmp_path / "feed"


@pytest.fixture(scope="module")
def private_server(request: pytest.FixtureRequest, scratch: Path) -> Iterator[PostgresCluster]:
    """A server of the test module's own, free to be restarted, stopped, crashed or
    reconfigured without the rest of the suite seeing it."""
    module = request.module.__name__.rsplit(".", 1)[-1]
    cluster = PostgresCluster(any_bin_dir(), scratch / f"{module}-{os.getpid()}")
    cluster.start()
    yield cluster
    cluster.destroy()


@pytest.fixture
async def private_dsn(private_server: PostgresCluster) -> AsyncIterator[str]:
    """A fresh, empty database on the module's private server."""
    async with fresh_database(private_server) as database:
        yield database
