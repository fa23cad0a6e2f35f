"""PGD-10 along training under both gradients the audits know, on validation images.

Why: model selection (item 4 of issue 14) picks the validation snapshot with the best PGD-10,
and the trainer's PGD-10 differentiates a few damped steps from the N-step solution. That is
the served prediction's gradient only near a fixed point, and the plain-TRADES run lost its
fixed point after about step 7,800 (``training.convergence``). This measures, for every
committed snapshot of each run (one per session) and its validation-selected weights, PGD-10
as the audits run it (best iterate kept, judged by the served prediction at z[N]) with the
unrolled gradient (``ServedSurrogate``, Ka 5) and with the solver's own
(``SolverGradSurrogate``, backpropagation through the N Broyden steps), on the same images:
where the two part, the selection metric stopped measuring robustness.

Usage::

    python -m training.robust_history training/state/campaign-micro-trades \
        training/state/campaign-micro-trades-ri --n 256 --json docs/robust_history.json \
        --plot docs/robust_history.png

Validation images only (the first ``--n`` of the held-out split), never the test set. The
model is the served form (``prepare_for_inference``), as an export would serve it.

``--reuse FILE`` takes the records of an earlier history (the committed
``docs/robust_history.json``) for the weights it already measured, the same run, label, step
and ``--n`` (a committed snapshot never changes), and measures only the rest: at the end of a
run that is its last few snapshots instead of all of them (about two CPU minutes each). A
reused record keeps its figures and names its source (``"reused_from"``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.attacks import PGDConfig, pgd_attack
from deqguard.attacks.apgd import ServedSurrogate, SolverGradSurrogate
from deqguard.configs import SolverConfig
from deqguard.cpu_memory import retain_freed_memory
from deqguard.defense import DefenseParams
from deqguard.models import MDEQClassifier, prepare_for_inference
from training.history import add_history_arguments, history_images, run_checkpoints

__all__ = ["main", "robust_accuracies"]


def robust_accuracies(
    model: MDEQClassifier,
    images: Tensor,
    labels: Tensor,
    solver: SolverConfig,
    *,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """Clean, PGD-10 (unrolled gradient) and PGD-10 (solver gradient) accuracy of the served
    prediction at z[N] on ``images`` [n, 3, 32, 32] in [0, 1], eps 8/255, step 2/255, one
    random start (the same start for both gradients), best iterate kept."""
    steps = solver.max_steps
    unrolled = ServedSurrogate(model, DefenseParams(R=0), solver, steps=steps, ka=5)
    exact = SolverGradSurrogate(model, solver, steps=steps)
    cfg = PGDConfig(eps=8 / 255, steps=10, step_size=2 / 255)
    hits = {"clean": 0, "pgd10_unrolled": 0, "pgd10_solver": 0}
    for start in range(0, len(labels), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        with torch.no_grad():
            hits["clean"] += int((unrolled(x).argmax(1) == y).sum())
        for key, surrogate in (("pgd10_unrolled", unrolled), ("pgd10_solver", exact)):
            gen = torch.Generator().manual_seed(seed + start)
            hits[key] += int(pgd_attack(surrogate, x, y, cfg, generator=gen).correct.sum())
    return {k: round(v / len(labels), 4) for k, v in hits.items()}


def _key(record: dict[str, Any]) -> tuple[str, str, int, int]:
    return record["run"], record["weights"], int(record["step"]), int(record["n"])


def reusable_records(path: Path | None) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """An earlier history's records by (run, weights label, step, n); measured ones only (a
    record that was itself reused keeps pointing at where it was measured)."""
    if path is None or not path.exists():
        return {}
    return {_key(r): r for r in json.loads(path.read_text())}


def plot_records(records: list[dict[str, Any]], out: Path) -> Path:
    """Per run: clean and both PGD-10 accuracies against the step (star: selected weights)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, run in zip(axes, dict.fromkeys(r["run"] for r in records), strict=False):
        pts = sorted((r for r in records if r["run"] == run and r["weights"] != "best"),
                     key=lambda r: r["step"])  # fmt: skip
        steps = [r["step"] for r in pts]
        for key, style, label in (
            ("clean", "o-", "clean"),
            ("pgd10_unrolled", "s--", "PGD-10, unrolled gradient (selection-like)"),
            ("pgd10_solver", "^-", "PGD-10, solver's gradient"),
        ):
            (line,) = ax.plot(steps, [100 * r[key] for r in pts], style, label=label)
            for r in records:
                if r["run"] == run and r["weights"] == "best":
                    ax.plot([r["step"]], [100 * r[key]], "*", ms=13, color=line.get_color())
        ax.set_title(run, fontsize=9)
        ax.set_xlabel("training step (star: the validation-selected weights)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.robust_history", description=__doc__)
    add_history_arguments(p)
    p.add_argument("--no-history", action="store_true", help="only the current and best weights")
    p.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier --json: take its records of the same weights and --n instead of"
        " measuring them again (a missing file reuses nothing)",
    )
    args = p.parse_args(argv)
    images = history_images(p, args, plot_records)
    if images is None:
        return 0
    x, y = images
    retain_freed_memory()
    earlier = reusable_records(args.reuse)
    print(f"first {args.n} validation images; PGD-10 eps 8/255, best iterate, served z[N]\n")
    print("| run | weights | step | clean | PGD-10 unrolled | PGD-10 solver | s |")
    print("|---|---|---|---|---|---|---|")
    records = []
    with tempfile.TemporaryDirectory(prefix="deqguard-robust-history-") as snapshots:
        for run in args.runs:
            for c in run_checkpoints(run, Path(snapshots), history=not args.no_history):
                record: dict[str, Any] = {
                    "run": run.name, "weights": c.label, "step": c.step, "n": args.n
                }  # fmt: skip
                old = earlier.get(_key(record))
                t = time.process_time()
                if old is None:
                    acc = robust_accuracies(prepare_for_inference(c.model.eval()), x, y, c.solver)
                    record.update(acc)
                else:
                    record = {**old, "reused_from": old.get("reused_from", str(args.reuse))}
                cpu_s = "reused" if old is not None else round(time.process_time() - t)
                print(
                    f"| {run.name} | {c.label} | {c.step:,} | {100 * record['clean']:.1f}%"
                    f" | {100 * record['pgd10_unrolled']:.1f}%"
                    f" | {100 * record['pgd10_solver']:.1f}% | {cpu_s} |",
                    flush=True,
                )
                records.append(record)
                if args.json is not None:  # as it goes: a long run can be stopped
                    args.json.write_text(json.dumps(records, indent=1) + "\n")
    if args.plot is not None:
        plot_records(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
