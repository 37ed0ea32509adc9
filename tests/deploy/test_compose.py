"""The compose stack: parses, mounts only files that exist, references only defined services,
pins every image, and agrees with the connector, Prometheus and Grafana files it mounts.

No Docker engine runs here, so these are static checks of what `docker compose up` reads.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
CONNECTOR = COMPOSE_DIR / "debezium" / "cdcfeed-connector.json"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = REPO / "deploy" / "grafana"

EXPECTED_SERVICES = {
    "postgres",
    "kafka",
    "connect",
    "register-connector",
    "cdcfeed",
    "prometheus",
    "grafana",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]  # type: ignore[no-any-return]


def bind_mount_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of bind mounts, in short ("./a:/b:ro") or long ({type: bind}) syntax."""
    sources = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/", "~")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(volume["source"])
    return sources


def test_every_part_of_the_stack_is_there(compose: dict[str, Any]) -> None:
    assert set(services(compose)) >= EXPECTED_SERVICES, (
        f"missing services: {EXPECTED_SERVICES - set(services(compose))}"
    )


def test_every_bind_mount_exists_in_the_repository(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in services(compose).items():
        for source in bind_mount_sources(service):
            assert not source.startswith(("/", "~")), (
                f"{name}: {source} is outside the repository; mount repository files only"
            )
            host = (COMPOSE_DIR / source).resolve()
            assert host.is_relative_to(REPO), f"{name}: {source} leaves the repository"
            assert host.exists(), f"{name}: mounts {source}, which does not exist"
            checked += 1
    assert checked, "no bind mounts found; the stack mounts its config files"


def test_build_context_and_dockerfile_exist(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        build = service.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (COMPOSE_DIR / context / dockerfile).resolve().is_file(), f"{name}: no Dockerfile"


def test_every_referenced_service_is_defined(compose: dict[str, Any]) -> None:
    defined = set(services(compose))
    for name, service in services(compose).items():
        depends_on = service.get("depends_on", {})
        referenced = set(depends_on if isinstance(depends_on, (list, dict)) else [])
        referenced |= {link.split(":")[0] for link in service.get("links", [])}
        referenced |= {v.split(":")[0] for v in service.get("volumes_from", [])}
        for key in ("network_mode", "pid", "ipc"):
            value = service.get(key, "")
            if isinstance(value, str) and value.startswith("service:"):
                referenced.add(value.removeprefix("service:"))
        assert referenced <= defined, f"{name} references undefined {referenced - defined}"


def test_health_conditions_point_at_services_with_a_healthcheck(compose: dict[str, Any]) -> None:
    # `condition: service_healthy` on a service without a healthcheck makes `up` fail.
    for name, service in services(compose).items():
        depends_on = service.get("depends_on", {})
        if not isinstance(depends_on, dict):
            continue
        for target, spec in depends_on.items():
            if (spec or {}).get("condition") == "service_healthy":
                assert "healthcheck" in services(compose)[target], (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )


def test_every_image_is_pinned(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = service.get("image")
        assert image, f"{name}: no image (a built service still names its image:tag)"
        if "@sha256:" in image:
            continue
        last = image.rsplit("/", 1)[-1]
        assert ":" in last, f"{name}: {image} has no tag"
        tag = last.rsplit(":", 1)[1]
        assert tag and tag != "latest", f"{name}: {image} is not pinned"
        if "build" not in service:
            # A registry image pinned to a version, not a floating major like postgres:16.
            assert re.search(r"\d+\.\d+", tag), f"{name}: {image} is not pinned to a version"


def test_postgres_runs_with_logical_wal(compose: dict[str, Any]) -> None:
    command = services(compose)["postgres"]["command"]
    words = command if isinstance(command, list) else command.split()
    assert "wal_level=logical" in words


def test_cdcfeed_is_built_from_the_repository_dockerfile(compose: dict[str, Any]) -> None:
    cdcfeed = services(compose)["cdcfeed"]
    context = cdcfeed["build"]["context"]
    assert (COMPOSE_DIR / context).resolve() == REPO
    mounts = cdcfeed.get("volumes", [])
    assert any(str(m).endswith(":/etc/cdcfeed/cdcfeed.toml:ro") for m in mounts), (
        "the compose config should be mounted where the daemon looks by default"
    )


def test_compose_cdcfeed_settings_are_valid(
    cdcfeed_config_checker: Callable[[str], subprocess.CompletedProcess[str]],
) -> None:
    result = cdcfeed_config_checker((COMPOSE_DIR / "cdcfeed.toml").read_text(encoding="utf-8"))
    assert result.returncode == 0, result.stderr or result.stdout


def test_connector_streams_cdcfeeds_tables_through_pgoutput() -> None:
    config = json.loads(CONNECTOR.read_text(encoding="utf-8"))
    assert all(isinstance(value, str) for value in config.values()), (
        "Kafka Connect wants every config value as a string"
    )
    assert config["connector.class"] == "io.debezium.connector.postgresql.PostgresConnector"
    assert config["plugin.name"] == "pgoutput"
    assert config["publication.name"] == "cdcfeed"
    assert config["publication.autocreate.mode"] in ("disabled", "filtered")
    assert config["slot.name"] == "debezium"
    tables = set(config["table.include.list"].split(","))
    assert tables == {"public.orders", "public.batch_control"}
    assert int(config["heartbeat.interval.ms"]) > 0
    assert "snapshot.mode" in config


def test_connector_registration_sends_the_mounted_file(compose: dict[str, Any]) -> None:
    register = services(compose)["register-connector"]
    mounts = {m.split(":")[0]: m.split(":")[1] for m in register["volumes"]}
    container_path = mounts["./debezium/cdcfeed-connector.json"]
    command = register["command"]
    assert f"@{container_path}" in command, "the registration must send the mounted file"
    # PUT .../config takes the bare config map and is idempotent across restarts.
    assert "PUT" in command
    url = next(word for word in command if word.startswith("http://"))
    assert re.fullmatch(r"http://connect:8083/connectors/[\w-]+/config", url), url


def test_prometheus_scrapes_cdcfeed_on_its_metrics_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "cdcfeed" in jobs, 'the alert rules select job="cdcfeed"'
    job = jobs["cdcfeed"]
    targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
    assert "cdcfeed:9651" in targets, targets
    assert "alerts.yml" in config["rule_files"]


def test_prometheus_config_is_valid(tool: Callable[[str, str], str]) -> None:
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run(
        [promtool, "check", "config", PROMETHEUS_CONFIG.name],
        cwd=PROMETHEUS_CONFIG.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_dashboard_and_datasource(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    dashboard_target = mounts["../grafana/cdcfeed.json"]

    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "cdcfeed.yml").read_text(encoding="utf-8")
    )["providers"]
    paths = {provider["options"]["path"] for provider in providers}
    assert str(Path(dashboard_target).parent) in paths, (
        f"the dashboard is mounted at {dashboard_target}, but providers read {paths}"
    )
    assert grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == dashboard_target

    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    uids = {ds["uid"] for ds in datasources if ds["type"] == "prometheus"}
    dashboard = json.loads((GRAFANA / "cdcfeed.json").read_text(encoding="utf-8"))
    variable = next(v for v in dashboard["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] in uids, (
        "the dashboard defaults to a datasource that is not provisioned"
    )
    assert any(ds["url"] == "http://prometheus:9090" for ds in datasources)
