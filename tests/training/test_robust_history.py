"""training.robust_history: PGD-10 along training under the unrolled and the solver's gradient.

Why: these figures say whether the selection metric (an unrolled-gradient PGD-10) measured
robustness along each campaign run; each must be the audits' own PGD-10 with that gradient.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deqguard.attacks import PGDConfig, pgd_attack
from deqguard.attacks.apgd import ServedSurrogate, SolverGradSurrogate
from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams
from deqguard.dynamics import deq_forward
from deqguard.models import build_model
from tests.training._git import git as _git
from training.checkpoint import write_best, write_state
from training.robust_history import main, robust_accuracies


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model("micro").eval()
    with torch.no_grad():
        m.classifier.weight.mul_(30)  # decisions far from uniform: attacks have work to do
    return m


def test_each_figure_is_that_gradients_pgd10_judged_by_the_served_prediction() -> None:
    model, solver = _model(0), SolverConfig(max_steps=4)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = deq_forward(model, x, solver, record=False).logits.argmax(1)
    y[:2] = (y[:2] + 1) % 10  # two images wrong from the start
    got = robust_accuracies(model, x, y, solver, batch_size=3, seed=5)
    assert got["clean"] == pytest.approx(4 / 6, abs=1e-4)
    cfg = PGDConfig(eps=8 / 255, steps=10, step_size=2 / 255)
    for key, surrogate in (
        ("pgd10_unrolled", ServedSurrogate(model, DefenseParams(R=0), solver, steps=4, ka=5)),
        ("pgd10_solver", SolverGradSurrogate(model, solver, steps=4)),
    ):
        hits = 0
        for start in (0, 3):  # the same batches and seeds
            gen = torch.Generator().manual_seed(5 + start)
            xs, ys = x[start : start + 3], y[start : start + 3]
            hits += int(pgd_attack(surrogate, xs, ys, cfg, generator=gen).correct.sum())
        assert got[key] == pytest.approx(hits / 6, abs=1e-4), key


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_history_covers_every_committed_state_and_the_selected_weights(tmp_path) -> None:
    run = tmp_path / "repo" / "training" / "state" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(
        json.dumps({"model": "micro", "dropout": 0.0, "solver": "broyden", "solver_steps": 3})
    )
    _git(tmp_path / "repo", "init", "-q")
    for step in (3, 5):
        weights = _model(step).state_dict()
        write_state(
            run,
            model_state=weights,
            optimizer_state={"state": {}, "param_groups": []},
            meta={"step": step},
        )
        if step == 3:
            write_best(run, weights, {"step": step})
        _git(tmp_path / "repo", "add", "-A")
        _git(tmp_path / "repo", "commit", "-qm", f"step {step}")
    out, png = tmp_path / "h.json", tmp_path / "h.png"
    assert main([str(run), "--n", "4", "--json", str(out), "--plot", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    records = json.loads(out.read_text())
    assert [(r["weights"].split(" @ ")[0], r["step"]) for r in records] == [
        ("state", 3),
        ("state", 5),
        ("best", 3),
    ]
    same = ("clean", "pgd10_unrolled", "pgd10_solver")
    assert [records[0][k] for k in same] == [records[2][k] for k in same]  # the same weights
    assert all(r["n"] == 4 and 0 <= r["pgd10_solver"] <= 1 for r in records)

    # --reuse: a record of the same run, weights, step and n is taken, not measured again
    # (a sentinel figure proves it); one that is missing, or of another n, is measured
    earlier = [dict(records[0], pgd10_solver=0.123), dict(records[1], n=8)]
    old = tmp_path / "earlier.json"
    old.write_text(json.dumps(earlier))
    again = tmp_path / "again.json"
    assert main([str(run), "--n", "4", "--json", str(again), "--reuse", str(old)]) == 0
    got = json.loads(again.read_text())
    assert got[0]["pgd10_solver"] == 0.123 and got[0]["reused_from"] == str(old)
    assert [{k: r[k] for k in (*same, "step")} for r in got[1:]] == [
        {k: r[k] for k in (*same, "step")} for r in records[1:]
    ]
    assert all("reused_from" not in r for r in got[1:])
