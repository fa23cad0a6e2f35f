"""What one audit job computes, batch by batch, so that a job can stop after any batch and a
restarted server can resume it from the partial results stored after the last finished one.

An :class:`AuditTask` owns a private copy of the audited model (loaded and hash-checked from the
store, so a model swap in the serving pool never changes an audit half-way), runs one batch at a
time (:meth:`AuditTask.run_batch`) and turns the per-batch results into a report
(:meth:`AuditTask.finalize`). Everything that could change a result (attack randomness) is seeded
by ``(seed, batch index, attack index)``, so a resumed job gives the uninterrupted result.

Every f-evaluation of the private model passes through a *gate* (a callable) first: the job
runner uses it to yield the device to queued predict requests and to stop mid-batch on cancel or
shutdown.

Suites (the attacks are l_inf PGD on the undefended unrolled dynamics read at an intermediate
state, the paper's Eq. 11 family with lambda = 1; the prediction they are judged by is the
*defended* one, so the audit measures what the service answers):

- ``smoke``: PGD-2 at the last state (for tests and quick checks of the pipeline).
- ``quick``: PGD-10 at the middle and the last state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from deqguard.defense import DefenseParams, defended_forward, get_preset
from deqguard.gradients import unrolled_states
from deqguard.store import LoadedEntry, load_entry

__all__ = [
    "SUITES",
    "AttackSpec",
    "AuditStopped",
    "AuditTask",
    "resolve_defense",
    "wilson_interval",
]

Gate = Callable[[], None]


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


@dataclass(frozen=True)
class AttackSpec:
    """PGD under l_inf against the unrolled dynamics read at ``state`` (a fraction of N)."""

    name: str
    steps: int
    state_frac: float  # 1.0 = z[N]
    eps: float = 8 / 255
    step_size: float = 2 / 255


SUITES: dict[str, tuple[AttackSpec, ...]] = {
    "smoke": (AttackSpec("pgd2-zN", steps=2, state_frac=1.0, step_size=4 / 255),),
    "quick": (
        AttackSpec("pgd10-zmid", steps=10, state_frac=0.5),
        AttackSpec("pgd10-zN", steps=10, state_frac=1.0),
    ),
}


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


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion k/n (well behaved near 0 and 1)."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


class AuditTask:
    """One audit: the model copy, the test images, and the batch loop's steps."""

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        model_store: Path,
        data_root: Path | None,
        device: torch.device,
        gate: Gate,
        chunk: int = 16,
    ) -> None:
        from deqguard.data import load_test

        self.spec = spec
        self.attacks = SUITES[spec["suite"]]
        self.params = resolve_defense(spec["defense"])
        self.device = device
        self.chunk = max(1, chunk)
        self.entry: LoadedEntry = load_entry(model_store, spec["model"], device=device)
        self.solver = self.entry.manifest.solver
        self.steps = int(spec.get("solver_steps") or self.solver.max_steps or 8)
        test = load_test(data_root, int(spec["n_samples"]))
        self.images = test.images
        self.labels = test.labels
        self.n = len(test)
        self.batch_size = int(spec["batch_size"])
        self.n_batches = math.ceil(self.n / self.batch_size)
        self._gate = gate
        model = self.entry.model
        model.requires_grad_(False)
        cell = model.cell

        def gated_cell(z: torch.Tensor, injection: Any) -> torch.Tensor:
            gate()
            out = cell(z, injection)
            if torch.is_grad_enabled() and out.requires_grad:
                out = _GateInBackward.apply(out, gate)
            return out

        model.cell = gated_cell  # type: ignore[method-assign]  # this copy only

    # ------------------------------------------------------------------ one batch
    def _defended(self, x: torch.Tensor) -> tuple[list[int], list[list[float]]]:
        res = defended_forward(
            self.entry.model, x, self.params, self.solver, steps=self.steps
        )  # fmt: skip
        return res.prediction.tolist(), res.step_entropy.float().T.tolist()

    def _pgd(
        self, x: torch.Tensor, y: torch.Tensor, attack: AttackSpec, gen: torch.Generator
    ) -> torch.Tensor:
        model = self.entry.model
        state = max(1, min(self.steps, round(attack.state_frac * self.steps)))
        noise = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        x_adv = (x + (2 * noise - 1) * attack.eps).clamp(0, 1)
        for _ in range(attack.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                z = unrolled_states(model, model.inject(x_adv), state)[-1]
                loss = F.cross_entropy(model.head(z), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
            step = x_adv.detach() + attack.step_size * grad.sign()
            x_adv = torch.min(torch.max(step, x - attack.eps), x + attack.eps).clamp(0, 1)
        return x_adv.detach()

    def run_batch(self, index: int) -> dict[str, Any]:
        """Attack and judge batch ``index``; returns JSON-ready per-sample results."""
        lo = index * self.batch_size
        hi = min(self.n, lo + self.batch_size)
        out: dict[str, Any] = {
            "index": index,
            "labels": [],
            "clean_pred": [],
            "clean_entropy": [],
            "adv_pred": {a.name: [] for a in self.attacks},
            "adv_entropy": {a.name: [] for a in self.attacks},
        }
        seed = int(self.spec["seed"])
        for c0 in range(lo, hi, self.chunk):
            c1 = min(hi, c0 + self.chunk)
            x = self.images[c0:c1].to(self.device).float().div_(255)
            y = self.labels[c0:c1].to(self.device)
            pred, ent = self._defended(x)
            out["labels"] += y.tolist()
            out["clean_pred"] += pred
            out["clean_entropy"] += ent
            for k, attack in enumerate(self.attacks):
                gen = torch.Generator().manual_seed(seed * 1_000_003 + c0 * 101 + k)
                x_adv = self._pgd(x, y, attack, gen)
                pred_a, ent_a = self._defended(x_adv)
                out["adv_pred"][attack.name] += pred_a
                out["adv_entropy"][attack.name] += ent_a
        return out

    @staticmethod
    def batch_counts(res: dict[str, Any]) -> tuple[int, int, int]:
        """(samples, clean correct, robust correct under every attack) of one batch result."""
        labels = res["labels"]
        clean = sum(int(p == y) for p, y in zip(res["clean_pred"], labels))
        robust = 0
        for i, y in enumerate(labels):
            ok = res["clean_pred"][i] == y and all(
                preds[i] == y for preds in res["adv_pred"].values()
            )
            robust += int(ok)
        return len(labels), clean, robust

    # ------------------------------------------------------------------ report
    def finalize(self, batches: list[dict[str, Any]], plots_dir: Path) -> dict[str, Any]:
        """The JSON report (and its PNG plots written into ``plots_dir``)."""
        return build_report(self.spec, self.entry, self.params, self.steps, batches, plots_dir)


def _mean_curve(rows: list[list[float]]) -> list[float]:
    if not rows:
        return []
    t = torch.tensor(rows, dtype=torch.float64)
    return t.nanmean(dim=0).tolist()


def build_report(
    spec: dict[str, Any],
    entry: LoadedEntry,
    params: DefenseParams,
    steps: int,
    batches: list[dict[str, Any]],
    plots_dir: Path,
) -> dict[str, Any]:
    """Aggregate per-batch results: clean and robust accuracy with Wilson intervals, the
    paper's headline (minimum over attacks) and the per-sample worst case."""
    batches = sorted(batches, key=lambda b: b["index"])
    labels = [y for b in batches for y in b["labels"]]
    n = len(labels)
    clean_pred = [p for b in batches for p in b["clean_pred"]]
    names = list(batches[0]["adv_pred"]) if batches else []
    per_attack: dict[str, Any] = {}
    worst = [clean_pred[i] == labels[i] for i in range(n)]
    for name in names:
        preds = [p for b in batches for p in b["adv_pred"][name]]
        ok = [preds[i] == labels[i] for i in range(n)]
        worst = [w and o for w, o in zip(worst, ok)]
        k = sum(ok)
        lo, hi = wilson_interval(k, n)
        per_attack[name] = {"robust_acc": k / n if n else 0.0, "correct": k, "ci95": [lo, hi]}
    k_clean = sum(int(clean_pred[i] == labels[i]) for i in range(n))
    k_worst = sum(worst)
    headline = min((a["robust_acc"] for a in per_attack.values()), default=k_clean / max(n, 1))
    clean_curve = _mean_curve([e for b in batches for e in b["clean_entropy"]])
    adv_curves = {
        name: _mean_curve([e for b in batches for e in b["adv_entropy"][name]]) for name in names
    }
    report: dict[str, Any] = {
        "kind": "deqguard.audit",
        "engine": "service.admin.engine",
        "model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256},
        "defense": params.to_dict(),
        "suite": spec["suite"],
        "attacks": [a.__dict__ for a in SUITES[spec["suite"]]],
        "n_samples": n,
        "batch_size": spec["batch_size"],
        "seed": spec["seed"],
        "solver_steps": steps,
        "clean_acc": k_clean / n if n else 0.0,
        "clean_ci95": list(wilson_interval(k_clean, n)),
        "robust_acc": per_attack,
        "headline_robust_acc": headline,
        "worst_case_robust_acc": k_worst / n if n else 0.0,
        "worst_case_ci95": list(wilson_interval(k_worst, n)),
        "entropy_along_dynamics": {"clean": clean_curve, **adv_curves},
        "plots": [],
    }
    report["plots"] = write_plots(report, plots_dir)
    return report


def write_plots(report: dict[str, Any], plots_dir: Path) -> list[str]:
    """robust_accuracy.png (per attack with intervals) and entropy.png (clean vs attacked)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    plots_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    labels = ["clean", *report["robust_acc"], "worst case"]
    values = [report["clean_acc"]] + [a["robust_acc"] for a in report["robust_acc"].values()]
    values.append(report["worst_case_robust_acc"])
    cis = [report["clean_ci95"]] + [a["ci95"] for a in report["robust_acc"].values()]
    cis.append(report["worst_case_ci95"])
    err = [[v - c[0] for v, c in zip(values, cis)], [c[1] - v for v, c in zip(values, cis)]]
    ax.bar(range(len(values)), values, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(values)), labels, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (Wilson 95%)")
    ax.set_title(f"{report['model']['name']} (n={report['n_samples']})")
    fig.tight_layout()
    fig.savefig(plots_dir / "robust_accuracy.png")
    names.append("robust_accuracy")

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    for name, curve in report["entropy_along_dynamics"].items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=name)
    ax.set_xlabel("solver step t")
    ax.set_ylabel("mean entropy of head(z[t]) (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "entropy.png")
    names.append("entropy")
    return names
