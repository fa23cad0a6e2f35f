"""Prometheus metrics of one service instance (own registry: several apps can share a process).

Names follow Prometheus conventions: a ``deqguard_`` prefix, base units (seconds, bytes),
``_total`` on counters. Routes are labelled by their template (``/v2/models/{model_name}/infer``),
never by the raw path, so the label set stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = ["ServiceMetrics"]

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GRAD_STEP_BUCKETS = (0, 1, 5, 10, 20, 40, 80, 160, 320)
ENTROPY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.303)


class _CudaMemoryCollector(Collector):
    """Device memory gauges, only when the service runs on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return
        fam = GaugeMetricFamily(
            "deqguard_device_memory_bytes", "CUDA memory of the device worker", labels=["kind"]
        )
        fam.add_metric(["allocated"], float(torch.cuda.memory_allocated(self.device)))
        fam.add_metric(["reserved"], float(torch.cuda.memory_reserved(self.device)))
        fam.add_metric(["max_allocated"], float(torch.cuda.max_memory_allocated(self.device)))
        yield fam


_WITH_CREATED = ("counter", "histogram", "summary")


class ServiceRegistry(CollectorRegistry):
    """A registry without the ``_created`` series (a second, duplicate series per counter and
    histogram that dashboards never use). Only this registry: not the process-wide switch
    ``prometheus_client.disable_created_metrics``, which other registries would feel."""

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            if metric.type in _WITH_CREATED:
                metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


class ServiceMetrics:
    """Every metric the service exports, registered on its own registry."""

    def __init__(self, device: torch.device) -> None:
        r = self.registry = ServiceRegistry()
        # the standard process_* (CPU, memory, file descriptors, start time) and python_* series
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(standard)
        self.requests = Counter(
            "deqguard_http_requests",
            "HTTP requests by route template, method and status code",
            ["route", "method", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "deqguard_http_request_duration_seconds",
            "Time from receiving a request to sending its response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "deqguard_queue_wait_seconds",
            "Time a request waited in the queue before its batch started",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "deqguard_inference_duration_seconds",
            "Device time of one batch (defended forward, all chunks)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "deqguard_batch_size",
            "Images per device batch",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.grad_steps = Histogram(
            "deqguard_defense_gradient_steps",
            "Input-gradient steps the defense spent per image",
            buckets=GRAD_STEP_BUCKETS,
            registry=r,
        )
        self.entropy = Histogram(
            "deqguard_prediction_entropy_nats",
            "Entropy of each returned prediction (nats; ln 10 = 2.303 is uniform)",
            buckets=ENTROPY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "deqguard_images",
            "Images classified, by model",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "deqguard_queue_depth_images", "Images waiting for the device", registry=r
        )
        self.in_flight = Gauge(
            "deqguard_requests_in_flight", "Inference requests admitted and not yet answered",
            registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "deqguard_rejections",
            "Requests refused or dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.batch_failures = Counter(
            "deqguard_batch_failures",
            "Device batches that raised (then split and retried)",
            registry=r,
        )
        self.model_info = Gauge(
            "deqguard_model_info",
            "Loaded models (value 1), with version, weights hash and device",
            ["name", "version", "sha256", "device", "default"],
            registry=r,
        )
        self.ready = Gauge("deqguard_ready", "1 when /readyz answers ready", registry=r)
        r.register(_CudaMemoryCollector(device))
