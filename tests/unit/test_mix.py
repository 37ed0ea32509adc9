"""The change mix: how a batch splits into inserts, updates and deletes, what an update
writes, and a bad `mix` or `toast_bytes` as one line naming the key (exit 2)."""

from __future__ import annotations

import pytest

from cdcfeed.database import Allocation
from cdcfeed.lifecycle import Mix, parse_mix, updated_status
from cdcfeed.load.changes import Plan, plan_batch
from cdcfeed.load.generate import batch_rng
from tests.support import one_error_line, run_cli

MIX = parse_mix("insert=60,update=25,delete=15")


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


def test_which_orders_a_batch_changes_is_reproducible_under_seed() -> None:
    window = Allocation(batch_id=9, first_order_id=5_000, first_change_id=1_000, change_count=40)
    first = plan_batch(MIX, 100, window, batch_rng(7, 3))
    assert plan_batch(MIX, 100, window, batch_rng(7, 3)) == first  # the same run again
    assert plan_batch(MIX, 100, window, batch_rng(7, 4)) != first  # the run's next batch
    assert (first.inserts, len(first.updates), len(first.deletes)) == (60, 25, 15)
    changed = first.updates + first.deletes
    assert len(set(changed)) == 40 and set(changed) <= set(range(1_000, 1_040))
    assert list(first.updates) == sorted(first.updates)
    assert list(first.deletes) == sorted(first.deletes)


def test_a_short_window_is_shared_by_the_mix_and_an_empty_one_changes_nothing() -> None:
    short = Allocation(batch_id=9, first_order_id=5_000, first_change_id=1_000, change_count=8)
    plan = plan_batch(MIX, 100, short, batch_rng(7, 3))
    assert (plan.inserts, len(plan.updates), len(plan.deletes)) == (60, 5, 3)
    assert set(plan.updates + plan.deletes) == set(range(1_000, 1_008))
    empty = Allocation(batch_id=9, first_order_id=5_000, first_change_id=1_000, change_count=0)
    assert plan_batch(MIX, 100, empty, batch_rng(7, 3)) == Plan(60)
