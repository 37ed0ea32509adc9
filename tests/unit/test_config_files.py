"""A settings file cdcfeed cannot use is one line naming ``--config``, the file and the fix,
exit 2, never a traceback; an empty file means every default. Through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Root reads any file whatever its mode; without these two capabilities it obeys the mode
# bits like anyone else, which makes "permission denied" real for a test run as root.
_WITHOUT_DAC = ["--inh-caps=-dac_override,-dac_read_search"]
_WITHOUT_DAC += ["--bounding-set=-dac_override,-dac_read_search"]


def _cdcfeed(
    *args: str, as_unprivileged: bool = False, **extra: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cdcfeed", *args]
    if as_unprivileged and os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv (util-linux) to drop the capability")
        command = [setpriv, *_WITHOUT_DAC, *command]
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "CDCFEED_")) and key != "DATABASE_URL"
    }
    environ.update(extra)
    return subprocess.run(
        command, capture_output=True, text=True, timeout=60, env=environ, check=False
    )


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cdcfeed: --config: "), lines[0]
    return lines[0]


def test_a_file_that_is_not_utf8_names_the_byte_and_the_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("[load]\nrate = 2\n# réglages\n".encode("latin-1"))
    line = _one_line(_cdcfeed("config", "--config", str(config)))
    assert str(config) in line
    assert "not UTF-8" in line and "0xe9 on line 3" in line and line.endswith("save it as UTF-8")


def test_a_directory_points_at_the_file_inside_it(tmp_path: Path) -> None:
    line = _one_line(_cdcfeed("config", "--config", str(tmp_path)))
    assert f"{tmp_path} is a directory" in line
    assert f"--config {tmp_path / 'cdcfeed.toml'}" in line


def test_a_directory_from_the_environment_is_the_same_line(tmp_path: Path) -> None:
    line = _one_line(_cdcfeed("config", CDCFEED_CONFIG=str(tmp_path)))
    assert f"{tmp_path} is a directory" in line


def test_an_unreadable_file_names_the_user_and_the_fix(tmp_path: Path) -> None:
    config = tmp_path / "secret.toml"
    config.write_text("[load]\nrate = 2\n")
    config.chmod(0)
    line = _one_line(_cdcfeed("config", "--config", str(config), as_unprivileged=True))
    assert f"{config} cannot be read by user " in line
    assert "permission denied" in line and line.endswith("give that user read access")


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    line = _one_line(_cdcfeed("config", "--config", str(tmp_path / "nope.toml")))
    assert "does not exist" in line


def test_a_device_that_never_ends_is_refused_not_read_into_memory() -> None:
    line = _one_line(_cdcfeed("config", "--config", "/dev/zero"))
    assert "/dev/zero is over 16 MiB" in line


@pytest.mark.parametrize("text", ["", "\n\n", "# every setting at its default\n", "\ufeff"])
def test_an_empty_file_means_every_default(tmp_path: Path, text: str) -> None:
    config = tmp_path / "empty.toml"
    config.write_text(text, encoding="utf-8")
    result = _cdcfeed("config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    defaults = _cdcfeed("config")
    assert defaults.returncode == 0, defaults.stderr
    assert result.stdout == defaults.stdout
    assert "[load]\nrate = 1.0\n" in result.stdout


def test_a_byte_order_mark_is_skipped(tmp_path: Path) -> None:
    config = tmp_path / "bom.toml"
    config.write_text("\ufeff[load]\nrate = 7\n", encoding="utf-8")
    result = _cdcfeed("config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "rate = 7" in result.stdout
