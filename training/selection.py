"""Which weights of a campaign run to export: the trainer's selection, unless its metric is masked.

Why: the trainer selects the validation snapshot with the best PGD-10 whose gradient is a few
damped steps from the N-step solution. Where the dynamics converge that is the served
prediction's gradient and the selection stands; the plain-TRADES run lost its fixed point, and
there that PGD-10 rose to 35-42% while PGD-10 on the served prediction's own gradient (through
the solver) fell to 9-14% (``training.robust_history``, docs/TRAINING.md). The rule, the same
for every run, on the robustness history's validation figures:

- the trainer's selection (``best``) stands unless its PGD-10 with the unrolled gradient exceeds
  its PGD-10 with the solver's gradient by more than ``MASKED_GAP`` (5 points: the selection
  metric does not measure the served prediction's robustness there);
- otherwise the candidate (every committed snapshot, the current state, ``best``) with the
  highest PGD-10 on the solver's gradient, ties broken by clean accuracy.

Usage::

    python -m training.selection training/state/campaign-micro-trades \
        --history docs/robust_history.json --write     # -> <run>/selection.json

``training.evaluate --weights selection`` then exports what ``selection.json`` names.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["MASKED_GAP", "SELECTION_JSON", "Selection", "choose", "main", "read_selection"]

MASKED_GAP = 0.05
SELECTION_JSON = "selection.json"


@dataclass(frozen=True)
class Selection:
    """The weights to export: ``best``, ``last`` or ``rev:<commit>`` (a committed state)."""

    weights: str
    step: int
    clean: float
    pgd10_unrolled: float
    pgd10_solver: float
    masked: bool  # the trainer's selection metric was masked on its weights
    n: int  # validation images of the figures
    reason: str


def _weights_of(label: str) -> str:
    """A robustness-history label -> the weights it names."""
    if label == "best":
        return "best"
    if label == "state (now)":
        return "last"
    if label.startswith("state @ "):
        return "rev:" + label.removeprefix("state @ ")
    raise ValueError(f"unknown weights label {label!r}")


def choose(records: list[dict[str, Any]], run: str) -> Selection:
    """The rule of the module docstring on ``run``'s records of a robustness history."""
    mine = [r for r in records if r["run"] == run]
    best = next((r for r in mine if r["weights"] == "best"), None)
    if best is None:
        raise ValueError(f"the history has no record of {run}'s selected weights ('best')")
    gap = best["pgd10_unrolled"] - best["pgd10_solver"]
    masked = gap > MASKED_GAP
    if not masked:
        pick = best
        reason = (
            f"the trainer's selection (step {best['step']:,}): its PGD-10 with the unrolled"
            f" gradient ({best['pgd10_unrolled']:.1%}) is within {MASKED_GAP:.0%} of the"
            f" solver's ({best['pgd10_solver']:.1%})"
        )
    else:
        pick = max(mine, key=lambda r: (r["pgd10_solver"], r["clean"]))
        reason = (
            f"the trainer's selection (step {best['step']:,}) is masked: PGD-10"
            f" {best['pgd10_unrolled']:.1%} with the unrolled gradient, {best['pgd10_solver']:.1%}"
            f" with the solver's; the highest PGD-10 with the solver's gradient of {len(mine)}"
            f" candidates is step {pick['step']:,} ({pick['pgd10_solver']:.1%},"
            f" clean {pick['clean']:.1%})"
        )
    return Selection(
        weights=_weights_of(pick["weights"]),
        step=int(pick["step"]),
        clean=pick["clean"],
        pgd10_unrolled=pick["pgd10_unrolled"],
        pgd10_solver=pick["pgd10_solver"],
        masked=masked,
        n=int(pick["n"]),
        reason=reason,
    )


def read_selection(run_dir: Path) -> dict[str, Any]:
    """The run's ``selection.json`` (written by ``--write``)."""
    path = run_dir / SELECTION_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run python -m training.selection first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.selection", description=__doc__)
    p.add_argument("run", type=Path, help="run directory (training/state/<name>)")
    p.add_argument("--history", type=Path, required=True, help="training.robust_history JSON")
    p.add_argument("--write", action="store_true", help=f"write <run>/{SELECTION_JSON}")
    args = p.parse_args(argv)
    records = json.loads(args.history.read_text())
    try:
        sel = choose(records, args.run.name)
    except ValueError as exc:
        print(f"training.selection: {exc}", file=sys.stderr)
        return 2
    out = {**asdict(sel), "rule": f"training.selection (MASKED_GAP {MASKED_GAP})",
           "history": str(args.history)}  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.write:
        (args.run / SELECTION_JSON).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
