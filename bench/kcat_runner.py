"""kcat, the floor of reading a topic, for bench/verify_kafka.py: Debian's `kcat -C -e -q`
dumping the topic to /dev/null, with a newer librdkafka when Debian's cannot talk to tansu."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

TOPIC = "cdcfeed.public.orders"
Contender = Callable[[str, int], Awaitable[float]]


def kcat_binary() -> str:
    binary = shutil.which("kcat") or shutil.which("kafkacat")
    if binary is None:
        raise SystemExit("kcat not found: install Debian's with `apt-get install kcat`")
    return binary


# Debian bookworm's kcat links librdkafka 2.0.2, which misreads the tagged fields at the end
# of tansu's ApiVersions v3 response ("Read underflow") and never gets past the handshake.
# The same kcat binary runs with a newer librdkafka: the one bundled in the confluent-kafka
# wheel (`pip install --target DIR confluent-kafka`, then --librdkafka DIR).
_NEWER_LIBRDKAFKA = (
    "kcat's librdkafka cannot talk to tansu (Debian bookworm's 2.0.2 misreads its ApiVersions "
    "response). Give the bench a newer librdkafka: `pip install --target /tmp/ck "
    "confluent-kafka`, then --librdkafka /tmp/ck"
)


def librdkafka_dir(given: Path | None, scratch: Path) -> Path | None:
    """A directory holding librdkafka.so.1 to put on kcat's LD_LIBRARY_PATH, or None."""
    if given is None:
        return None
    found = sorted(given.glob("confluent_kafka.libs/librdkafka*.so*")) or sorted(
        given.glob("librdkafka*.so*")
    )
    if given.is_file():
        found = [given]
    if not found:
        raise SystemExit(f"no librdkafka*.so* in {given}")
    link_dir = scratch / "librdkafka"
    link_dir.mkdir(exist_ok=True)
    (link_dir / "librdkafka.so.1").symlink_to(found[0].resolve())
    return link_dir


def kcat_env(library: Path | None) -> dict[str, str] | None:
    return None if library is None else {**os.environ, "LD_LIBRARY_PATH": str(library)}


def kcat_command(bootstrap: str) -> list[str]:
    return [kcat_binary(), "-C", "-b", bootstrap, "-t", TOPIC, "-o", "beginning", "-e", "-q"]


def kcat_count(bootstrap: str, library: Path | None) -> int:
    """Records kcat sees on the topic: it must be every event, or its rate means nothing."""
    result = subprocess.run(
        [*kcat_command(bootstrap), "-f", "%o\\n", "-m", "10"],
        capture_output=True,
        timeout=600,
        check=False,
        env=kcat_env(library),
    )
    if result.returncode != 0:
        hint = _NEWER_LIBRDKAFKA if b"underflow" in result.stderr else ""
        raise SystemExit(f"kcat failed: {result.stderr.decode()[-500:]}\n{hint}")
    return result.stdout.count(b"\n")


def kcat_contender(library: Path | None) -> Contender:
    async def seconds(bootstrap: str, expected: int) -> float:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            *kcat_command(bootstrap), stdout=subprocess.DEVNULL, env=kcat_env(library)
        )
        if await process.wait() != 0:
            raise SystemExit(f"kcat exited with {process.returncode}")
        return time.perf_counter() - started

    return seconds
