"""training.selection and the weights it names: the trainer's selection stands unless its
metric is masked, and ``training.evaluate`` loads exactly the committed state chosen.

Why: the exported model of each campaign run is chosen this way; a rule that kept masked
weights, or loaded another snapshot than it named, would ship the wrong model silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deqguard.models import build_model
from tests.training._git import git as _git
from training.checkpoint import write_best, write_state
from training.evaluate import load_run_model
from training.selection import MASKED_GAP, choose, main
from training.snapshots import committed_revisions


def _rec(weights: str, step: int, clean: float, unrolled: float, solver: float) -> dict:
    return {"run": "r", "weights": weights, "step": step, "n": 256, "clean": clean,
            "pgd10_unrolled": unrolled, "pgd10_solver": solver}  # fmt: skip


def test_the_trainers_selection_stands_unless_its_metric_is_masked() -> None:
    history = [
        _rec("state @ aaaaaaa", 100, 0.60, 0.30, 0.26),
        _rec("state @ bbbbbbb", 200, 0.62, 0.31, 0.26),  # tie on PGD: the higher clean wins
        _rec("state (now)", 300, 0.66, 0.40, 0.10),
    ]
    kept = choose([*history, _rec("best", 250, 0.65, 0.35, 0.35 - MASKED_GAP + 0.01)], "r")
    assert (kept.weights, kept.step, kept.masked) == ("best", 250, False)
    masked = choose([*history, _rec("best", 250, 0.65, 0.40, 0.12)], "r")
    assert (masked.weights, masked.step, masked.masked) == ("rev:bbbbbbb", 200, True)
    assert "masked" in masked.reason and "200" in masked.reason
    latest = choose([*history[:2], _rec("state (now)", 300, 0.6, 0.4, 0.3),
                     _rec("best", 250, 0.65, 0.40, 0.12)], "r")  # fmt: skip
    assert latest.weights == "last"
    with pytest.raises(ValueError, match="selected weights"):
        choose(history, "r")


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_evaluate_loads_the_committed_state_the_selection_names(tmp_path: Path) -> None:
    run = tmp_path / "repo" / "training" / "state" / "r"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": "micro", "dropout": 0.0}))
    _git(tmp_path / "repo", "init", "-q")
    states = {}
    for step in (3, 5):
        torch.manual_seed(step)
        states[step] = build_model("micro").state_dict()
        meta = {"step": step}
        write_state(run, model_state=states[step], optimizer_state={"state": {}, "param_groups": []},
                    meta=meta)  # fmt: skip
        if step == 5:
            write_best(run, states[step], meta)
        _git(tmp_path / "repo", "add", "-A")
        _git(tmp_path / "repo", "commit", "-qm", f"step {step}")
    first = committed_revisions(run)[0]  # the state at step 3
    model, meta = load_run_model(run, f"rev:{first[:7]}")
    assert meta["step"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[3][k]), k
    history = tmp_path / "h.json"
    history.write_text(json.dumps([
        {"run": "r", "weights": f"state @ {first[:7]}", "step": 3, "n": 4, "clean": 0.5,
         "pgd10_unrolled": 0.3, "pgd10_solver": 0.3},
        {"run": "r", "weights": "best", "step": 5, "n": 4, "clean": 0.6,
         "pgd10_unrolled": 0.4, "pgd10_solver": 0.1},
    ]))  # fmt: skip
    assert main([str(run), "--history", str(history), "--write"]) == 0
    assert json.loads((run / "selection.json").read_text())["weights"] == f"rev:{first[:7]}"
    _, meta = load_run_model(run, "selection")
    assert meta["step"] == 3
    with pytest.raises(ValueError, match="weights must be"):
        load_run_model(run, "newest")


def test_an_export_carries_the_validation_figures_it_was_chosen_on(tmp_path: Path) -> None:
    from training.evaluate import _selection_text, _validation_metrics

    sel = {"weights": "rev:abc1234", "step": 3, "clean": 0.6, "pgd10_unrolled": 0.3,
           "pgd10_solver": 0.25, "n": 256, "rule": "training.selection (MASKED_GAP 0.05)",
           "reason": "the trainer's selection is masked"}  # fmt: skip
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    got = _validation_metrics("selection", tmp_path, {})
    assert got == {"val_clean_acc": 0.6, "val_pgd10_acc": 0.3, "val_pgd10_solver_acc": 0.25,
                   "val_n_images": 256}  # fmt: skip
    assert _validation_metrics("last", tmp_path, {"step": 9}) == {}  # no NaN in a manifest
    assert _validation_metrics("best", tmp_path, {"val_pgd": 0.3, "val_clean": 0.6}) == {
        "val_pgd10_acc": 0.3,
        "val_clean_acc": 0.6,
    }
    text = _selection_text("selection", tmp_path, {"val_samples": 500})
    assert "masked" in text and "rev:abc1234" in text
