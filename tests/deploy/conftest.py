"""Fixtures for the deployment-artifact tests: Dockerfile, compose, k8s, Prometheus, Grafana.

Everything is offered as a fixture, never imported from this file, so the tests work under
any pytest import mode and beside other conftest.py files.

External tools (hadolint, kubernetes-validate, promtool, prometheus) are looked up next to the
running interpreter first (the venv's bin/), then on PATH. A missing tool skips its test on a
developer machine but fails it under CI, where `.ci/run` installs every tool.

The dashboard helpers here are also what the live integration test uses: start Prometheus
with `prometheus_server`, point it at a running cdcfeed, then call `dashboard_query_checker`
with the base URL to evaluate every dashboard query through the HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port, wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "cdcfeed.json"
METRICS_PAGE = REPO / "docs" / "metrics.md"

# What each Grafana variable becomes when a dashboard query is sent to Prometheus directly.
GRAFANA_VARIABLES = {
    "slot": ".*",  # the variable's "All" value (allValue) is a regex
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "5m",
    "datasource": "prometheus",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def find_tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    return shutil.which(name)


@pytest.fixture
def tool() -> Callable[[str, str], str]:
    """tool(name, how_to_install) -> path; skips (fails under CI) when the tool is missing."""

    def lookup(name: str, how_to_install: str) -> str:
        path = find_tool(name)
        if path is None:
            message = f"{name} not found ({how_to_install})"
            if in_ci():
                pytest.fail(f"{message}; CI must provide it")
            pytest.skip(message)
        return path

    return lookup


# --- The metric contract: the metrics docs/metrics.md documents ------------------------------


@dataclass(frozen=True)
class ContractMetric:
    name: str
    histogram: bool
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def series_names(self) -> set[str]:
        if self.histogram:
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


def contract_metrics() -> dict[str, ContractMetric]:
    """The metrics in the table under '## The metrics' in docs/metrics.md, keyed by name.

    A row reads | `cdcfeed_name{label="a\\|b", other}` | type | what |: a label lists the values
    it takes, or none when they depend on the deployment (slot names, the version).
    """
    text = METRICS_PAGE.read_text(encoding="utf-8")
    section = text.split("\n## The metrics", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, ContractMetric] = {}
    entry = re.compile(r"`(cdcfeed_[a-z0-9_]+)(\{[^}]*\})?`")
    for line in section.splitlines():
        if not line.startswith("| `cdcfeed_"):
            continue
        cells = [cell.strip() for cell in line.replace("\\|", "\0").strip("|").split("|")]
        match = entry.fullmatch(cells[0])
        if match is None or cells[1] not in ("counter", "gauge", "histogram"):
            raise AssertionError(f"cannot read metric row {line!r} in {METRICS_PAGE}")
        labels: dict[str, tuple[str, ...]] = {}
        if match.group(2):
            for part in match.group(2).strip("{}").split(","):
                label, _, values = part.partition("=")
                labels[label.strip()] = tuple(v for v in values.strip('"').split("\0") if v)
        name = match.group(1)
        metrics[name] = ContractMetric(name, cells[1] == "histogram", labels)
    if not metrics:
        raise AssertionError(f"no metrics found under '## The metrics' in {METRICS_PAGE}")
    return metrics


@pytest.fixture(scope="session")
def contract() -> dict[str, ContractMetric]:
    return contract_metrics()


@pytest.fixture(scope="session")
def allowed_series_names(contract: dict[str, ContractMetric]) -> set[str]:
    """Every series name a query may select: the contract's metrics (with a histogram's
    _bucket/_sum/_count) and Prometheus' own `up`."""
    names = {"up"}
    for metric in contract.values():
        names |= metric.series_names()
    return names


# --- PromQL ------------------------------------------------------------------------------------

# Words that look like metric names in PromQL but are operators or modifiers.
_PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def metric_names_in(expr: str) -> set[str]:
    """Metric names an expression selects (best effort, enough for our own expressions)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors, subqueries
    text = re.sub(
        r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text
    )  # grouping label lists
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or name.lower() in _PROMQL_KEYWORDS:
            continue  # a function call or an operator keyword
        if match.start() and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # the exponent of a number such as 1e6
        names.add(name)
    return names


@pytest.fixture(scope="session")
def promql_metric_names() -> Callable[[str], set[str]]:
    return metric_names_in


def grafana_to_promql(expr: str, variables: dict[str, str] | None = None) -> str:
    """Replaces Grafana's $var / ${var} / ${var:format} with concrete values."""
    values = {**GRAFANA_VARIABLES, **(variables or {})}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no test value")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", substitute, expr)


# --- The dashboard -----------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows, rows themselves excluded."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


@dataclass(frozen=True)
class DashboardQuery:
    panel: str
    ref_id: str
    expr: str  # as written in the dashboard, Grafana variables included

    def promql(self, variables: dict[str, str] | None = None) -> str:
        return grafana_to_promql(self.expr, variables)


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[DashboardQuery]:
    dashboard = dashboard if dashboard is not None else load_dashboard()
    return [
        DashboardQuery(panel.get("title", "?"), target.get("refId", "?"), target["expr"])
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def label_values_queries(dashboard: dict[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """(variable, metric, label) for each `label_values(metric, label)` variable."""
    dashboard = dashboard if dashboard is not None else load_dashboard()
    found = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", text)
        if match:
            found.append((variable["name"], match.group(1), match.group(2)))
    return found


# --- Prometheus --------------------------------------------------------------------------------


def prometheus_get(base_url: str, path: str, params: dict[str, str]) -> dict[str, Any]:
    url = f"{base_url.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 400/422 carry the PromQL error as JSON
        with exc:
            return json.loads(exc.read())  # type: ignore[no-any-return]


def check_dashboard_queries(base_url: str, variables: dict[str, str] | None = None) -> list[str]:
    """Evaluates every dashboard query (and label_values variable) against a Prometheus.

    Returns one line per problem: a query that errors or that returns no series. An empty
    list means every panel would show data.
    """
    problems = []
    for query in dashboard_queries():
        promql = query.promql(variables)
        answer = prometheus_get(base_url, "/api/v1/query", {"query": promql})
        where = f"{query.panel!r} {query.ref_id}: {promql}"
        if answer.get("status") != "success":
            problems.append(f"{where} -> error: {answer.get('error')}")
        elif not answer["data"]["result"]:
            problems.append(f"{where} -> no series")
    for variable, metric, label in label_values_queries():
        answer = prometheus_get(base_url, f"/api/v1/label/{label}/values", {"match[]": metric})
        if answer.get("status") != "success" or not answer.get("data"):
            problems.append(f"variable ${variable}: label_values({metric}, {label}) is empty")
    return problems


@pytest.fixture
def dashboard() -> dict[str, Any]:
    return load_dashboard()


@pytest.fixture(name="dashboard_queries")
def dashboard_queries_fixture(dashboard: dict[str, Any]) -> list[DashboardQuery]:
    """Every panel query; `.expr` as written, `.promql(variables)` ready for Prometheus."""
    return dashboard_queries(dashboard)


@pytest.fixture
def dashboard_query_checker() -> Callable[..., list[str]]:
    """check(base_url, variables=None) -> problems; see check_dashboard_queries."""
    return check_dashboard_queries


@pytest.fixture
def prometheus_server(
    tool: Callable[[str, str], str], tmp_path: Path
) -> Iterator[Callable[..., str]]:
    """start(targets, job="cdcfeed", scrape_interval="1s") -> base URL of a real Prometheus.

    Listens on 127.0.0.1 only, stores its TSDB under tmp_path, and is stopped at teardown.
    """
    binary = tool("prometheus", "apt-get install prometheus")
    processes: list[subprocess.Popen[bytes]] = []
    logs = []

    def start(targets: list[str], job: str = "cdcfeed", scrape_interval: str = "1s") -> str:
        home = tmp_path / f"prometheus-{len(processes)}"
        home.mkdir()
        config = home / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML; no quoting surprises
                {
                    "global": {
                        "scrape_interval": scrape_interval,
                        "evaluation_interval": scrape_interval,
                    },
                    "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]}],
                }
            ),
            encoding="utf-8",
        )
        port = free_port()
        log = (home / "prometheus.log").open("wb")
        logs.append(log)
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        processes.append(process)
        base_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {process.returncode}:\n"
                    + (home / "prometheus.log").read_text(errors="replace")[-3000:]
                )
            try:
                with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2) as response:
                    return bool(response.status == 200)
            except OSError:
                return False

        wait_until_blocking("prometheus is ready", ready, timeout=60)
        return base_url

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in logs:
            log.close()


@pytest.fixture
def cdcfeed_config_checker(
    tool: Callable[[str, str], str], tmp_path: Path
) -> Callable[[str], subprocess.CompletedProcess[str]]:
    """check(toml_text) -> the result of `cdcfeed config --config FILE` in a clean environment.

    cdcfeed itself is the judge of its settings: unknown keys and bad values exit 2.
    """
    cdcfeed = tool("cdcfeed", "pip install -e . into the test environment")

    def check(toml_text: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"cdcfeed-{len(list(tmp_path.glob('cdcfeed-*.toml')))}.toml"
        path.write_text(toml_text, encoding="utf-8")
        # Only the file speaks: no CDCFEED_*, PG* or DATABASE_URL from the caller's shell.
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
        return subprocess.run(
            [cdcfeed, "config", "--config", str(path)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return check


def wait_for_scrapes(
    base_url: str, job: str = "cdcfeed", scrapes: int = 4, timeout: float = 60
) -> None:
    """Waits until Prometheus holds `scrapes` successful samples of `job` in the last minute,
    enough for rate() and deriv() over a 1m window."""
    query = f'sum(count_over_time(up{{job="{job}"}}[1m]) and on() (min(up{{job="{job}"}}) == 1))'

    def enough() -> bool:
        result = prometheus_get(base_url, "/api/v1/query", {"query": query})
        samples = result.get("data", {}).get("result", [])
        return bool(samples) and float(samples[0]["value"][1]) >= scrapes

    wait_until_blocking(f"{scrapes} successful scrapes of job {job!r}", enough, timeout=timeout)


@pytest.fixture
def prometheus_scrapes() -> Callable[..., None]:
    """wait(base_url, job="cdcfeed", scrapes=4, timeout=60): see wait_for_scrapes."""
    return wait_for_scrapes
