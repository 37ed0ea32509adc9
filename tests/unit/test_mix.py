"""The change mix: how a batch splits into inserts, updates and deletes, what an update
writes, and a bad `mix` or `toast_bytes` as one line naming the key (exit 2)."""

from __future__ import annotations

import pytest

from cdcfeed.lifecycle import Mix, parse_mix, updated_status
from tests.support import one_error_line, run_cli


def test_a_batch_splits_by_the_weights_rounding_half_up() -> None:
    assert parse_mix("insert=60,update=25,delete=15").split(100) == (60, 25, 15)
    assert parse_mix("insert=70,update=20,delete=10").split(5) == (3, 1, 1)
    assert parse_mix("delete=1,insert=2").split(3) == (2, 0, 1)
    assert Mix().split(100) == (100, 0, 0)
    # Whatever rounds how, the three make the batch and none is negative.
    for mix in ("insert=3,update=5,delete=7", "insert=1,update=9,delete=9"):
        for size in range(0, 50):
            split = parse_mix(mix).split(size)
            assert sum(split) == size and min(split) >= 0, (mix, size, split)


def test_only_updates_or_deletes_make_a_mix_that_changes() -> None:
    assert not parse_mix("insert=100").changes
    assert parse_mix("insert=1,delete=1").changes
    assert str(parse_mix(" insert=60, update=25 ")) == "insert=60,update=25"


def test_an_update_pays_or_cancels_by_the_order_id() -> None:
    assert [updated_status(i) for i in (9, 10, 11, 20)] == [
        "paid",
        "cancelled",
        "paid",
        "cancelled",
    ]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("insert=60,update=x", "a weight is a whole number"),
        ("insert=60,upsert=1", "'upsert=1' is not op=weight"),
        ("update=10", "insert must weigh more than 0"),
        ("insert=1,insert=2", "insert is given twice"),
    ],
)
def test_a_bad_mix_is_one_line_naming_the_key(value: str, says: str) -> None:
    line = one_error_line(run_cli("run", "--mix", value, "--dsn", "postgresql://nowhere/x"))
    assert line.startswith("cdcfeed: load.mix: "), line
    assert says in line


def test_a_note_too_small_to_toast_is_one_line_naming_the_key() -> None:
    line = one_error_line(run_cli("run", "--toast-bytes", "100", "--dsn", "postgresql://nowhere/x"))
    assert line.startswith("cdcfeed: load.toast_bytes: must be 0 (off) or at least 2048"), line
