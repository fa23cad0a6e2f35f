"""The ablation table: per-sample combination of several audits of one (model, defense)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deqguard.audit import AuditConfig, AuditRunner
from deqguard.audit.ablation import build_row, load_audit, main, markdown_table

PLANS = [  # (name, kind, grad, spec, budget)
    ("pgd-undefended", "pgd", "undefended", None, "PGD-10, 1 restart(s), best iterate per sample"),
    ("apgd-ce", "apgd-ce", "undefended", None, "APGD-CE 100 iterations, 1 restart(s)"),
    ("pgd-z2-Ka1-lam1", "pgd", "eq11", "z2-Ka1-lam1", "PGD-10, 1 restart(s), best iterate"),
    ("pgd-z1-Ka1-lam1", "pgd", "eq11", "z1-Ka1-lam1", "PGD-10, 1 restart(s), best iterate"),
    ("bpda-pgd", "pgd", "bpda", None, "PGD-50, 5 restart(s), best iterate per sample"),
]


def _write_state(
    root: Path,
    name: str,
    labels: list[int],
    clean: list[bool],
    correct: dict[str, list[bool]],
    batch_size: int = 2,
    n: int | None = None,
    sha: str = "abc",
    defense: dict | None = None,
    cascade: bool = False,
) -> Path:
    """A state.json as the audit runner writes it, with chosen per-sample outcomes."""
    plans = [p for p in PLANS if p[0] in correct]
    d = root / name
    d.mkdir()
    batches = {}
    for b, start in enumerate(range(0, len(labels), batch_size)):
        sl = slice(start, start + batch_size)
        batches[str(b)] = {
            "index": b,
            "labels": labels[sl],
            "clean_correct": clean[sl],
            "attacks": [{"correct": correct[p[0]][sl]} for p in plans],
        }
    cfg = {
        "n": len(labels) if n is None else n,
        "batch_size": batch_size,
        "steps": 2,
        "defense_params": defense or {"R": 10},
    }
    if cascade:
        cfg["cascade"] = True
    fp = {
        "config": cfg,
        "model": {"sha256": sha, "ref": "m@1"},
        "plans": [
            {"name": p[0], "kind": p[1], "grad": p[2], "spec": p[3], "budget": p[4]} for p in plans
        ],
    }
    (d / "state.json").write_text(json.dumps({"fingerprint": fp, "batches": batches}))
    return d


LABELS = [0, 1, 2, 3]
CLEAN = [True, True, True, False]


def test_row_takes_each_column_from_its_attacks_and_the_worst_case_per_sample(tmp_path) -> None:
    """Image 0 falls only to PGD-10, image 1 only to the intermediate attack, image 2 only to
    BPDA: each single column keeps 2 of 3, the worst case none."""
    a = _write_state(
        tmp_path,
        "a",
        LABELS,
        CLEAN,
        {
            "pgd-undefended": [False, True, True, False],
            "apgd-ce": [True, True, True, False],
            "pgd-z2-Ka1-lam1": [True, True, True, False],
            "pgd-z1-Ka1-lam1": [True, False, True, False],
        },
    )
    b = _write_state(tmp_path, "b", LABELS, CLEAN, {"bpda-pgd": [True, True, False, True]})
    row = build_row("r", [load_audit(a), load_audit(b)])
    got = {k: (c.correct, c.n) for k, c in row.cells.items()}
    assert got == {
        "clean": (3, 4),
        "pgd10": (2, 4),
        "autoattack": (3, 4),
        "intermediate": (2, 4),
        "adaptive": (2, 4),
        "worst": (0, 4),
    }
    assert row.cells["intermediate"].attack == "pgd-z1-Ka1-lam1"
    assert row.cells["adaptive"].attack == "bpda-pgd" and row.cells["adaptive"].audit == "b"
    # an image wrong on the clean input is never robust, whatever an attack record says
    assert load_audit(b).attacks[0].correct.tolist() == [True, True, False, False]
    table = markdown_table([row])
    assert "| r | 75.0% | 50.0% <sub>pgd-undefended</sub> |" in table
    assert "0.0% (0.0-49.0)" in table


def test_an_attack_on_fewer_images_counts_where_it_ran(tmp_path) -> None:
    full = _write_state(
        tmp_path, "full", LABELS, CLEAN, {"pgd-undefended": [True, True, True, False]}
    )
    first2 = _write_state(tmp_path, "first2", LABELS[:2], CLEAN[:2], {"bpda-pgd": [False, True]})
    row = build_row("r", [load_audit(full), load_audit(first2)])
    assert (row.cells["worst"].correct, row.cells["worst"].n) == (2, 4)
    assert (row.cells["adaptive"].correct, row.cells["adaptive"].n) == (1, 2)
    assert any("first2 (2 images)" in note for note in row.notes)


def test_audits_of_different_models_images_or_unfinished_are_refused(tmp_path) -> None:
    ok = load_audit(_write_state(tmp_path, "ok", LABELS, CLEAN, {"apgd-ce": CLEAN}))
    other = load_audit(_write_state(tmp_path, "o", LABELS, CLEAN, {"apgd-ce": CLEAN}, sha="x"))
    with pytest.raises(ValueError, match="another model"):
        build_row("r", [ok, other])
    shifted = load_audit(_write_state(tmp_path, "s", [1, 1, 2, 3], CLEAN, {"apgd-ce": CLEAN}))
    with pytest.raises(ValueError, match="other images"):
        build_row("r", [ok, shifted])
    unfinished = _write_state(tmp_path, "u", LABELS, CLEAN, {"apgd-ce": CLEAN}, n=8)
    with pytest.raises(ValueError, match="2 of 4 batches"):
        load_audit(unfinished)
    assert load_audit(unfinished, allow_partial=True).n == 4
    with pytest.raises(ValueError, match="no audit state"):
        load_audit(tmp_path / "missing")
    assert main(["--row", f"r={tmp_path / 'missing'}"]) == 2


def test_a_real_audit_state_gives_the_reports_worst_case(model, tmp_path) -> None:
    """The table read from a runner's state.json agrees with the runner's own report."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])
    cfg = AuditConfig(
        model="t", suite="quick", defense="off", n=4, batch_size=2, steps=2, pgd_steps=10,
        apgd_iters=2, sanity_images=0, attack_misclassified=True,
    )  # fmt: skip
    out = tmp_path / "audit"
    out.mkdir()
    report = AuditRunner(cfg, model=model, images=x, labels=y).run(state_path=out / "state.json")
    row = build_row("r", [load_audit(out)])
    assert row.cells["worst"].correct == report["worst_case"]["correct"]
    assert row.cells["clean"].correct == report["clean"]["correct"]
    by_name = {a["name"]: a["robust"]["correct"] for a in report["attacks"]}
    assert row.cells["pgd10"].correct == by_name["pgd-undefended"]
    json_path = tmp_path / "rows.json"
    assert main(["--row", f"r={out}", "--json", str(json_path)]) == 0
    assert json.loads(json_path.read_text())[0]["cells"]["worst"]["n"] == 4


def test_a_cascade_audit_counts_each_family_per_sample_not_its_cumulative_rows(tmp_path) -> None:
    """Under a cascade the grid's second attack only ran on the first one's survivors, so its
    row is cumulative (robust to both): it is not a single attack. The intermediate column then
    takes the family per sample (image 1 falls to z1, image 2 to z2: 1 of 3 robust), and the
    PGD-10 column only the family's first attack and the undefended PGD."""
    a = _write_state(
        tmp_path,
        "a",
        LABELS,
        CLEAN,
        {
            "pgd-undefended": [True, True, True, False],
            "pgd-z2-Ka1-lam1": [True, True, False, False],  # first of the family: a single
            "pgd-z1-Ka1-lam1": [True, False, False, False],  # cumulative: z2's and its own
        },
        cascade=True,
    )
    rec = load_audit(a)
    assert [o.cumulative for o in rec.attacks] == [False, False, True]
    row = build_row("r", [rec])
    inter = row.cells["intermediate"]
    assert (inter.correct, inter.n) == (1, 4) and "cascade" in inter.attack
    # PGD-10 at z[N] = z2 is the family's first attack: an exact single attack
    assert row.cells["pgd10"].correct == 2 and row.cells["pgd10"].attack == "pgd-z2-Ka1-lam1"
    assert row.cells["worst"].correct == 1


def test_a_batch_in_progress_is_not_a_finished_batch(tmp_path) -> None:
    d = _write_state(tmp_path, "a", LABELS, CLEAN, {"pgd-undefended": [True, False, True, False]})
    state = json.loads((d / "state.json").read_text())
    state["batches"]["1"]["partial"] = True  # the audit stopped during batch 1
    (d / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="1 of 2 batches done"):
        load_audit(d)
    assert load_audit(d, allow_partial=True).n == 2
