"""What the admin API adds to a core audit: the job spec at the edge, the SQLite store of its
records, the device gate, and the private model copy.

The audit itself is ``deqguard.audit.AuditRunner`` and its one loop, :meth:`AuditRunner.run`;
this module only supplies its hooks. A spec is validated once, when the job is created
(:func:`audit_config`, 422 naming the field), and the resulting ``AuditConfig`` is stored with
the job, so a resumed job runs exactly the configuration it was accepted with.

Suites: ``quick``, ``paper`` and ``adaptive`` are deqguard.audit's; ``smoke`` (service only) is
the first attack of ``quick`` with PGD-2 by default: a check that the pipeline works, not a
robustness claim (the report's notes say so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import Counter

from deqguard.audit import (
    SUITES as CORE_SUITES,
)
from deqguard.audit import (
    AuditCancelled,
    AuditConfig,
    AuditRunner,
    batch_counts,
    markdown_summary,
    write_plots,
)
from deqguard.defense import DefenseLimits, DefenseParamError, defense_from_spec
from deqguard.store import Manifest, StoreError, load_entry, parse_ref, read_manifest
from service.admin.jobs import AuditJob, JobStore
from service.arbiter import DeviceArbiter
from service.errors import InvalidParameter
from service.hold import wait_while_held

__all__ = [
    "OPTION_FIELDS",
    "SMOKE",
    "SUITES",
    "ArbiterGate",
    "JobRecords",
    "audit_config",
    "finish_report",
    "open_audit",
]

SMOKE = "smoke"
SUITES: tuple[str, ...] = (SMOKE, *CORE_SUITES)
OPTION_FIELDS = (
    "pgd_steps", "pgd_step_size", "pgd_restarts", "eps", "grid", "autoattack", "aa_version",
    "aa_attacks", "aa_apgd_iters", "square_queries", "adaptive_ka", "transfer_from",
    "pgd_every_iterate", "apgd_iters", "apgd_targets", "bpda_targets", "adaptive_restarts",
    "adaptive_pgd_steps", "adaptive_pgd_restarts", "sanity_images", "cascade",
    "undefended_grad", "defended_grad", "model_form",
)  # fmt: skip
SMOKE_PGD_STEPS = 2

AUDIT_BUDGETS: dict[str, tuple[type, float, float]] = {
    # option -> (type, lowest, highest): what one audit job may spend, checked at the edge
    "pgd_steps": (int, 0, 1_000),
    "pgd_restarts": (int, 1, 100),
    "apgd_iters": (int, 1, 1_000),
    "apgd_targets": (int, 1, 9),
    "bpda_targets": (int, 1, 9),
    "adaptive_restarts": (int, 1, 100),
    "adaptive_pgd_steps": (int, 0, 1_000),
    "adaptive_pgd_restarts": (int, 1, 100),
    "aa_apgd_iters": (int, 1, 1_000),
    "square_queries": (int, 1, 10_000),
    "adaptive_ka": (int, 1, 100),
    "sanity_images": (int, 0, 10_000),
    "eps": (float, 0.0, 1.0),
    "pgd_step_size": (float, 0.0, 1.0),
}
"""Audit budgets: bounds of the numeric options (a typo like ``pgd_steps=1e9`` is a 422, not a
job that never ends)."""
_BOOL_OPTIONS = ("autoattack", "pgd_every_iterate", "cascade")
_STR_OPTIONS = (
    "grid", "aa_version", "transfer_from", "undefended_grad", "defended_grad", "model_form",
)  # fmt: skip


def _check_options(options: dict[str, Any], model_store: Path | None) -> None:
    """Types and budgets of the audit options (422 naming ``options.<name>``)."""

    def bad(name: str, why: str) -> InvalidParameter:
        return InvalidParameter(f"options.{name}: {why}", field=f"options.{name}")

    for name, value in options.items():
        if name in AUDIT_BUDGETS:
            kind, lo, hi = AUDIT_BUDGETS[name]
            if name == "aa_apgd_iters" and value is None:
                continue
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)):
                raise bad(name, f"expected {'an integer' if kind is int else 'a number'}")
            if not math.isfinite(value) or not lo <= value <= hi:
                raise bad(name, f"must lie in {lo}..{hi} (the audit budget), got {value}")
        elif name in _BOOL_OPTIONS and not isinstance(value, bool):
            raise bad(name, "expected true or false")
        elif name in _STR_OPTIONS and not (value is None or isinstance(value, str)):
            raise bad(name, "expected a string")
        elif name == "aa_attacks" and not (
            isinstance(value, list | tuple)
            and len(value) <= 16
            and all(isinstance(a, str) for a in value)
        ):
            raise bad(name, "expected a list of at most 16 attack names")
    ref = options.get("transfer_from")
    if ref is not None:
        try:
            parse_ref(ref)
        except StoreError:
            why = f"{ref!r} is not a model name (`name` or `name@version`)"
            raise bad("transfer_from", why) from None
        if model_store is not None:
            try:
                read_manifest(model_store, ref)
            except StoreError:
                raise bad("transfer_from", f"no model {ref!r} in the store") from None


def audit_config(
    spec: dict[str, Any],
    steps: int,
    device: str,
    *,
    max_R: int | None = None,
    model_store: Path | None = None,
) -> AuditConfig:
    """The deqguard.audit configuration of a job spec: the one validation of an audit request
    (InvalidParameter naming ``defense`` or ``options``). The defense is held to the serving
    limits (``max_R``, the model's ``steps``, beta and eps in [0, 1]), the options to
    :data:`AUDIT_BUDGETS`; ``transfer_from`` must name a model of ``model_store``."""
    options = dict(spec.get("options") or {})
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise InvalidParameter(
            f"options: unknown audit option(s) {unknown}; known: {OPTION_FIELDS}",
            field="options",
        )
    _check_options(options, model_store)
    if "aa_attacks" in options:
        options["aa_attacks"] = tuple(options["aa_attacks"])
    suite = spec["suite"]
    if suite == SMOKE:
        options.setdefault("pgd_steps", SMOKE_PGD_STEPS)
        if options.get("autoattack"):
            raise InvalidParameter(
                "options.autoattack: the smoke suite runs no AutoAttack", field="options.autoattack"
            )
        options["autoattack"] = False  # what it runs: the report says so
    try:
        return AuditConfig(
            model=spec["model"],
            defense=defense_from_spec(
                spec["defense"],
                None if max_R is None else DefenseLimits(steps=steps, max_R=max_R, unit_box=True),
            ),
            suite="quick" if suite == SMOKE else suite,
            n=int(spec["n_samples"]),
            batch_size=int(spec["batch_size"]),
            seed=int(spec["seed"]),
            steps=steps,
            device=device,
            **options,
        )
    except DefenseParamError as exc:
        raise InvalidParameter(f"defense: {exc}", field="defense") from None
    except (ValueError, TypeError) as exc:  # AuditConfig checks only the options' values
        raise InvalidParameter(f"options: {exc}", field="options") from None


class ArbiterGate:
    """The audit side of the device arbiter (:mod:`service.arbiter`), plus the device hold
    file and stopping: ``acquire`` waits while predict work is queued or computing (up to
    ``max_wait_s`` for queued work), and raises AuditCancelled once ``should_stop()``."""

    def __init__(
        self,
        arbiter: DeviceArbiter,
        hold_file: Path | None,
        max_wait_s: float,
        should_stop: Callable[[], bool],
        yielded: Counter,
    ) -> None:
        self.arbiter = arbiter
        self.hold_file = hold_file
        self.max_wait_s = max_wait_s
        self.should_stop = should_stop
        self.yielded = yielded

    def acquire(self) -> None:
        if self.should_stop():
            raise AuditCancelled("the job was cancelled or the server is stopping")
        t0 = time.monotonic()
        held = wait_while_held(self.hold_file, self.should_stop)
        waited = self.arbiter.background_gate(self.max_wait_s, self.should_stop) or held
        if self.should_stop():  # the gate returned without starting a segment
            raise AuditCancelled("the job was cancelled or the server is stopping")
        if waited:
            self.yielded.inc(time.monotonic() - t0)

    def release(self) -> None:
        self.arbiter.background_done()


class JobRecords:
    """The core audit's record store on one job's row: each batch's record and the running
    counts (samples, clean and robust correct, compute seconds) in one transaction."""

    def __init__(self, jobs: JobStore, job: AuditJob) -> None:
        self.jobs = jobs
        self.job = job

    def load(self) -> tuple[dict[int, dict[str, Any]], float]:
        batches = (self.job.partial or {"batches": []})["batches"]
        return {int(b["index"]): b for b in batches}, self.job.compute_s

    def save(self, done: dict[int, dict[str, Any]], compute_s: float) -> None:
        counts = [batch_counts(r) for r in done.values()]
        self.jobs.save_progress(
            self.job.id,
            {"batches": list(done.values())},
            samples_done=sum(c[0] for c in counts),
            clean_correct=sum(c[1] for c in counts),
            robust_correct=sum(c[2] for c in counts),
            compute_s=compute_s,
        )


def open_audit(
    spec: dict[str, Any],
    config: AuditConfig,
    *,
    model_store: Path,
    data_root: Path | None,
    device: torch.device,
    gate: ArbiterGate,
) -> AuditRunner:
    """The core audit of a job on a private, hash-verified model copy (a model swap in the
    serving pool never changes an audit half-way), gated."""
    from deqguard.data import load_test

    entry = load_entry(model_store, config.model, device=device, inference=config.served_copy)
    manifest: Manifest = entry.manifest
    model = entry.model
    model.requires_grad_(False)
    test = load_test(data_root, config.n)
    runner = AuditRunner(
        config,
        model=model,
        images=test.float_images(device),
        labels=test.labels.to(device),
        solver=manifest.solver,
        model_info={"ref": manifest.ref, "sha256": manifest.sha256,
                    "config": manifest.model_config},
        gate=gate,
    )  # fmt: skip
    if spec["suite"] == SMOKE:
        runner.plans = runner.plans[:1]
    return runner


def finish_report(report: dict[str, Any], spec: dict[str, Any], plots_dir: Path) -> dict[str, Any]:
    """The core report plus the smoke note, its PNG plots and Markdown summary."""
    if spec["suite"] == SMOKE:
        report["config"]["suite"] = SMOKE  # the core ran `quick`'s first attack
        report["config"]["autoattack"] = False
        report["notes"].append(
            "smoke suite: one attack of `quick` with a reduced budget; checks the pipeline, "
            "not a robustness claim"
        )
    files = write_plots(report, plots_dir)
    report["plots"] = [Path(f).stem for f in files]
    report["summary_markdown"] = markdown_summary(report, files)
    return report
