"""How close a run's solver gets to a fixed point, and how accurate each state on the way is.

Why: the served prediction is the head at z[N]; it means what a DEQ promises (a fixed point of
f, which more solver steps would not change) only if the dynamics converge, and the paper's
Sec. 3.3 loss claims to make every intermediate state accurate. Both are measured in seconds on
clean validation images (never the test set), for a run's current state, its validation-selected
weights and, with ``--history``, every snapshot of its state committed to git (one per session),
so the two campaign runs can be compared along their training.

Usage::

    python -m training.convergence training/state/campaign-micro-trades \
        training/state/campaign-micro-trades-ri --history --n 256 --json docs/convergence.json

Per checkpoint: accuracy at every solver step z[1..N] (Broyden, the run's N), the relative
residual ||f(z) - z|| / ||f(z)|| at z[N] (median, 90th percentile, fraction under the solver's
tolerance), and after ``--long-steps`` steps (does a fixed point exist, and does the prediction
change past N?).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.configs import SolverConfig
from deqguard.dynamics import deq_forward
from deqguard.models import MDEQClassifier
from training.history import add_history_arguments, history_images, run_checkpoints

__all__ = ["DynamicsStats", "dynamics_stats", "main", "plot_records"]


@dataclass(frozen=True)
class DynamicsStats:
    """Clean-image dynamics of one checkpoint (fractions in [0, 1]).

    step_acc[t] is the accuracy of the head at z[t + 1], t = 0..N-1 (step_acc[-1] is the served
    prediction's); residual_* are relative residuals at z[N]; long_* after ``long_steps``.
    """

    n: int
    steps: int
    step_acc: list[float]
    residual_median: float
    residual_p90: float
    converged: float
    long_steps: int
    long_acc: float
    long_residual_median: float
    long_agreement: float  # fraction whose prediction at z[long_steps] equals the one at z[N]


def dynamics_stats(
    model: MDEQClassifier,
    images: Tensor,
    labels: Tensor,
    solver: SolverConfig,
    *,
    long_steps: int = 30,
    batch_size: int = 128,
) -> DynamicsStats:
    """Solve every batch of ``images`` [B, 3, 32, 32] (in [0, 1]) for N and ``long_steps`` steps."""
    model.eval()
    accs, residuals, long_res, long_hits, agree = [], [], [], [], []
    long_solver = SolverConfig(**{**asdict(solver), "max_steps": long_steps})
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
            short = deq_forward(model, x, solver)
            assert short.step_logits is not None and short.residuals is not None
            accs.append((short.step_logits.argmax(-1) == y).float().sum(1))  # [N]
            residuals.append(short.residuals[-1])
            long = deq_forward(model, x, long_solver, record=False)
            long_res.append(long.final_residual)
            pred = long.logits.argmax(-1)
            long_hits.append((pred == y).float().sum())
            agree.append((pred == short.logits.argmax(-1)).float().sum())
    n = len(images)
    res, lres = torch.cat(residuals), torch.cat(long_res)
    return DynamicsStats(
        n=n,
        steps=solver.max_steps,
        step_acc=[round(v / n, 4) for v in torch.stack(accs).sum(0).tolist()],
        residual_median=round(res.median().item(), 4),
        residual_p90=round(res.quantile(0.9).item(), 4),
        converged=round((res <= solver.tol).float().mean().item(), 4),
        long_steps=long_steps,
        long_acc=round(torch.stack(long_hits).sum().item() / n, 4),
        long_residual_median=round(lres.median().item(), 4),
        long_agreement=round(torch.stack(agree).sum().item() / n, 4),
    )


def _row(run: str, weights: str, step: int, s: DynamicsStats) -> str:
    acc = " / ".join(f"{100 * a:.1f}" for a in s.step_acc)
    return (
        f"| {run} | {weights} | {step:,} | {acc} | {s.residual_median:.3f} | {s.residual_p90:.3f}"
        f" | {100 * s.converged:.0f}% | {100 * s.long_acc:.1f}% | {s.long_residual_median:.3f}"
        f" | {100 * s.long_agreement:.1f}% |"
    )


def plot_records(records: list[dict[str, Any]], out: Path) -> Path:
    """Residual at z[N] and after the long solve (log scale), and the accuracy at z[N], against
    the training step, one line per run (the ``state`` points; ``best`` is marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in dict.fromkeys(r["run"] for r in records):
        pts = sorted(
            (r for r in records if r["run"] == run and r["weights"] != "best"),
            key=lambda r: r["step"],
        )
        steps = [r["step"] for r in pts]
        (line,) = top.plot(steps, [r["residual_median"] for r in pts], "o-", label=f"{run}, z[N]")
        top.plot(
            steps,
            [r["long_residual_median"] for r in pts],
            "x:",
            color=line.get_color(),
            label=f"{run}, after the long solve",
        )
        bottom.plot(
            steps, [100 * r["step_acc"][-1] for r in pts], "o-", color=line.get_color(), label=run
        )
        for r in records:
            if r["run"] == run and r["weights"] == "best":
                bottom.plot(
                    [r["step"]], [100 * r["step_acc"][-1]], "*", ms=12, color=line.get_color()
                )
    top.set_yscale("log")
    top.set_ylabel("median relative residual")
    top.legend(fontsize=7)
    bottom.set_ylabel("clean accuracy at z[N] (%)")
    bottom.set_xlabel("training step (star: the selected weights)")
    bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.convergence", description=__doc__)
    add_history_arguments(p)
    p.add_argument("--long-steps", type=int, default=30)
    p.add_argument("--history", action="store_true", help="also every committed state snapshot")
    args = p.parse_args(argv)
    images = history_images(p, args, plot_records)
    if images is None:
        return 0
    x, y = images
    print(
        f"first {args.n} validation images, clean; accuracy at z[1..N]; residual at z[N]"
        f" (median, p90, share under tol); after {args.long_steps} steps: accuracy, median"
        " residual, same prediction as z[N]\n"
    )
    print(
        "| run | weights | step | accuracy at z[1..N] (%) | res. median | res. p90 | converged"
        f" | acc. z[{args.long_steps}] | res. z[{args.long_steps}] | agrees |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    records = []
    with tempfile.TemporaryDirectory(prefix="deqguard-convergence-") as snapshots:
        for run in args.runs:
            for c in run_checkpoints(run, Path(snapshots), history=args.history):
                stats = dynamics_stats(c.model, x, y, c.solver, long_steps=args.long_steps)
                print(_row(run.name, c.label, c.step, stats), flush=True)
                records.append(
                    {"run": run.name, "weights": c.label, "step": c.step, **asdict(stats)}
                )
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    if args.plot is not None:
        plot_records(records, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
