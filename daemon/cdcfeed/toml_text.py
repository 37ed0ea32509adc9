"""Settings as TOML text, for `cdcfeed config`."""

from __future__ import annotations

import json
from typing import Any


def to_toml(data: dict[str, Any]) -> str:
    """Settings as TOML that `--config` accepts back (None values are left as comments)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _toml_value(value: Any) -> str:
    """JSON spells scalars and arrays as TOML does; a table needs TOML's `{key = value}`."""
    if isinstance(value, dict):
        items = ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items())
        return "{" + items + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)
