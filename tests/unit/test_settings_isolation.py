"""`load_settings` reads exactly the environment it is given; the CLI gives it the process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cdcfeed
from cdcfeed.config import Settings, load_settings
from cdcfeed.dsn import uses_libpq_environment
from cdcfeed.errors import UserError


def test_a_process_variable_does_not_leak_into_a_given_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CDCFEED_LOAD__RATE", "7")
    monkeypatch.setenv("CDCFEED_CDC__SLOTS", '["from_process"]')
    monkeypatch.setenv("CDCFEED_DATABASE__DSN", "postgresql://process@h/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://process-url@h/db")

    settings = load_settings(None, {}, environ={})

    assert settings == load_settings(None, {}, {})
    assert settings.load.rate == 1.0
    assert settings.cdc.slots == ()
    assert settings.database.dsn.get_secret_value() == ""


def test_settings_built_directly_read_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCFEED_LOAD__RATE", "7")
    assert Settings().load.rate == 1.0


def test_the_given_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDCFEED_LOAD__RATE", "7")
    environ = {
        "CDCFEED_LOAD__RATE": "3",
        "CDCFEED_LOAD__STEPS": '[{"rate": 2, "seconds": 5}]',
        "cdcfeed_feed__keep_files": "4",  # names match in any case, as pydantic-settings' do
    }
    settings = load_settings(None, {}, environ)
    assert settings.load.rate == 3.0
    assert [(step.rate, step.seconds) for step in settings.load.steps] == [(2.0, 5.0)]
    assert settings.feed.keep_files == 4


def test_precedence_is_defaults_file_environment_flags(tmp_path: Path) -> None:
    path = tmp_path / "cdcfeed.toml"
    path.write_text("[load]\nrate = 2.0\nbatch_size = 20\nconcurrency = 3\n")
    environ = {"CDCFEED_LOAD__BATCH_SIZE": "30", "CDCFEED_LOAD__CONCURRENCY": "4"}
    settings = load_settings(path, {"load": {"concurrency": 5}}, environ)
    assert (settings.load.rate, settings.load.batch_size, settings.load.concurrency) == (2, 30, 5)
    assert settings.load.seed is None  # a default no layer touched


def test_the_dsn_chain_reads_the_given_environment_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CDCFEED_DATABASE__DSN", "postgresql://process@h/db")
    monkeypatch.setenv("DATABASE_URL", "postgresql://process-url@h/db")
    monkeypatch.setenv("PGHOST", "process-host")
    path = tmp_path / "cdcfeed.toml"
    path.write_text('[database]\ndsn = "postgresql://file@h/db"\n')

    def dsn(environ: dict[str, str], flag: str | None = None) -> str:
        settings = load_settings(path, {"database": {"dsn": flag}}, environ)
        return settings.database.dsn.get_secret_value()

    assert dsn({}) == "postgresql://file@h/db"
    assert dsn({"DATABASE_URL": "postgresql://url@h/db"}) == "postgresql://url@h/db"
    both = {"DATABASE_URL": "postgresql://url@h/db", "CDCFEED_DATABASE__DSN": "postgresql://e@h/d"}
    assert dsn(both) == "postgresql://e@h/d"
    assert dsn(both, flag="postgresql://flag@h/db") == "postgresql://flag@h/db"

    assert not uses_libpq_environment({})
    assert uses_libpq_environment({"PGHOST": "given-host"})


def test_a_malformed_list_in_the_environment_is_one_user_error() -> None:
    with pytest.raises(UserError, match="must be JSON"):
        load_settings(None, {}, {"CDCFEED_LOAD__STEPS": "not json"})


def test_the_cli_honours_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A child process, so the CLI's logging set-up stays out of this one; it inherits
    # os.environ, which is what `cdcfeed` passes to load_settings.
    monkeypatch.delenv("CDCFEED_CONFIG", raising=False)
    monkeypatch.setenv("CDCFEED_LOAD__RATE", "7")
    monkeypatch.setenv("CDCFEED_DATABASE__DSN", "postgresql://loader:secret@db:5432/src")
    package_root = str(Path(cdcfeed.__file__).parents[1])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])
    )
    result = subprocess.run(
        [sys.executable, "-m", "cdcfeed", "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "\nrate = 7.0\n" in result.stdout
    assert 'dsn = "postgresql://loader:***@db:5432/src"' in result.stdout
