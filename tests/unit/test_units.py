"""Pure pieces: generation, redaction, addresses, retention, TOML output."""

from __future__ import annotations

import asyncio
import csv
import io
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdcfeed.cli import to_toml
from cdcfeed.config import (
    FeedSettings,
    effective_view,
    load_settings,
    split_address,
)
from cdcfeed.dsn import dsn_password, redact_dsn
from cdcfeed.errors import UserError
from cdcfeed.load.feed import FeedDirectory
from cdcfeed.load.generate import HEADER, batch_rng, orders_csv


def _parse(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode())))


def test_orders_follow_the_design_notes_distributions() -> None:
    rows = _parse(orders_csv(7, 1000, 200_000, batch_rng(1, 0)))
    assert len(rows) == 200_000
    assert [int(r["order_id"]) for r in rows[:3]] == [1000, 1001, 1002]
    assert {r["batch_id"] for r in rows} == {"7"}
    customers = [int(r["customer_id"]) for r in rows]
    cents = [round(float(r["amount"]) * 100) for r in rows]
    assert min(customers) == 1 and max(customers) == 1000
    assert min(cents) >= 1000 and max(cents) <= 100_000
    assert all(len(r["amount"].split(".")[1]) == 2 for r in rows[:1000])
    # Uniform: mean and a chi-square over ten equal bins, far inside what chance allows.
    assert abs(sum(customers) / len(customers) - 500.5) < 3
    assert abs(sum(cents) / len(cents) - 50_500) < 300
    bins = [0] * 10
    for customer in customers:
        bins[(customer - 1) // 100] += 1
    expected = len(customers) / 10
    chi_square = sum((observed - expected) ** 2 / expected for observed in bins)
    assert chi_square < 27.9  # p = 0.001 for 9 degrees of freedom


def test_a_seed_makes_each_batch_reproducible() -> None:
    stamp = datetime(2026, 1, 1, tzinfo=UTC)
    first = orders_csv(1, 1, 500, batch_rng(42, 3), stamp)
    again = orders_csv(1, 1, 500, batch_rng(42, 3), stamp)
    other = orders_csv(1, 1, 500, batch_rng(42, 4), stamp)
    assert first == again
    assert first != other
    assert first.startswith(HEADER)


def _plain_orders_csv(
    batch_id: int, first_order_id: int, count: int, seed: int, created_at: datetime
) -> bytes:
    """The obvious formatter, row by row: the oracle for the vectorised fast path."""
    rng = batch_rng(seed, 0)
    customers = rng.integers(1, 1001, count).tolist()
    cents = rng.integers(1000, 100_001, count).tolist()
    stamp = created_at.isoformat(sep=" ")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["order_id", "batch_id", "customer_id", "amount", "created_at"])
    for offset, (customer, amount) in enumerate(zip(customers, cents, strict=True)):
        writer.writerow([first_order_id + offset, batch_id, customer, f"{amount / 100:.2f}", stamp])
    return out.getvalue().encode()


@pytest.mark.parametrize(
    ("first_order_id", "count"),
    [
        (1, 1),
        (1, 0),
        (9_998, 5),  # ids grow a digit mid-batch
        (99_999_990, 20),  # and a four-digit group
        (123_456_789, 20_000),  # more rows than one rendering block
        (9_223_372_036_854_000_000, 3_000),  # near the bigint limit
    ],
)
def test_the_fast_renderer_writes_what_a_plain_csv_writer_writes(
    first_order_id: int, count: int
) -> None:
    stamp = datetime(2026, 1, 1, 12, 30, 1, 250_000, tzinfo=UTC)
    fast = orders_csv(12_345, first_order_id, count, batch_rng(5, 0), stamp)
    assert fast == _plain_orders_csv(12_345, first_order_id, count, 5, stamp)


def test_passwords_are_redacted_everywhere_they_hide() -> None:
    assert redact_dsn("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_dsn("postgresql://u@h/db?password=pw&sslmode=require") == (
        "postgresql://u@h/db?password=***&sslmode=require"
    )
    assert dsn_password("postgresql://u:pw@h/db") == "pw"
    assert dsn_password("postgresql://u@h/db?password=qq") == "qq"
    settings = load_settings(None, {"database": {"dsn": "postgresql://u:topsecret@h/db"}}, {})
    assert "topsecret" not in repr(settings)
    assert "topsecret" not in str(effective_view(settings))


def test_dsn_precedence() -> None:
    env = {"DATABASE_URL": "postgresql://from-url/db"}
    assert load_settings(None, {}, env).database.dsn.get_secret_value() == (
        "postgresql://from-url/db"
    )
    env["CDCFEED_DATABASE__DSN"] = "postgresql://from-cdcfeed-env/db"
    assert "from-cdcfeed-env" in load_settings(None, {}, env).database.dsn.get_secret_value()
    flags = {"database": {"dsn": "postgresql://from-flag/db"}}
    assert "from-flag" in load_settings(None, flags, env).database.dsn.get_secret_value()


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9651", ("127.0.0.1", 9651)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_addresses(address: str, expected: tuple[str, int]) -> None:
    assert split_address(address) == expected


@pytest.mark.parametrize("address", ["9651", "host:", "host:99999", ":80", "a b:1"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        split_address(address)


def test_config_output_reads_back_as_the_same_settings(tmp_path: Path) -> None:
    settings = load_settings(None, {"load": {"rate": 2.5, "seed": 9}}, {})
    text = to_toml(effective_view(settings))
    path = tmp_path / "round.toml"
    path.write_text(text)
    assert tomllib.loads(text)["load"]["rate"] == 2.5
    again = load_settings(path, {}, {})
    assert again.load == settings.load


def test_a_missing_config_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--config"):
        load_settings(tmp_path / "absent.toml", {}, {})


def test_retention_keeps_the_newest_files_within_both_bounds(tmp_path: Path) -> None:
    feed = FeedDirectory(FeedSettings(dir=tmp_path, keep_files=3, max_bytes=25))

    async def write_all() -> None:
        feed.prepare()
        for batch_id in range(1, 6):
            path = await feed.write(batch_id, b"x" * 10)
            feed.release(path, 10)

    asyncio.run(write_all())
    # Three files would be 30 bytes, over max_bytes: only the newest two stay.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "orders_batch_000000000004.csv",
        "orders_batch_000000000005.csv",
    ]


def test_retention_adopts_files_of_earlier_runs_and_drops_partial_ones(tmp_path: Path) -> None:
    for batch_id in range(1, 5):
        (tmp_path / f"orders_batch_{batch_id:012d}.csv").write_bytes(b"x")
    (tmp_path / ".orders_batch_000000000009.csv.tmp").write_bytes(b"half")
    FeedDirectory(FeedSettings(dir=tmp_path, keep_files=2)).prepare()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "orders_batch_000000000003.csv",
        "orders_batch_000000000004.csv",
    ]


def test_the_example_config_documents_every_key_with_its_default() -> None:
    from cdcfeed.config import Settings

    example = Path(__file__).parents[2] / "config" / "cdcfeed.toml"
    text = example.read_text()
    from_file = load_settings(example, {}, {})
    defaults = Settings.model_validate({})
    assert from_file == defaults
    for section, model in defaults:
        for key in type(model).model_fields:
            assert f"\n{key} =" in text or f"\n# {key} =" in text, f"{section}.{key} undocumented"
