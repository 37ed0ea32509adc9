"""Unit checks behind the fault handling: lease settings, error classes, TLS pass-through."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import asyncpg
import pytest

from cdcfeed.config import load_settings
from cdcfeed.database import connect_kwargs, is_unavailable
from cdcfeed.errors import UserError


def test_the_lease_must_outlive_a_heartbeat() -> None:
    settings = load_settings(None, {}, {})
    assert settings.daemon.lease_duration > settings.daemon.heartbeat_interval
    with pytest.raises(UserError) as raised:
        load_settings(None, {"daemon": {"heartbeat_interval": 5.0, "lease_duration": 5.0}}, {})
    assert raised.value.setting == "daemon"
    assert "lease_duration must be longer than heartbeat_interval" in str(raised.value)


@pytest.mark.parametrize(
    ("error", "unavailable"),
    [
        (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"), True),
        (OSError(101, "Network is unreachable"), True),
        (TimeoutError(), True),
        (asyncpg.exceptions.AdminShutdownError("terminating connection"), True),
        (asyncpg.exceptions.CannotConnectNowError("the database system is starting up"), True),
        (asyncpg.exceptions.InternalClientError("cannot switch to state 12"), True),
        # A feed file gone between its write and its COPY is the file's fault, not the server's.
        (FileNotFoundError(2, "No such file or directory", "/feed/orders_batch_1.csv"), False),
        (asyncpg.exceptions.QueryCanceledError("canceling statement due to timeout"), False),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), False),
    ],
)
def test_which_errors_mean_the_database_is_unavailable(
    error: BaseException, unavailable: bool
) -> None:
    assert is_unavailable(error) is unavailable


def _certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "client.pem", directory / "client.key"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", "/CN=cdcfeed"]
    subprocess.run(
        [*command, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True
    )
    return cert, key


def test_tls_files_from_the_settings_reach_the_driver(tmp_path: Path) -> None:
    try:
        cert, key = _certificate(tmp_path)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("openssl is not installed")

    def kwargs(**database: str) -> dict[str, object]:
        settings = load_settings(None, {"database": {"dsn": "postgresql://h/db", **database}}, {})
        return connect_kwargs(settings.database, "test")

    verified = kwargs(sslmode="verify-full", sslrootcert=str(cert))["ssl"]
    assert isinstance(verified, ssl.SSLContext)
    assert verified.check_hostname and verified.verify_mode == ssl.CERT_REQUIRED

    # A client certificate without a root certificate still goes along.
    with_client_cert = kwargs(sslmode="require", sslcert=str(cert), sslkey=str(key))["ssl"]
    assert isinstance(with_client_cert, ssl.SSLContext)
    assert with_client_cert.verify_mode == ssl.CERT_NONE

    # Modes that allow plain text stay modes: a context would force TLS.
    assert kwargs(sslmode="prefer", sslrootcert=str(cert))["ssl"] == "prefer"
    assert "ssl" not in kwargs()
