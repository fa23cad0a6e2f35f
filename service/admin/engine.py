"""What one audit job computes, batch by batch, on top of :mod:`deqguard.audit`.

An :class:`AuditTask` owns a private copy of the audited model (loaded and hash-checked from the
store, so a model swap in the serving pool never changes an audit half-way) and drives
``deqguard.audit.AuditRunner`` one batch at a time: the job runner persists each batch's record
in the job store (the resume point) instead of the engine's state file, and the report, plots and
Markdown summary come from ``deqguard.audit``. Every attack's randomness is seeded by
(seed, batch, attack) there, so a resumed job gives the uninterrupted result.

Every f-evaluation of the private model, forward and backward, first passes a *gate* (a
callable): the job runner uses it to yield the device to queued predict requests and to stop
mid-batch on cancel or shutdown.

Suites: ``quick``, ``paper`` and ``adaptive`` are deqguard.audit's; ``smoke`` (service only) is
the first attack of ``quick`` with PGD-2 by default: a check that the pipeline works, not a
robustness claim (the report's notes say so).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deqguard.audit import SUITES as ENGINE_SUITES
from deqguard.audit import AuditConfig, AuditRunner, markdown_summary, write_plots
from deqguard.defense import DefenseParams, get_preset
from deqguard.store import LoadedEntry, load_entry

__all__ = [
    "OPTION_FIELDS",
    "SUITES",
    "AuditStopped",
    "AuditTask",
    "audit_config",
    "resolve_defense",
]

Gate = Callable[[], None]
SUITES: tuple[str, ...] = ("smoke", *ENGINE_SUITES)
OPTION_FIELDS = (
    "pgd_steps", "pgd_step_size", "pgd_restarts", "eps", "grid", "autoattack", "aa_version",
    "aa_attacks", "aa_apgd_iters", "square_queries", "adaptive_ka", "transfer_from",
    "pgd_every_iterate", "apgd_iters", "apgd_targets", "bpda_targets", "adaptive_restarts",
    "sanity_images",
)  # fmt: skip
SMOKE_PGD_STEPS = 2


class AuditStopped(Exception):
    """Raised through the gate: the job was cancelled or the server is stopping."""


class _GateInBackward(torch.autograd.Function):
    """Identity whose backward passes the gate first, so that the backward passes of attacks
    and of the defense also yield to predict traffic one f-evaluation at a time."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, gate: Gate) -> torch.Tensor:  # type: ignore[override]
        ctx.gate = gate
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.gate()
        return grad, None


def resolve_defense(defense: str | dict[str, Any]) -> DefenseParams:
    """A preset name or a dict of DefenseParams fields (optionally with ``preset`` as the base)."""
    if isinstance(defense, str):
        return get_preset(defense)
    fields = dict(defense)
    base = get_preset(str(fields.pop("preset", "off"))).to_dict()
    unknown = set(fields) - set(base)
    if unknown:
        raise ValueError(f"unknown defense parameter(s): {sorted(unknown)}")
    base.update(fields)
    return DefenseParams.from_dict(base)


def audit_config(spec: dict[str, Any], steps: int, device: str = "cpu") -> AuditConfig:
    """The deqguard.audit configuration of a job spec (raises ValueError naming the field)."""
    options = dict(spec.get("options") or {})
    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise ValueError(f"unknown audit option(s): {sorted(unknown)}")
    if "aa_attacks" in options:
        options["aa_attacks"] = tuple(options["aa_attacks"])
    suite = spec["suite"]
    if suite == "smoke":
        options.setdefault("pgd_steps", SMOKE_PGD_STEPS)
    defense = spec["defense"]
    return AuditConfig(
        model=spec["model"],
        defense=defense if isinstance(defense, str) else resolve_defense(defense),
        suite="quick" if suite == "smoke" else suite,
        n=int(spec["n_samples"]),
        batch_size=int(spec["batch_size"]),
        seed=int(spec["seed"]),
        steps=steps,
        device=device,
        **options,
    )


def _gate_backward(t: Any, gate: Gate) -> Any:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        return _GateInBackward.apply(t, gate)
    return t


def _gated(model: torch.nn.Module, gate: Gate) -> None:
    """Route this model copy's f-evaluations (and their backward) through ``gate``: the parts
    of f that callers use directly (``cell_inner``/``cell_outer``, which ``cell`` composes),
    or ``cell`` itself on models without them."""
    parts = [n for n in ("cell_inner", "cell_outer") if hasattr(model, n)] or ["cell"]
    for name in parts:
        fn = getattr(model, name)

        def gated(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            gate()
            out = _fn(*args, **kwargs)
            if not torch.is_grad_enabled():
                return out
            if isinstance(out, torch.Tensor):
                return _gate_backward(out, gate)
            if isinstance(out, list | tuple):  # cell_inner: one tensor per branch
                return type(out)(_gate_backward(t, gate) for t in out)
            return out

        setattr(model, name, gated)  # this copy only


class AuditTask:
    """One audit job's engine: the gated model copy, the test images, the batch loop's steps."""

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        model_store: Path,
        data_root: Path | None,
        device: torch.device,
        gate: Gate,
        steps: int | None = None,
    ) -> None:
        from deqguard.data import load_test

        self.spec = spec
        self.entry: LoadedEntry = load_entry(model_store, spec["model"], device=device)
        manifest = self.entry.manifest
        self.steps = int(steps or manifest.solver.max_steps or 8)
        self.config = audit_config(spec, self.steps, str(device))
        test = load_test(data_root, self.config.n)
        model = self.entry.model
        model.requires_grad_(False)
        _gated(model, gate)
        self.runner = AuditRunner(
            self.config,
            model=model,
            images=test.float_images(device),
            labels=test.labels.to(device),
            solver=manifest.solver,
            model_info={"ref": manifest.ref, "sha256": manifest.sha256,
                        "config": manifest.model_config},
        )  # fmt: skip
        if spec["suite"] == "smoke":
            self.runner.plans = self.runner.plans[:1]
        self.n = len(test)
        self.n_batches = self.runner.total_batches

    def run_batch(self, index: int) -> dict[str, Any]:
        """The JSON record of batch ``index`` (deqguard.audit's format)."""
        return self.runner.run_batch(index)

    @staticmethod
    def batch_counts(record: dict[str, Any]) -> tuple[int, int, int]:
        """(samples, clean correct, correct under every attack) of one batch record."""
        clean = [bool(c) for c in record["clean_correct"]]
        worst = list(clean)
        for attack in record["attacks"]:
            worst = [w and bool(c) for w, c in zip(worst, attack["correct"])]
        return len(record["labels"]), sum(clean), sum(worst)

    def finalize(
        self, batches: list[dict[str, Any]], plots_dir: Path, elapsed_s: float = 0.0
    ) -> dict[str, Any]:
        """The report (deqguard.audit's schema), its PNG plots and Markdown summary."""
        report = self.runner.report(batches, elapsed_s=elapsed_s)
        if self.spec["suite"] == "smoke":
            report["notes"].append(
                "smoke suite: one attack of `quick` with a reduced budget; checks the pipeline, "
                "not a robustness claim"
            )
        files = write_plots(report, plots_dir)
        report["plots"] = [Path(f).stem for f in files]
        report["summary_markdown"] = markdown_summary(report, files)
        return report
