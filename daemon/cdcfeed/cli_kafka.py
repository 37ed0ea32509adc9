"""`cdcfeed verify --kafka`: the proof over what Debezium delivered to Kafka, one-shot or
following; exit 0 when it holds, 1 on a violation, 2 on a mistake (one line)."""

from __future__ import annotations

import functools
import json
import os

import click
from loguru import logger

from cdcfeed.app import resolved_database
from cdcfeed.config import Settings
from cdcfeed.database import names_of
from cdcfeed.errors import DatabaseUnavailable, UserError
from cdcfeed.proof.events import Violation
from cdcfeed.proof.kafka.consumer import KafkaUnavailable
from cdcfeed.proof.kafka.report import KafkaReport
from cdcfeed.proof.kafka.runner import follow_kafka, open_kafka_verifier, verify_kafka_once
from cdcfeed.runtime import run_async, stop_on_signals


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

    try:
        report = run_async(main)
    except KafkaUnavailable as exc:
        raise UserError(exc.setting, exc.message) from None
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
