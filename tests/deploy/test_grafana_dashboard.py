"""The Grafana dashboard: well formed, built on contract metrics, and every query accepted and
answered by a real Prometheus.

The live test here scrapes a stand-in exporter that serves every contract metric with its
labels, which proves the queries and the checking helper. The integration test against a
running cdcfeed uses the same `prometheus_server` and `dashboard_query_checker` fixtures.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# The issue's list of what the dashboard shows, as the series each item needs.
REQUIRED_SERIES = {
    "target vs achieved rate": {
        "cdcfeed_target_batches_per_second",
        "cdcfeed_achieved_batches_per_second",
    },
    "rows/s": {"cdcfeed_rows_total"},
    "batch duration by phase": {"cdcfeed_batch_duration_seconds_bucket"},
    "schedule lag": {"cdcfeed_schedule_lag_seconds_bucket"},
    "failures": {"cdcfeed_batches_total"},
    "skipped runs by reason": {"cdcfeed_batches_skipped_total"},
    "in-flight batches": {"cdcfeed_batches_in_flight"},
    "slot lag bytes": {"cdcfeed_replication_slot_lag_bytes"},
    "unconfirmed batches": {"cdcfeed_unconfirmed_batches"},
    "batch confirm latency": {"cdcfeed_batch_confirm_seconds_bucket"},
    "verified batches": {"cdcfeed_verified_batches_total"},
    "database up": {"cdcfeed_database_up"},
    "changes by operation": {"cdcfeed_changes_total"},
    "verified changes by operation": {"cdcfeed_verified_changes_total"},
    "unchanged TOAST values": {"cdcfeed_unchanged_toast_total"},
}
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}


def test_dashboard_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "cdcfeed"
    assert dashboard["title"]
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]


def test_slot_variable_lists_the_watched_slots(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    slot = variables["slot"]
    query = slot["query"]["query"] if isinstance(slot["query"], dict) else slot["query"]
    assert query == "label_values(cdcfeed_replication_slot_lag_bytes, slot)"
    # "All" must be a regex, since panels match it with =~.
    assert slot["includeAll"] and slot["allValue"] == ".*"


def test_every_panel_has_a_query(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel.get('title')!r} has a target without expr"


def test_every_panel_uses_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        sources = [panel.get("datasource")] + [t.get("datasource") for t in panel["targets"]]
        for source in filter(None, sources):
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_queries_use_only_contract_metrics(
    dashboard_queries: list[Any],
    allowed_series_names: set[str],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    for query in dashboard_queries:
        names = promql_metric_names(query.expr)
        assert names, f"{query.panel!r}: no metric found in {query.expr!r}"
        unknown = names - allowed_series_names
        assert not unknown, (
            f"{query.panel!r} uses metrics docs/metrics.md does not document: {unknown}"
        )


def test_dashboard_shows_what_the_issue_lists(
    dashboard_queries: list[Any], promql_metric_names: Callable[[str], set[str]]
) -> None:
    used = set().union(*(promql_metric_names(q.expr) for q in dashboard_queries))
    missing = {item: series - used for item, series in REQUIRED_SERIES.items() if series - used}
    assert not missing, f"not on the dashboard: {missing}"
    histogram_queries = [q.expr for q in dashboard_queries if "_bucket" in q.expr]
    for expr in histogram_queries:
        assert re.search(r"histogram_quantile\(0\.(5|99),", expr), expr
        assert "rate(" in expr and "le" in expr, expr


def test_only_defined_variables_are_used(
    dashboard: dict[str, Any], dashboard_queries: list[Any]
) -> None:
    defined = {v["name"] for v in dashboard["templating"]["list"]} | GRAFANA_BUILTINS
    for query in dashboard_queries:
        used = set(re.findall(r"\$\{?(\w+)", query.expr))
        assert used <= defined, f"{query.panel!r} uses undefined {used - defined}"


def test_panels_do_not_overlap(dashboard: dict[str, Any]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"{panel['title']!r} is wider than the dashboard"
        for x, y in itertools.product(
            range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
        ):
            assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
            taken[(x, y)] = panel["title"]


# --- Live: every query against a real Prometheus ----------------------------------------------


def exposition(contract: dict[str, Any], scrape: int) -> str:
    """Every contract metric with every label value, counters growing with each scrape."""
    defaults = {"slot": ("debezium",), "version": ("0.0.0-test",)}
    lines = []
    for name, metric in contract.items():
        label_names = list(metric.labels)
        value_lists = [metric.labels[label] or defaults.get(label, ("x",)) for label in label_names]
        for values in itertools.product(*value_lists):
            pairs = [f'{label}="{value}"' for label, value in zip(label_names, values, strict=True)]
            if metric.histogram:
                for le, share in (("0.1", 1), ("1", 2), ("+Inf", 3)):
                    labels = ",".join([*pairs, f'le="{le}"'])
                    lines.append(f"{name}_bucket{{{labels}}} {scrape * share}")
                labels = "{" + ",".join(pairs) + "}"
                lines.append(f"{name}_sum{labels} {scrape * 1.5}")
                lines.append(f"{name}_count{labels} {scrape * 3}")
            else:
                labels = "{" + ",".join(pairs) + "}" if pairs else ""
                lines.append(f"{name}{labels} {scrape}")
    return "\n".join(lines) + "\n"


@pytest.fixture
def contract_exporter(contract: dict[str, Any]) -> Iterator[str]:
    scrapes = itertools.count(1)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = exposition(contract, next(scrapes)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="contract-exporter", daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_every_query_returns_series_from_a_real_prometheus(
    prometheus_server: Callable[..., str],
    prometheus_scrapes: Callable[..., None],
    contract_exporter: str,
    dashboard_query_checker: Callable[..., list[str]],
) -> None:
    base_url = prometheus_server([contract_exporter], scrape_interval="1s")
    prometheus_scrapes(base_url)

    assert dashboard_query_checker(base_url) == []
    # And the checker has teeth: a slot nobody reports leaves the slot panels empty.
    problems = dashboard_query_checker(base_url, {"slot": "no_such_slot"})
    assert problems and all("no series" in p for p in problems), problems
