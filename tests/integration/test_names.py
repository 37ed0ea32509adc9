"""Names as operators choose them: mixed case, quotes, and the longest the validator allows.

Every identifier is quoted where it reaches the server (the publication in pgoutput's
`publication_names` too), and names cdcfeed derives from the configured ones (the batch-id
sequence, the ledger's indexes) stay within PostgreSQL's 63 bytes.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    daemon_args,
    fetchval,
    run_cli,
    run_in_process,
    settings_for,
)


def _verify(dsn: str, publication: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ("verify", "--dsn", dsn, "--slot", "names_slot", "--publication", publication)
    return run_cli(*args, "--format", "json", *extra, timeout=90)


@pytest.mark.parametrize("publication", ["MyPub", 'My"Pub, too'])
def test_a_publication_named_as_the_operator_likes(
    dsn: str, feed_dir: Path, publication: str
) -> None:
    result = run_cli("init-db", "--dsn", dsn, "--publication", publication)
    assert result.returncode == 0, result.stderr
    result = _verify(dsn, publication, "--create-slot")
    assert result.returncode == 0, result.stderr

    result = run_cli(*daemon_args(dsn, feed_dir, max_batches=2, rate=20), timeout=90)
    assert result.returncode == 0, result.stderr
    result = _verify(dsn, publication)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["holds"], report["completed"], report["publication"]) == (True, 2, publication)


def test_a_name_the_server_would_cut_is_one_line(dsn: str) -> None:
    result = run_cli("init-db", "--dsn", dsn, "--publication", "é" * 32)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "cdc.publication" in line and "64 bytes is too long" in line


async def test_a_63_character_batch_table_runs_end_to_end(dsn: str, feed_dir: Path) -> None:
    table = "b" * 63
    settings = settings_for(dsn, feed_dir, database={"batch_table": table}, max_batches=2)
    assert await run_in_process(settings) == 0
    completed = await fetchval(dsn, f"SELECT count(*) FROM \"{table}\" WHERE status = 'COMPLETED'")
    assert completed == 2
    # Its sequence and indexes: derived, deterministic, each within 63 bytes.
    derived = await fetchval(
        dsn,
        "SELECT array_agg(relname::text ORDER BY relname) FROM pg_class "
        "WHERE relname LIKE 'bbbbbbbb%' AND relname <> $1",
        table,
    )
    assert len(derived) >= 4, derived
    assert all(len(name) <= 63 and name.startswith("b" * 20) for name in derived)
    assert any(name.endswith("_batch_id_seq") for name in derived)
