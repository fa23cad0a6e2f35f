"""Kept for ``benchmarks/bench_audit_latency.py``, which imports ``free_port`` from here; the
one live-server helper is :mod:`tests._live` (the admin server: ``tests.service.admin._server``)."""

from tests._live import free_port

__all__ = ["free_port"]
