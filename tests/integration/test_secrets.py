"""The database password never shows: not in logs (text or JSON), metrics, `cdcfeed config`
output or error messages — whether it comes in the DSN, in PGPASSWORD or from a password file.

Against a server of its own that demands scram-sha-256 passwords on TCP, so a run that works
proves the password really went through.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import (
    PostgresCluster,
    check_invariant,
    count_batches,
    daemon_args,
    free_port,
    http_get,
    run_cli,
    spawn,
    wait_for_batches,
    wait_until,
)

USER = "loader"
PASSWORD = "Xq9v-s3cr3t-Zp4w"  # distinctive: any appearance anywhere is a leak
DATABASE = "secured"


async def _refused_without_password(cluster: PostgresCluster) -> bool:
    try:
        conn = await asyncpg.connect(f"postgresql://{USER}@127.0.0.1:{cluster.port}/{DATABASE}")
    except (asyncpg.PostgresError, asyncpg.InterfaceError):
        return True
    await conn.close()
    return False


@pytest.fixture(scope="module")
async def scram_server(private_server: PostgresCluster) -> AsyncIterator[PostgresCluster]:
    cluster = private_server
    conn = await asyncpg.connect(cluster.dsn())
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
        await conn.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
    finally:
        await conn.close()
    # The superuser keeps trust for the test's own look-ups; everyone else needs a password.
    (cluster.data_dir / "pg_hba.conf").write_text(
        "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
    )
    await asyncio.to_thread(cluster._run, "pg_ctl", "-D", str(cluster.data_dir), "reload")
    await wait_until("the server asks for passwords", lambda: _refused_without_password(cluster))
    yield cluster


def dsn(cluster: PostgresCluster, password: str | None = PASSWORD) -> str:
    auth = f"{USER}:{password}" if password is not None else USER
    return f"postgresql://{auth}@127.0.0.1:{cluster.port}/{DATABASE}"


def libpq_env(cluster: PostgresCluster, **extra: str) -> dict[str, str]:
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(cluster.port),
        "PGUSER": USER,
        "PGDATABASE": DATABASE,
        **extra,
    }


async def _run_and_look(
    cluster: PostgresCluster,
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    restart: bool = False,
) -> str:
    """Runs the daemon until it loaded a few batches (through a server restart if asked);
    returns everything it said and served: stderr, /metrics, /readyz."""
    port = free_port()
    log = tmp_path / "stderr.log"
    command = daemon_args(
        None,
        tmp_path / "feed",
        *args,
        rate=10,
        batch_size=50,
        metrics_address=f"127.0.0.1:{port}",
    )
    admin = cluster.dsn(DATABASE)
    # The tests share the database: count from what earlier ones left.
    earlier = max(0, await count_batches(admin))
    process = spawn(log, *command, **env)
    served = ""
    try:
        await wait_for_batches(admin, at_least=earlier + 3, timeout=60, every=0.2)
        if restart:
            before = await count_batches(admin)
            await asyncio.to_thread(cluster.restart, "fast")
            await wait_for_batches(admin, at_least=before + 3, timeout=60, every=0.2)
        served += (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics"))[1]
        served += (await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/readyz"))[1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, 20)
        finally:
            process.kill()
            process.wait()
    said = log.read_text()
    assert code == 0, said
    await check_invariant(admin)
    return said + served


async def test_a_password_in_the_dsn_stays_hidden_through_a_restart(
    scram_server: PostgresCluster, tmp_path: Path
) -> None:
    seen = await _run_and_look(
        scram_server, tmp_path, ["--dsn", dsn(scram_server)], {}, restart=True
    )
    assert "COMPLETED" in seen and "cdcfeed_batches_total" in seen
    assert f"postgresql://{USER}:***@127.0.0.1" in seen  # the DSN is named, redacted
    assert PASSWORD not in seen


async def test_a_password_in_pgpassword_stays_hidden_in_json_logs(
    scram_server: PostgresCluster, tmp_path: Path
) -> None:
    env = libpq_env(scram_server, PGPASSWORD=PASSWORD)
    seen = await _run_and_look(scram_server, tmp_path, ["--log-format", "json"], env)
    assert '"level"' in seen and "COMPLETED" in seen
    assert PASSWORD not in seen


async def test_a_password_from_a_password_file_stays_hidden(
    scram_server: PostgresCluster, tmp_path: Path
) -> None:
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{scram_server.port}:{DATABASE}:{USER}:{PASSWORD}\n")
    passfile.chmod(0o600)
    env = libpq_env(scram_server, PGPASSFILE=str(passfile))
    seen = await _run_and_look(scram_server, tmp_path, [], env)
    assert "COMPLETED" in seen
    assert PASSWORD not in seen


def test_config_output_hides_the_password_wherever_it_comes_from(
    scram_server: PostgresCluster, tmp_path: Path
) -> None:
    in_query = f"postgresql://{USER}@127.0.0.1:{scram_server.port}/{DATABASE}?password={PASSWORD}"
    config = tmp_path / "cdcfeed.toml"
    config.write_text(f'[database]\ndsn = "{dsn(scram_server)}"\n')
    runs = [
        run_cli("config", "--dsn", dsn(scram_server)),
        run_cli("config", "--dsn", in_query),
        run_cli("config", "--config", str(config)),
        run_cli("config", CDCFEED_DATABASE__DSN=dsn(scram_server)),
        run_cli("config", DATABASE_URL=dsn(scram_server)),
        run_cli("config", **libpq_env(scram_server, PGPASSWORD=PASSWORD)),
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr
        assert "[database]" in result.stdout
        assert PASSWORD not in result.stdout + result.stderr


def test_the_kafka_password_stays_hidden(scram_server: PostgresCluster, tmp_path: Path) -> None:
    config = tmp_path / "cdcfeed.toml"
    config.write_text(
        '[kafka]\nbootstrap = "127.0.0.1:1"\nsecurity_protocol = "SASL_PLAINTEXT"\n'
        f'sasl_mechanism = "SCRAM-SHA-256"\nusername = "verifier"\npassword = "{PASSWORD}"\n'
    )
    shown = run_cli("config", "--config", str(config))
    from_env = run_cli("config", CDCFEED_KAFKA__PASSWORD=PASSWORD)
    for result in (shown, from_env):
        assert result.returncode == 0, result.stderr
        assert 'password = "***"' in result.stdout
        assert PASSWORD not in result.stdout + result.stderr
    # A run that fails to reach the brokers says so in one line, and nothing of the password.
    assert run_cli("init-db", "--dsn", dsn(scram_server)).returncode == 0
    failed = run_cli(
        "verify", "--kafka", f"127.0.0.1:{free_port()}", "--config", str(config),
        "--dsn", dsn(scram_server), "--log-format", "json",
    )  # fmt: skip
    assert failed.returncode == 2, failed.stderr
    assert "kafka.bootstrap" in failed.stderr.strip().splitlines()[-1]
    assert PASSWORD not in failed.stdout + failed.stderr


@pytest.mark.parametrize("where", ["dsn", "query", "pgpassword", "passfile"])
def test_a_wrong_password_is_one_line_without_any_password(
    scram_server: PostgresCluster, tmp_path: Path, where: str
) -> None:
    wrong = PASSWORD[::-1]
    args: list[str] = ["status"]
    env: dict[str, str] = {}
    if where == "dsn":
        args += ["--dsn", dsn(scram_server, wrong)]
    elif where == "query":
        args += ["--dsn", f"{dsn(scram_server, None)}?password={wrong}"]
    elif where == "pgpassword":
        env = libpq_env(scram_server, PGPASSWORD=wrong)
    else:
        passfile = tmp_path / "pgpass"
        passfile.write_text(f"*:*:*:{USER}:{wrong}\n")
        passfile.chmod(0o600)
        env = libpq_env(scram_server, PGPASSFILE=str(passfile))
    result = run_cli(*args, **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cdcfeed: database.dsn: the server refused the login"), last
    assert "[28P01]" in last  # invalid_password, by SQLSTATE
    assert wrong not in result.stderr + result.stdout
    assert PASSWORD not in result.stderr + result.stdout
