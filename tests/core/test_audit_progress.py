"""`deqguard audit-status`: an audit stopped mid-batch reads as such, and a finished one's
tallies are its report's clean and worst-case counts."""

from __future__ import annotations

import json

import pytest
import torch

from deqguard.audit import AuditCancelled, AuditConfig, AuditRunner
from deqguard.audit.progress import audit_progress, main
from tests.core.test_audit import _cfg as audit_cfg


def _cfg() -> AuditConfig:
    return audit_cfg(attack_misclassified=True)  # every image is attacked: every attack runs


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def test_progress_of_a_stopped_then_finished_audit(model, images, tmp_path, capsys) -> None:
    x, y = images
    state = tmp_path / "state.json"
    runner = AuditRunner(_cfg(), model=model, images=x, labels=y)
    attacks = len(runner.plans)
    polls = iter(range(1000))  # polled before each batch and each attack
    stop_at = 1 + attacks + 1 + 3  # as in test_audit.py: batch 0, then batch 1's first two attacks
    with pytest.raises(AuditCancelled):
        runner.run(
            should_cancel=lambda: next(polls) >= stop_at - 1,
            state_path=state,
            checkpoint_attacks=True,
            checkpoint_every_s=0.0,
        )
    saved = json.loads(state.read_text())
    first = saved["batches"]["0"]
    prog = audit_progress(tmp_path)
    assert (prog.batches_done, prog.batches_total, prog.attacks_total) == (1, 2, attacks)
    assert prog.partial_attacks == 2 and not prog.finished
    assert prog.samples == 2 and prog.clean_correct == sum(first["clean_correct"])
    assert prog.hours_left == pytest.approx(saved["compute_s"] / 3600)  # one batch, one to go
    assert "batch 1 of 2 done (the next: 2 of" in prog.line()

    report = AuditRunner(_cfg(), model=model, images=x, labels=y).run(state_path=state)
    prog = audit_progress(tmp_path)
    assert prog.finished and prog.hours_left == 0.0 and prog.partial_attacks == 0
    assert (prog.samples, prog.clean_correct, prog.worst_correct) == (
        report["n"],
        report["clean"]["correct"],
        report["worst_case"]["correct"],
    )
    assert main([str(tmp_path), "--unfinished"]) == 0 and capsys.readouterr().out == ""
    assert main([str(tmp_path)]) == 0 and "finished (2 batch(es))" in capsys.readouterr().out


def test_a_superseded_audit_says_why_and_is_not_listed_as_to_run(tmp_path, capsys) -> None:
    fp = {"config": {"n": 10, "batch_size": 5}, "plans": [{}, {}]}
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": fp, "batches": {}}))
    assert main([str(tmp_path), "--unfinished"]) == 0 and "batch 0 of 2" in capsys.readouterr().out
    (tmp_path / "SUPERSEDED").write_text("replaced by\n  x-solver\n")
    prog = audit_progress(tmp_path)
    assert prog.superseded == "replaced by x-solver" and not prog.finished
    assert "superseded after 0 of 2 batches (replaced by x-solver)" in prog.line()
    assert main([str(tmp_path), "--unfinished"]) == 0 and capsys.readouterr().out == ""


def test_a_directory_without_an_audit_state_is_named(tmp_path, capsys) -> None:
    (tmp_path / "state.json").write_text('{"batches": {}}')
    with pytest.raises(ValueError, match="not an audit's state"):
        audit_progress(tmp_path)
    assert main([str(tmp_path)]) == 1
    assert "state.json: not an audit's state" in capsys.readouterr().err
    assert main([str(tmp_path / "none"), "--quiet"]) == 0
