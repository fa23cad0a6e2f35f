"""Audits: attack suites against a model and its test-time defense; JSON report, plots, summary.

>>> runner = AuditRunner(AuditConfig(model="micro-trades", suite="quick", n=64))  # doctest: +SKIP
>>> report = runner.run(progress=print, state_path="audit.state.json")           # doctest: +SKIP
"""

from deqguard.audit.config import SUITES, AttackPlan, AuditConfig, build_suite
from deqguard.audit.engine import AuditCancelled, AuditRunner, Progress
from deqguard.audit.gate import DeviceGate, gate_model
from deqguard.audit.plots import write_plots
from deqguard.audit.report import (
    REPORT_SCHEMA,
    ReportValidationError,
    build_report,
    markdown_summary,
    validate_report,
    wilson_interval,
)
from deqguard.audit.store import AuditStore, StateFile, batch_counts

__all__ = [
    "REPORT_SCHEMA",
    "SUITES",
    "AttackPlan",
    "AuditCancelled",
    "AuditConfig",
    "AuditRunner",
    "AuditStore",
    "DeviceGate",
    "Progress",
    "ReportValidationError",
    "StateFile",
    "batch_counts",
    "build_report",
    "build_suite",
    "gate_model",
    "markdown_summary",
    "validate_report",
    "wilson_interval",
    "write_plots",
]
