"""The alert rules: valid for promtool, unit-tested by promtool, and built on contract metrics."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"

REQUIRED_ALERTS = {
    "CdcfeedBatchesFailing",
    "CdcfeedSkippedRuns",
    "CdcfeedSlotLagGrowing",
    "CdcfeedSlotInactive",
    "CdcfeedVerificationViolation",
    "CdcfeedDown",
    "CdcfeedDatabaseDown",
}


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


def promtool(tool: Callable[[str, str], str], *args: str) -> subprocess.CompletedProcess[str]:
    binary = tool("promtool", "apt-get install prometheus")
    return subprocess.run(
        [binary, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_promtool_check_rules(tool: Callable[[str, str], str]) -> None:
    result = promtool(tool, "check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout, result.stdout


def test_promtool_unit_tests_pass(tool: Callable[[str, str], str]) -> None:
    result = promtool(tool, "test", "rules", ALERTS_TEST.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_the_alerts_the_issue_asks_for_exist() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    assert set(names) >= REQUIRED_ALERTS, f"missing: {REQUIRED_ALERTS - set(names)}"


def test_every_alert_has_a_unit_test_in_which_it_fires() -> None:
    document = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert ALERTS.name in document["rule_files"]
    firing = {
        case["alertname"]
        for test in document["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    untested = {rule["alert"] for rule in alert_rules()} - firing
    assert not untested, f"alerts without a unit test that fires them: {sorted(untested)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_uses_only_contract_metrics(
    rule: dict[str, Any],
    allowed_series_names: set[str],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    names = promql_metric_names(rule["expr"])
    assert names, f"found no metric in {rule['expr']!r}"
    unknown = names - allowed_series_names
    assert not unknown, f"{rule['alert']} uses metrics docs/metrics.md does not document: {unknown}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_says_what_happened_and_how_bad(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in ("warning", "critical")
    assert rule.get("annotations", {}).get("summary")
    assert rule.get("annotations", {}).get("description")
