"""What the per-checkpoint histories share (``training.convergence``, ``training.robust_history``):
the checkpoints of a run they walk, and their command line's common part.

Why one place: both measure every committed snapshot of a run, its current state and the
trainer's selection on the first n validation images, and both redraw a plot from their JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.configs import SolverConfig
from deqguard.data import load_cifar10, train_val_split
from deqguard.models import MDEQClassifier
from training.checkpoint import BEST_JSON, BEST_WEIGHTS, STATE_JSON, STATE_WEIGHTS
from training.evaluate import load_run_model
from training.snapshots import committed_snapshots

__all__ = ["Checkpoint", "add_history_arguments", "history_images", "run_checkpoints"]


@dataclass(frozen=True)
class Checkpoint:
    """One set of weights of a run: ``label`` is ``state @ <commit>``, ``state (now)`` or
    ``best``; ``solver`` is the run's training solver (its N)."""

    label: str
    model: MDEQClassifier
    step: int
    solver: SolverConfig


def _load(run_dir: Path, which: str) -> tuple[MDEQClassifier, int, SolverConfig]:
    cfg = json.loads((run_dir / "config.json").read_text())
    model, meta = load_run_model(run_dir, which)
    solver = SolverConfig(name=cfg["solver"], max_steps=int(cfg["solver_steps"]))
    return model, int(meta["step"]), solver


def run_checkpoints(run_dir: Path, into: Path, *, history: bool = True) -> Iterator[Checkpoint]:
    """Every committed state of the run (oldest first; with ``history``, extracted under
    ``into``), its current state and the trainer's selection; a current state that is its
    last commit's is not repeated."""
    points: list[tuple[str, Path, str]] = []
    if history:
        points += [(f"state @ {rev}", d, "last") for rev, d in committed_snapshots(run_dir, into)]
    points += [("state (now)", run_dir, "last"), ("best", run_dir, "best")]
    seen: set[tuple[int, str]] = set()
    for label, where, which in points:
        model, step, solver = _load(where, which)
        if (step, which) in seen:
            continue
        seen.add((step, which))
        yield Checkpoint(label, model, step, solver)


def add_history_arguments(p: argparse.ArgumentParser) -> None:
    """The run directories, --n, --threads, --json, --plot and --from-json."""
    p.add_argument("runs", nargs="*", type=Path, help="run directories (training/state/<name>)")
    p.add_argument("--n", type=int, default=256, help="first n validation images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.add_argument("--plot", type=Path, default=None, help="draw them into this PNG")
    p.add_argument("--from-json", type=Path, default=None, help="only redraw --plot from a --json")


def history_images(
    p: argparse.ArgumentParser,
    args: argparse.Namespace,
    plot: Callable[[list[dict[str, Any]], Path], Path],
) -> tuple[Tensor, Tensor] | None:
    """The common start of a history: with --from-json only redraw the plot (None); else check
    the runs, set the threads and return the first n validation images and labels."""
    if args.from_json is not None:
        if args.plot is None:
            p.error("--from-json needs --plot")
        plot(json.loads(args.from_json.read_text()), args.plot)
        return None
    if not args.runs:
        p.error("name at least one run directory")
    for run in args.runs:
        if not (run / BEST_JSON).exists() and not (run / STATE_JSON).exists():
            p.error(f"'{run}' holds no checkpoint ({BEST_WEIGHTS} or {STATE_WEIGHTS})")
    torch.set_num_threads(args.threads)
    _, val = train_val_split(load_cifar10(train=True))
    val = val.head(args.n)
    return val.float_images(), val.labels
