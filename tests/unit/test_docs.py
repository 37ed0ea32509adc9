"""The README's reference tables say what the code has: every settings key, every metric.

(config/cdcfeed.toml, the reference with every default, is checked in test_units.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

from cdcfeed.config import Settings
from cdcfeed.metrics import Metrics

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    return README.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_configuration_table_lists_every_key_of_every_section() -> None:
    documented = {
        match.group(1): re.findall(r"`([a-z_]+)`", match.group(2))
        for match in re.finditer(r"^\| `\[([a-z]+)\]` \| (.*) \|$", _section("Configuration"), re.M)
    }
    in_code = {
        section: list(type(model).model_fields) for section, model in Settings.model_validate({})
    }
    assert documented == in_code


def test_the_metrics_table_lists_every_metric_with_its_type() -> None:
    documented = dict(
        re.findall(
            r"^\| `(cdcfeed_[a-z0-9_]+)[^`]*` \| ([a-z]+) \|", _section("Metrics and health"), re.M
        )
    )
    suffix = {"counter": "_total", "info": "_info"}
    in_code = {
        family.name + suffix.get(family.type, ""): "gauge" if family.type == "info" else family.type
        for family in Metrics().registry.collect()
    }
    assert documented == in_code
