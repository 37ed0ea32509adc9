"""`cdcfeed`'s entry point: every error cdcfeed names is one line and exit 2; a bug is not."""

from __future__ import annotations

import pytest

from cdcfeed import cli
from cdcfeed.errors import CdcfeedError, DatabaseUnavailable, FeedError, UserError


def _raises(error: BaseException) -> object:
    def command(standalone_mode: bool) -> None:
        raise error

    return command


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (UserError("load.rate", "must be above 0"), "cdcfeed: load.rate: must be above 0"),
        (DatabaseUnavailable("connection refused"), "cdcfeed: connection refused"),
        (FeedError("cannot write feed file x (disk full)"), "cdcfeed: cannot write feed file x"),
        (CdcfeedError(), "cdcfeed: CdcfeedError"),
    ],
)
def test_a_named_error_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: CdcfeedError,
    line: str,
) -> None:
    monkeypatch.setattr(cli, "commands", _raises(error))
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(line) and stderr.count("\n") == 1, stderr


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "commands", _raises(KeyError("not ours")))
    with pytest.raises(KeyError, match="not ours"):
        cli.main()
