"""training.convergence: the dynamics figures of a checkpoint, and its committed history.

Why: these figures go into the model card next to the ablation (does the solver reach a fixed
point, and is each state accurate?); the residual and the served accuracy are recomputed here
from the model's own cell and head, not from the solver's record.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deqguard.configs import SolverConfig
from deqguard.data import load_test
from deqguard.dynamics import deq_forward
from deqguard.models import build_model
from deqguard.store import default_store_root, load_entry
from tests.training._git import git as _git
from training.checkpoint import write_best, write_state
from training.convergence import dynamics_stats, main


def test_stats_match_the_models_own_residual_and_served_accuracy() -> None:
    model = load_entry(default_store_root(), "micro-trades-ri").model
    test = load_test(n=24)
    x, y = test.float_images(), test.labels
    solver = SolverConfig(max_steps=8)
    stats = dynamics_stats(model, x, y, solver, long_steps=8, batch_size=8)
    with torch.no_grad():
        z = deq_forward(model, x, solver, record=False).state  # z[8], what the service reads
        fz = model.cell(z, model.inject(x))
        residual = (fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)
        served = (model.head(z).argmax(-1) == y).float().mean().item()
    assert stats.n == 24 and stats.steps == 8 and len(stats.step_acc) == 8
    assert stats.step_acc[-1] == pytest.approx(served, abs=1e-4)
    assert stats.residual_median == pytest.approx(residual.median().item(), abs=2e-4)
    assert stats.converged == pytest.approx((residual <= solver.tol).float().mean().item())
    # as many long steps as N: the same solve, the same figures
    assert stats.long_agreement == 1.0 and stats.long_acc == pytest.approx(served, abs=1e-4)
    assert stats.long_residual_median == pytest.approx(stats.residual_median, abs=2e-4)
    # batching changes nothing (per-sample dynamics)
    assert dynamics_stats(model, x, y, solver, long_steps=8, batch_size=24) == stats


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_history_reads_every_committed_state(tmp_path: Path) -> None:
    run = tmp_path / "repo" / "training" / "state" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"model": "micro", "dropout": 0.0, "solver": "broyden", "solver_steps": 4})
    )
    _git(tmp_path / "repo", "init", "-q")
    for step in (7, 9):
        torch.manual_seed(step)
        weights = build_model("micro").state_dict()
        write_state(
            run,
            model_state=weights,
            optimizer_state={"state": {}, "param_groups": []},
            meta={"step": step},
        )
        if step == 7:
            write_best(run, weights, {"step": step})
        _git(tmp_path / "repo", "add", "-A")
        _git(tmp_path / "repo", "commit", "-qm", f"step {step}")
    out = tmp_path / "c.json"
    argv = [str(run), "--history", "--n", "6", "--long-steps", "5", "--json", str(out)]
    assert main([*argv, "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--from-json", str(out), "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    records = json.loads(out.read_text())
    # both commits, oldest first; the working tree's state is the last commit's (not repeated)
    assert [(r["weights"].split(" @ ")[0], r["step"]) for r in records] == [
        ("state", 7),
        ("state", 9),
        ("best", 7),
    ]
    assert records[0]["step_acc"] == records[2]["step_acc"]  # the same weights, the same figures
    assert all(r["n"] == 6 and r["steps"] == 4 and r["long_steps"] == 5 for r in records)
