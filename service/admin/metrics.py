"""Admin metrics on the service's own registry (one /metrics for everything)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.admin.jobs import STATES

__all__ = ["AdminMetrics"]


class _JobStateCollector(Collector):
    """``deqguard_audit_jobs{state}`` read from the job store at scrape time, so the gauge is
    right after a restart too."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fam = GaugeMetricFamily("deqguard_audit_jobs", "Audit jobs by state", labels=["state"])
        try:
            counts = self.counts()
        except Exception:  # a closed store during shutdown: report nothing rather than fail
            counts = {}
        for state in STATES:
            fam.add_metric([state], float(counts.get(state, 0)))
        yield fam


class AdminMetrics:
    """Audit progress, audit yielding and model loads."""

    def __init__(self, registry: CollectorRegistry, counts: Callable[[], dict[str, int]]) -> None:
        self.samples = Counter(
            "deqguard_audit_samples_processed",
            "Test images audited (attacked and judged), all jobs",
            registry=registry,
        )
        self.yield_seconds = Counter(
            "deqguard_audit_yield_seconds",
            "Time audits spent waiting for online traffic to clear the device",
            registry=registry,
        )
        self.model_loads = Counter(
            "deqguard_model_loads",
            "Admin model loads by result (loaded, refused, not_found, failed)",
            ["result"],
            registry=registry,
        )
        registry.register(_JobStateCollector(counts))
