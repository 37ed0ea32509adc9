"""The command line: the one place that reads the environment, configures logging, and turns
every error cdcfeed names (errors.py) into one line on stderr and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import click
from loguru import logger

from cdcfeed import __version__, logs
from cdcfeed.app import check_server, refusals_are_mistakes, resolved_database, run_daemon
from cdcfeed.cli_verify import verify_kafka, verify_slot
from cdcfeed.config import (
    DEFAULT_CONFIG_PATH,
    Settings,
    effective_view,
    load_settings,
)
from cdcfeed.database import Database, names_of, quote_ident
from cdcfeed.dsn import dsn_password
from cdcfeed.errors import CdcfeedError, ObjectMissing, UserError
from cdcfeed.memory import keep_batch_buffers
from cdcfeed.proof.kafka.state import source_name
from cdcfeed.runtime import run_async as _run_async
from cdcfeed.runtime import stop_on_signals as _stop_on_signals
from cdcfeed.status_view import json_default, status_table, with_confirmations, with_delivery
from cdcfeed.toml_text import to_toml

config_option = click.option(
    "--config",
    "-c",
    "config",
    type=click.Path(readable=False, path_type=Path),  # config.py says what is wrong, and the fix
    help=f"TOML settings file (default: $CDCFEED_CONFIG, then {DEFAULT_CONFIG_PATH} when "
    "present). Every key is documented in config/cdcfeed.toml.",
)
dsn_option = click.option(
    "--dsn",
    help="postgresql:// URI. Default: $CDCFEED_DATABASE__DSN, $DATABASE_URL, "
    "[database].dsn, libpq PG… variables, else an embedded server.",
)
log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), help="text, or JSON lines."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cdcfeed")
def commands() -> None:
    """Rate-controlled synthetic order load for PostgreSQL, with an LSN ledger that proves a
    CDC pipeline delivered every batch."""


def _config_path(option: Path | None) -> Path | None:
    if option is not None:
        return option
    if os.environ.get("CDCFEED_CONFIG"):
        return Path(os.environ["CDCFEED_CONFIG"])
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None


def _settings(
    config: Path | None, overrides: dict[str, dict[str, Any]], log_format: str | None = None
) -> Settings:
    if log_format is not None:
        overrides.setdefault("log", {})["format"] = log_format
    settings = load_settings(_config_path(config), overrides, os.environ)
    logs.configure(
        settings.log.level,
        json=settings.log.format == "json",
        secrets=(
            dsn_password(settings.database.dsn.get_secret_value()),
            os.environ.get("PGPASSWORD", ""),
            settings.kafka.password.get_secret_value(),
        ),
    )
    return settings


@commands.command()
@config_option
@dsn_option
@click.option(
    "--rate", type=float, help="Batches per second; fractions allowed (0.1 = one per 10 s)."
)
@click.option("--batch-size", type=int, help="Orders per batch.")
@click.option("--concurrency", type=int, help="Batches allowed in flight at once.")
@click.option("--max-batches", type=int, help="Stop after starting this many batches (0 = never).")
@click.option("--duration", type=float, help="Stop after this many seconds (0 = never).")
@click.option("--feed-dir", type=click.Path(path_type=Path), help="Directory for CSV feed files.")
@click.option("--metrics-address", help="host:port for /metrics, /healthz, /readyz; port 0 = any.")
@click.option("--seed", type=int, help="Seed for reproducible order values.")
@click.option(
    "--mix",
    metavar="insert=W,update=W,delete=W",
    help="Weights of inserts, updates and deletes in each batch (default insert=100).",
)
@click.option(
    "--toast-bytes",
    type=int,
    help="Size of the note text each insert writes: 0 = none, else at least 2048 (TOASTed).",
)
@log_format_option
@click.option("--instance", help="Instance name in the ledger (default: the host name).")
@click.option("--grace-period", type=float, help="Seconds in-flight batches get after SIGTERM.")
@click.option(
    "--init-schema/--no-init-schema",
    default=None,
    help="Create or upgrade the schema before loading (default: on).",
)
def run(
    config: Path | None,
    dsn: str | None,
    rate: float | None,
    batch_size: int | None,
    concurrency: int | None,
    max_batches: int | None,
    duration: float | None,
    feed_dir: Path | None,
    metrics_address: str | None,
    seed: int | None,
    mix: str | None,
    toast_bytes: int | None,
    log_format: str | None,
    instance: str | None,
    grace_period: float | None,
    init_schema: bool | None,
) -> None:
    """Run the daemon: load batches at the configured rate until stopped."""
    settings = _settings(
        config,
        {
            "database": {"dsn": dsn, "init_schema": init_schema},
            "load": {
                "rate": rate,
                "batch_size": batch_size,
                "concurrency": concurrency,
                "max_batches": max_batches,
                "duration": duration,
                "seed": seed,
                "mix": mix,
                "toast_bytes": toast_bytes,
            },
            "feed": {"dir": feed_dir},
            "metrics": {"address": metrics_address},
            "daemon": {"instance": instance, "grace_period": grace_period},
        },
        log_format,
    )

    async def main() -> int:
        return await run_daemon(settings, _stop_on_signals(), dict(os.environ))

    # A long run's heap would otherwise fragment and grow, and each large batch fault its
    # buffers in again (memory.py).
    keep_batch_buffers()
    code = _run_async(main)
    if code:
        raise click.exceptions.Exit(code)


@commands.command("init-db")
@config_option
@dsn_option
@click.option(
    "--publication",
    help="Also create this publication over orders and the ledger, for Debezium or "
    "`cdcfeed verify` (create it before their slots; idempotent).",
)
@click.option(
    "--grant",
    "grant_to",
    metavar="ROLE",
    help="Also grant ROLE what `cdcfeed run` needs, a change mix included (docs/operations.md "
    "lists it); run as the schema's owner.",
)
@click.option(
    "--replica-identity",
    type=click.Choice(["default", "full"]),
    help="Also set orders' REPLICA IDENTITY: what the change stream carries of an updated or "
    "deleted order's old row (default: the key; full: the whole row). Absent: left as is.",
)
def init_db(
    config: Path | None,
    dsn: str | None,
    publication: str | None,
    grant_to: str | None,
    replica_identity: Literal["default", "full"] | None,
) -> None:
    """Create or upgrade the schema (idempotent; safe from several instances at once)."""
    settings = _settings(config, {"database": {"dsn": dsn}, "cdc": {"publication": publication}})

    async def main() -> None:
        names = names_of(settings)
        granted: list[str] = []
        left: str | None = None
        async with (
            resolved_database(settings, dict(os.environ)) as database,
            Database.open(database, names, 1, "cdcfeed init-db") as db,
        ):
            with refusals_are_mistakes():
                await db.init_schema()
                if publication:
                    await db.ensure_publication(settings.cdc.publication)
                if grant_to:
                    granted, left = await _grant(db, grant_to)
                if replica_identity:
                    await db.set_replica_identity(replica_identity)
            if publication:
                await check_server(db)  # a publication nobody can decode is worth a warning
        logger.info(f"schema ready: {names.schema}.{names.orders}, {names.schema}.{names.batches}")
        if publication:
            logger.info(f"publication {settings.cdc.publication} covers both tables")
        if grant_to:
            logger.info(f"granted {grant_to}: {'; '.join(granted)}")
            if left:
                logger.warning(left)
        if replica_identity:
            logger.info(f"{names.schema}.{names.orders}: replica identity {replica_identity}")

    _run_async(main)


async def _grant(db: Database, role: str) -> tuple[list[str], str | None]:
    try:
        return await db.grant(role)
    except ObjectMissing:
        raise UserError(
            "--grant",
            f"role {role} does not exist; create it first "
            f"(CREATE ROLE {quote_ident(role)} LOGIN PASSWORD '…')",
        ) from None


@commands.command()
@config_option
@dsn_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many recent batches.",
)
@click.option(
    "--format", "output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
def status(config: Path | None, dsn: str | None, limit: int, output: str) -> None:
    """Show recent batches from the ledger: status, rows, LSNs, durations, and which watched
    replication slots ([cdc] slots; empty = all logical slots) have confirmed each."""
    settings = _settings(config, {"database": {"dsn": dsn}})

    # The Kafka verifier's verdicts are shown once Kafka is configured: its group names them.
    kafka_source = source_name(settings.kafka.group) if settings.kafka.bootstrap else None

    async def main() -> tuple[list[dict[str, Any]], list[str]]:
        async with (
            resolved_database(settings, dict(os.environ)) as database,
            Database.open(database, names_of(settings), 1, "cdcfeed status") as db,
        ):
            with refusals_are_mistakes():
                await db.prepare("status", create=False)
            batches = await db.recent_batches(limit)
            slots = await db.slot_confirmations(settings.cdc.slots)
            ids = [batch["batch_id"] for batch in batches]
            verdicts = await db.verdicts(kafka_source, ids) if kafka_source else None
            problems = (await db.server_settings()).problems()
        return with_delivery(with_confirmations(batches, slots), verdicts), list(problems.values())

    batches, problems = _run_async(main)
    if output == "json":
        click.echo(json.dumps(batches, default=json_default, indent=2))
        for problem in problems:  # stdout stays the JSON document
            click.echo(f"server: {problem}", err=True)
        return
    click.echo(status_table(batches))
    for problem in problems:
        click.echo(f"server: {problem}")


@commands.command()
@config_option
@dsn_option
@click.option(
    "--slot",
    help="Logical replication slot (pgoutput) to read; default [cdc] verify_slot. Give verify "
    "a slot of its own: reading consumes it.",
)
@click.option(
    "--create-slot",
    is_flag=True,
    help="Create the slot when it does not exist; a new slot proves batches from now on.",
)
@click.option("--publication", help="Publication to decode with; default [cdc] publication.")
@click.option(
    "--kafka",
    metavar="BOOTSTRAP[,…]",
    help="Verify what Debezium delivered to these Kafka brokers instead of a slot ([kafka] "
    "settings apply: TLS, SASL, ...).",
)
@click.option("--topic-prefix", help="With --kafka: Debezium's topic.prefix; default [kafka].")
@click.option("--group", help="With --kafka: the consumer group keeping its offsets.")
@click.option(
    "--due-after",
    type=click.FloatRange(min=0),
    help="With --kafka: seconds after a batch completed when it is judged even if the "
    "pipeline has not delivered changes past it; default [kafka] due_after.",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep verifying every [cdc] poll_interval until SIGINT/SIGTERM, then report.",
)
@click.option(
    "--format", "output", type=click.Choice(["text", "json"]), default="text", show_default=True
)
@log_format_option
def verify(
    config: Path | None,
    dsn: str | None,
    slot: str | None,
    create_slot: bool,
    publication: str | None,
    kafka: str | None,
    topic_prefix: str | None,
    group: str | None,
    due_after: float | None,
    follow: bool,
    output: str,
    log_format: str | None,
) -> None:
    """Prove from a replication slot that every settled batch reached the change stream whole.

    Reads the slot with pgoutput (as Debezium does) and checks each batch the ledger settled:
    exactly its rows and order ids, in one transaction with the ledger's xid, committed inside
    (start_lsn, end_lsn]; with a change mix, exactly the updates and deletes its ledger row
    names, in that transaction; no rows for FAILED batches or batches the ledger lacks; no
    other UPDATE, DELETE or TRUNCATE of orders. Progress is kept in the database, so runs
    continue where the last one stopped. Exit 0 when everything holds, 1 on any violation,
    2 on a mistake.

    With --kafka, the same proof over what Debezium delivered to Kafka (orders, ledger and
    transaction topics), with redelivered duplicates counted and batches the pipeline has
    not yet passed reported as pending.
    """
    settings = _settings(
        config,
        {
            "database": {"dsn": dsn},
            "cdc": {"verify_slot": slot, "publication": publication},
            "kafka": {
                "bootstrap": kafka,
                "topic_prefix": topic_prefix,
                "group": group,
                "due_after": due_after,
            },
        },
        log_format,
    )
    if kafka is not None:
        verify_kafka(settings, follow, output)
    else:
        verify_slot(settings, create_slot, follow, output)


@commands.command("config")
@config_option
@dsn_option
@log_format_option
def show_config(config: Path | None, dsn: str | None, log_format: str | None) -> None:
    """Validate the configuration and print the effective settings, secrets redacted."""
    settings = _settings(config, {"database": {"dsn": dsn}}, log_format)
    click.echo(to_toml(effective_view(settings)))


def main() -> None:
    """Entry point: every `CdcfeedError` becomes one line on stderr and exit 2 (a UserError
    reads `cdcfeed: <setting>: <what to do>`); any other exception is a bug and keeps its
    traceback."""
    try:
        code = commands(standalone_mode=False)
    except CdcfeedError as exc:
        print(f"cdcfeed: {str(exc) or type(exc).__name__}", file=sys.stderr)
        sys.exit(2)
    except click.UsageError as exc:
        print(f"cdcfeed: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except click.ClickException as exc:
        print(f"cdcfeed: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
