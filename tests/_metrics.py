"""The Grafana dashboard's metric names and the series a set of Prometheus metric families can
expose: one copy for the Docker-free check (tests/service/admin) and the live image and compose
checks (tests/image)."""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["DASHBOARD", "dashboard_metrics", "exported_series", "metric_families"]

DASHBOARD = (
    Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dashboards" / "deqguard.json"
)

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "unknown": ("",),
}


def dashboard_metrics(path: Path = DASHBOARD) -> set[str]:
    """Every ``deqguard_*`` series name in the provisioned dashboard's panel queries."""
    dash = json.loads(path.read_text())
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names |= set(re.findall(r"\b(deqguard_[a-z0-9_]+)", target["expr"]))
    return names


def exported_series(families: dict[str, str]) -> set[str]:
    """Series names a set of metric families (name -> type) can expose."""
    out: set[str] = set()
    for name, kind in families.items():
        base = name.removesuffix("_total") if kind == "counter" else name
        out |= {base + s for s in _SUFFIXES.get(kind, ("",))}
    return out


def metric_families(text: str) -> dict[str, str]:
    """Family name -> type of a /metrics text (families, not samples, so a labelled family that
    has seen no sample yet still counts)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}
