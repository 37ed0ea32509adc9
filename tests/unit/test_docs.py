"""The docs say what the code has: every settings key with its default, every metric, and
every relative link leads somewhere.

(config/cdcfeed.toml, the reference with every default, is checked in test_units.py.)
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from cdcfeed.config import Settings
from cdcfeed.metrics import Metrics

REPO = Path(__file__).parents[2]
CONFIGURATION = REPO / "docs" / "configuration.md"
METRICS = REPO / "docs" / "metrics.md"
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _section(path: Path, heading: str) -> str:
    """The text under `heading` down to the next heading of the same or a higher level."""
    text = path.read_text(encoding="utf-8")
    level = heading.split(" ", 1)[0]
    body = text.split(f"\n{heading}\n", 1)[1]
    ends = [f"\n{'#' * n} " for n in range(1, len(level) + 1)]
    return min((body.split(end, 1)[0] for end in ends), key=len)


def _key_rows(section: str) -> list[tuple[str, str]]:
    """(key, default cell) of each row of a key table."""
    return re.findall(r"^\| `([a-z_]+)` \| ([^|]+?) \|", section, re.M)


def test_the_configuration_page_lists_every_key_of_every_section() -> None:
    keys = _section(CONFIGURATION, "## The keys")
    documented = {
        section: [key for key, _ in _key_rows(_section(CONFIGURATION, f"### `[{section}]`"))]
        for section in re.findall(r"^### `\[([a-z]+)\]`$", keys, re.M)
    }
    in_code = {
        section: list(type(model).model_fields) for section, model in Settings.model_validate({})
    }
    assert documented == in_code


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return value


@pytest.mark.parametrize("section", list(Settings.model_fields))
def test_the_configuration_page_gives_each_default_as_the_code_has_it(section: str) -> None:
    model: BaseModel = getattr(Settings.model_validate({}), section)
    rows = _key_rows(_section(CONFIGURATION, f"### `[{section}]`"))
    for key, cell in rows:
        default = _plain(getattr(model, key))
        if default is None:
            assert cell == "unset", f"[{section}] {key}: the default is unset, the page says {cell}"
            continue
        literal = re.match(r"`([^`]*)`", cell)
        assert literal, f"[{section}] {key}: no default in {cell!r}"
        documented = tomllib.loads(f"value = {literal.group(1)}")["value"]
        if isinstance(default, Path):
            documented = Path(documented)
        assert documented == default, f"[{section}] {key}: {documented!r} != {default!r}"


def test_the_metrics_table_lists_every_metric_with_its_type() -> None:
    documented = dict(
        re.findall(
            r"^\| `(cdcfeed_[a-z0-9_]+)[^`]*` \| ([a-z]+) \|",
            _section(METRICS, "## The metrics"),
            re.M,
        )
    )
    suffix = {"counter": "_total", "info": "_info"}
    in_code = {
        family.name + suffix.get(family.type, ""): "gauge" if family.type == "info" else family.type
        for family in Metrics().registry.collect()
    }
    assert documented == in_code


def _anchors(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of a Markdown page."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans hold no links
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(REPO).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page: Path) -> None:
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):
            continue  # https:, mailto:
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists():
            broken.append(f"{link}: no file {path.relative_to(REPO)}")
        elif anchor and (path.suffix != ".md" or anchor not in _anchors(path)):
            broken.append(f"{link}: no heading #{anchor} in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)
