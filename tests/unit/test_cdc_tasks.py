"""The daemon's CDC tasks: which start for which settings, under which names (what supervision
logs when one fails). The tasks' bodies are stand-ins: only the wiring is under test."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cdcfeed.config import Settings
from cdcfeed.database import Names
from cdcfeed.metrics import Metrics
from cdcfeed.proof import tasks


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[Any, ...]]:
    calls: dict[str, tuple[Any, ...]] = {}

    def stand_in(name: str) -> Any:
        async def body(*args: Any) -> None:
            calls[name] = args
            await asyncio.Event().wait()

        return body

    for name in ("watch_slots", "verify_continuously", "verify_kafka_continuously"):
        monkeypatch.setattr(tasks, name, stand_in(name))
    return calls


async def start(settings: dict[str, Any]) -> list[str]:
    config = Settings.model_validate(settings)
    names = Names("public", "orders", "batch_control")
    metrics = Metrics()
    running = tasks.start_cdc_tasks(
        None,  # type: ignore[arg-type]  # the stand-ins never touch it
        config.database,
        names,
        config.cdc,
        config.kafka,
        metrics,
    )
    await asyncio.sleep(0)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    return [task.get_name() for task in running]


async def test_only_the_slot_monitor_by_default(started: dict[str, tuple[Any, ...]]) -> None:
    assert await start({}) == ["slot-monitor"]
    assert set(started) == {"watch_slots"}


async def test_kafka_verification_runs_as_its_own_task_with_the_kafka_settings(
    started: dict[str, tuple[Any, ...]],
) -> None:
    names = await start(
        {
            "cdc": {"verify": True, "verify_kafka": True},
            "kafka": {"bootstrap": "kafka:9092", "group": "soak"},
        }
    )
    assert names == ["slot-monitor", "verify", "verify-kafka"]
    kafka = started["verify_kafka_continuously"][2]
    assert kafka.bootstrap == ["kafka:9092"] and kafka.group == "soak"


async def test_a_kafka_section_alone_starts_nothing(started: dict[str, tuple[Any, ...]]) -> None:
    assert await start({"kafka": {"bootstrap": "kafka:9092"}}) == ["slot-monitor"]
