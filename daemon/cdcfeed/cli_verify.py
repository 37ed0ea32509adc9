"""`cdcfeed verify`: the proof over a replication slot, or over what Debezium delivered to
Kafka, one-shot or following. Prints the report; exit 0 when everything holds, 1 on a
violation, 2 on a mistake (one line)."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any, Protocol

import click
from loguru import logger

from cdcfeed.app import resolved_database
from cdcfeed.config import Settings
from cdcfeed.database import names_of
from cdcfeed.errors import DatabaseUnavailable, UserError
from cdcfeed.memory import keep_fetch_buffers
from cdcfeed.proof.events import Violation
from cdcfeed.proof.kafka.consumer import KafkaUnavailable
from cdcfeed.proof.kafka.report import KafkaReport
from cdcfeed.proof.kafka.runner import follow_kafka, open_kafka_verifier, verify_kafka_once
from cdcfeed.proof.slot.report import Report
from cdcfeed.proof.slot.runner import open_verifier, run_passes
from cdcfeed.proof.slot.stream import StreamError
from cdcfeed.runtime import run_async, stop_on_signals


class _Report(Protocol):
    @property
    def holds(self) -> bool: ...

    def as_dict(self) -> dict[str, Any]: ...

    def as_text(self) -> str: ...


def verify_slot(settings: Settings, create_slot: bool, follow: bool, output: str) -> None:
    cdc = settings.cdc

    async def main() -> Report:
        async with resolved_database(settings, dict(os.environ)) as database:
            opener = functools.partial(
                open_verifier,
                database,
                names_of(settings),
                cdc.verify_slot,
                cdc.publication,
                create_slot=create_slot,
                on_violation=_log_violation,
            )
            verifier = await opener(patient=True)  # bounded retries, one-line errors
            if not follow:
                try:
                    await verifier.run_pass()
                    return await verifier.report()
                finally:
                    await verifier.close()
            reopen = functools.partial(opener, run=verifier.run)
            return await run_passes(verifier, reopen, cdc.poll_interval, stop_on_signals())

    def run() -> Report:
        try:
            return run_async(main)
        except StreamError as exc:
            raise UserError(
                "cdc.verify_slot", f"the slot's stream cannot be decoded: {exc}"
            ) from None

    _report(run, output)


def verify_kafka(settings: Settings, follow: bool, output: str) -> None:
    kafka = settings.kafka

    async def main() -> KafkaReport:
        async with resolved_database(settings, dict(os.environ)) as database:
            names = names_of(settings)
            if not follow:
                return await verify_kafka_once(
                    database, names, kafka, on_violation=_log_violation, stop=stop_on_signals()
                )
            opener = functools.partial(
                open_kafka_verifier, database, names, kafka, on_violation=_log_violation
            )
            verifier = await opener(patient=True)  # bounded retries, one-line errors
            reopen = functools.partial(opener, run=verifier.run)
            return await follow_kafka(
                verifier, reopen, stop_on_signals(), settings.cdc.poll_interval
            )

    def run() -> KafkaReport:
        keep_fetch_buffers()  # page faults were a third of reading's CPU (memory.py)
        try:
            return run_async(main)
        except KafkaUnavailable as exc:
            raise UserError(exc.setting, exc.message) from None

    _report(run, output)


def _report(run: Callable[[], _Report], output: str) -> None:
    """Runs the verification, prints its report, and exits 1 when a batch broke the
    invariant; a database lost on the way is one line, exit 2."""
    try:
        report = run()
    except DatabaseUnavailable as exc:
        raise UserError(
            "database.dsn",
            f"lost the database while verifying ({exc}); run verify again: "
            "it resumes where it stopped",
        ) from None
    if output == "json":
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(report.as_text())
    if not report.holds:
        raise click.exceptions.Exit(1)


def _log_violation(violation: Violation) -> None:
    logger.bind(batch_id=violation.batch_id).warning(f"violation: {violation.line()}")
