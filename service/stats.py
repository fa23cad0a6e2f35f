"""Per-model inference statistics in the shape of Triton's statistics extension.

Counts and cumulative nanoseconds per model name and version, kept on the event loop (the
batcher's ``on_batch`` hook and :meth:`service.context.ServiceContext.infer` both run there, so
no lock is needed) and read by ``GET /v2/models/{m}/stats`` and the gRPC ``ModelStatistics``:
one record, two protocols. Prometheus histograms answer "how is the service doing"; these answer
what Triton clients and perf_analyzer ask a server ("how many inferences did version 2 run").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelStats", "StatsRegistry"]


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: float, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, int(ns))

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStats:
    """One model version's counters (Triton: ``ModelStatistics``)."""

    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0  # images inferred
    execution_count: int = 0  # device batches run
    success: _Duration = field(default_factory=_Duration)  # requests, end to end in the server
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    batches: dict[int, _Duration] = field(default_factory=dict)  # batch size -> compute

    def to_dict(self) -> dict[str, Any]:
        """Triton's JSON (and, through ``json_format.ParseDict``, its protobuf) shape. Input
        and output handling is not timed apart from the forward: ``compute_input`` and
        ``compute_output`` count requests with 0 ns; there is no response cache."""
        zero = {"count": 0, "ns": 0}
        around = {"count": self.success.count, "ns": 0}
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.to_dict(),
                "fail": self.fail.to_dict(),
                "queue": self.queue.to_dict(),
                "compute_input": around,
                "compute_infer": self.compute_infer.to_dict(),
                "compute_output": around,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": {"count": d.count, "ns": 0},
                    "compute_infer": d.to_dict(),
                    "compute_output": {"count": d.count, "ns": 0},
                }
                for size, d in sorted(self.batches.items())
            ],
        }


class StatsRegistry:
    """``ModelStats`` by (name, version), created on first use."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}

    def of(self, name: str, version: str) -> ModelStats:
        key = (name, version)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ModelStats(name, version)
        return stats

    def peek(self, name: str, version: str) -> ModelStats:
        """The counters of a model version, zeros if it never ran (nothing is created)."""
        return self._stats.get((name, version)) or ModelStats(name, version)

    def recorded(self) -> list[ModelStats]:
        return [self._stats[k] for k in sorted(self._stats)]

    def success(
        self, name: str, version: str, images: int, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        """A request answered: its images, its time in the server, in the queue, computing."""
        s = self.of(name, version)
        s.inference_count += images
        s.success.add(total_s * 1e9)
        s.queue.add(queue_s * 1e9)
        s.compute_infer.add(compute_s * 1e9)
        s.last_inference_ms = int(time.time() * 1000)

    def failure(self, name: str, version: str, total_s: float) -> None:
        self.of(name, version).fail.add(total_s * 1e9)

    def execution(self, name: str, version: str, batch_size: int, compute_s: float) -> None:
        """One device batch of ``batch_size`` images for this model version."""
        s = self.of(name, version)
        s.execution_count += 1
        s.batches.setdefault(batch_size, _Duration()).add(compute_s * 1e9)
