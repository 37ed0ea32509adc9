"""The Kubernetes manifests: valid against the API schemas (kubernetes-validate --strict) and
wired together as the sidecar deployment promises."""

from __future__ import annotations

import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
# A release kubernetes-validate ships schemas for, old enough to match most clusters in use.
KUBERNETES_VERSION = "1.30.0"


def load_all() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in MANIFESTS:
        documents.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return documents


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d
        for d in load_all()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec() -> dict[str, Any]:
    return only("Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container(name: str) -> dict[str, Any]:
    spec = pod_spec()
    for item in spec["containers"] + spec.get("initContainers", []):
        if item["name"] == name:
            return item  # type: ignore[no-any-return]
    raise AssertionError(f"no container {name}")


def all_containers() -> list[dict[str, Any]]:
    spec = pod_spec()
    return spec["containers"] + spec.get("initContainers", [])  # type: ignore[no-any-return]


def port_number(item: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in item["ports"] if p["name"] == port))


def cdcfeed_toml() -> dict[str, Any]:
    config_map = only("ConfigMap", "cdcfeed-config")
    return tomllib.loads(config_map["data"]["cdcfeed.toml"])


def test_there_are_manifests() -> None:
    kinds = {d["kind"] for d in load_all()}
    assert {"Deployment", "ConfigMap", "Secret", "Service"} <= kinds, kinds


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_kubernetes(manifest: Path, tool: Callable[[str, str], str]) -> None:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    result = subprocess.run(
        [validate, "--strict", "--kubernetes-version", KUBERNETES_VERSION, str(manifest)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed" in result.stdout, result.stdout + result.stderr


def test_debezium_and_cdcfeed_share_one_pod() -> None:
    names = {c["name"] for c in pod_spec()["containers"]}
    assert {"debezium", "cdcfeed"} <= names
    assert "debezium" in container("debezium")["image"]


def test_images_are_pinned() -> None:
    for item in all_containers():
        tag = item["image"].rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{item['name']}: {item['image']} is not pinned"


def test_cdcfeed_probes_healthz_and_readyz_on_the_metrics_port() -> None:
    cdcfeed = container("cdcfeed")
    liveness = cdcfeed["livenessProbe"]["httpGet"]
    readiness = cdcfeed["readinessProbe"]["httpGet"]
    assert liveness["path"] == "/healthz"
    assert readiness["path"] == "/readyz"
    assert port_number(cdcfeed, liveness["port"]) == 9651
    assert port_number(cdcfeed, readiness["port"]) == 9651


def test_prometheus_annotations_point_at_the_metrics_port() -> None:
    annotations = only("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port_number(container("cdcfeed"), "metrics")
    address = cdcfeed_toml().get("metrics", {}).get("address", "0.0.0.0:9651")
    assert address == f"0.0.0.0:{annotations['prometheus.io/port']}", (
        "cdcfeed must listen on all interfaces on the annotated port"
    )


def test_service_exposes_the_metrics_port_of_the_pod() -> None:
    service = only("Service")
    pod_labels = only("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert port_number(container("cdcfeed"), ports["metrics"]["targetPort"]) == 9651


def test_every_container_has_requests_and_limits() -> None:
    for item in all_containers():
        resources = item.get("resources", {})
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(kind, {})), (
                f"{item['name']}: resources.{kind} needs cpu and memory"
            )


def test_every_container_is_non_root_with_a_read_only_root() -> None:
    pod_context = pod_spec().get("securityContext", {})
    for item in all_containers():
        context = {**pod_context, **item.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True, item["name"]
        assert context.get("readOnlyRootFilesystem") is True, item["name"]
        assert context.get("allowPrivilegeEscalation") is False, item["name"]


def test_cdcfeed_writes_only_to_empty_dirs() -> None:
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container("cdcfeed")["volumeMounts"]}
    feed_dir = cdcfeed_toml().get("feed", {}).get("dir", "/var/lib/cdcfeed/feed")
    for path in (feed_dir, "/tmp"):
        assert path in mounts, f"nothing mounted at {path}"
        assert "emptyDir" in volumes[mounts[path]], f"{path} should be an emptyDir"


def test_termination_grace_outlasts_cdcfeeds_grace_period() -> None:
    grace_period = cdcfeed_toml().get("daemon", {}).get("grace_period", 10)
    termination = pod_spec()["terminationGracePeriodSeconds"]
    assert termination > grace_period + 10, (
        f"terminationGracePeriodSeconds {termination} leaves no room after cdcfeed's "
        f"grace period of {grace_period}s"
    )


def test_the_password_comes_from_the_secret() -> None:
    secret = only("Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for item in all_containers():
        env = {e["name"]: e for e in item.get("env", [])}
        password = env.get("PGPASSWORD")
        assert password is not None, f"{item['name']}: no PGPASSWORD"
        ref = password["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys


def test_referenced_config_maps_and_claims_exist() -> None:
    defined = {(d["kind"], d["metadata"]["name"]) for d in load_all()}
    for volume in pod_spec()["volumes"]:
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in defined, volume
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in defined, volume


def test_debezium_uses_the_slot_and_publication_cdcfeed_watches() -> None:
    text = only("ConfigMap", "debezium-config")["data"]["application.properties"]
    properties = dict(
        line.split("=", 1)
        for line in text.splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert properties["debezium.source.plugin.name"] == "pgoutput"
    assert properties["debezium.source.database.password"] == "${PGPASSWORD}"
    slot = properties["debezium.source.slot.name"]
    watched = cdcfeed_toml().get("cdc", {}).get("slots", [])
    assert not watched or slot in watched, f"cdcfeed watches {watched}, Debezium uses {slot}"
    tables = set(properties["debezium.source.table.include.list"].split(","))
    assert tables == {"public.orders", "public.batch_control"}


def test_sidecar_cdcfeed_settings_are_valid(
    cdcfeed_config_checker: Callable[[str], subprocess.CompletedProcess[str]],
) -> None:
    toml_text = only("ConfigMap", "cdcfeed-config")["data"]["cdcfeed.toml"]
    result = cdcfeed_config_checker(toml_text)
    assert result.returncode == 0, result.stderr or result.stdout
