"""The paper's Table 1 in miniature: one row per (model, defense), built from the per-sample
records of every audit of that row.

Why per sample: a row's worst case counts an image as robust only when it survives every attack
of every audit of that row (a quick, a paper and an adaptive audit, say), which no single report
can say. So the rows are built from each audit's ``state.json`` (its fingerprint names the
config and the attacks; its batch records hold each attack's per-image outcome), not from the
reports' summary numbers.

Columns (each an accuracy on the row's images, judged by the prediction the service returns):

- ``clean``: right on the clean image;
- ``pgd10``: the strongest PGD-10 on the final state (the straight-through served surrogate, or
  an Eq. 11 surrogate started at z[N]);
- ``autoattack``: per sample over AutoAttack's attacks on non-adaptive gradients (APGD-CE and
  APGD-T on the undefended served prediction, the paper suite's AutoAttack through the strongest
  Eq. 11 surrogate); with the defense on they are transfer attacks;
- ``intermediate``: the strongest single Eq. 11 attack (PGD on an intermediate state);
- ``adaptive``: the strongest single attack that knows the defense (BPDA, exact derivative,
  Square end to end, transfer from another model);
- ``worst``: per sample over everything run.

An attack that ran on fewer images (Square on the first 200, say) counts on the images it
covered; the row says so.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.attacks import IntermediateSpec
from deqguard.audit.config import attack_family
from deqguard.audit.report import wilson_interval

__all__ = [
    "COLUMNS",
    "AblationRow",
    "AttackOutcome",
    "AuditRecords",
    "Cell",
    "build_row",
    "columns_of",
    "load_audit",
    "markdown_table",
    "main",
]

COLUMNS: tuple[str, ...] = ("clean", "pgd10", "autoattack", "intermediate", "adaptive", "worst")
_HEADERS = {
    "clean": "clean",
    "pgd10": "PGD-10 (final state)",
    "autoattack": "AutoAttack (APGD-CE, APGD-T, ...)",
    "intermediate": "strongest intermediate-state attack",
    "adaptive": "strongest adaptive attack",
    "worst": "per-sample worst case (95% CI)",
}
_SINGLE_ATTACK = ("pgd10", "intermediate", "adaptive")  # a column of its strongest attack
_FAMILY_COLUMNS = ("intermediate", "adaptive")  # one attack family each (attack_family)


@dataclass(frozen=True)
class AttackOutcome:
    """One attack of one audit: ``correct`` [n] (bool) over the audit's first n images."""

    audit: str
    name: str
    kind: str
    grad: str
    spec: str | None
    budget: str
    correct: Tensor
    cumulative: bool = False  # a cascade's later attack of its family: robust to it and all before


@dataclass(frozen=True)
class AuditRecords:
    """One audit directory's per-sample records (complete batches only, from image 0).

    Shapes: ``labels`` [n] (int64), ``clean`` [n] (bool); each attack's ``correct`` [n].
    """

    path: Path
    model_sha256: str
    defense: dict[str, Any]
    steps: int
    labels: Tensor
    clean: Tensor
    attacks: list[AttackOutcome]

    @property
    def n(self) -> int:
        return int(self.labels.numel())


def load_audit(path: str | Path, allow_partial: bool = False) -> AuditRecords:
    """The records of the audit in directory ``path`` (its ``state.json``).

    Raises ValueError naming the problem when the state is missing, is not a schema-2 audit,
    has a gap in its batches, or (unless ``allow_partial``) has not finished.
    """
    path = Path(path)
    state_path = path / "state.json"
    if not state_path.is_file():
        raise ValueError(f"{state_path}: no audit state (run the audit first)")
    state = json.loads(state_path.read_text())
    fp = state.get("fingerprint") or {}
    cfg, plans, model = fp.get("config"), fp.get("plans"), fp.get("model") or {}
    if not cfg or not plans or any("grad" not in p for p in plans):
        raise ValueError(f"{state_path}: not a schema-2 audit state (no attack gradients)")
    batches = {int(k): v for k, v in state["batches"].items() if not v.get("partial")}
    count = len(batches)
    if sorted(batches) != list(range(count)):
        raise ValueError(f"{state_path}: batches {sorted(batches)} are not 0..{count - 1}")
    expected = -(-int(cfg["n"]) // int(cfg["batch_size"]))
    if count < expected and not allow_partial:
        raise ValueError(f"{state_path}: {count} of {expected} batches done (unfinished audit)")
    if count == 0:
        raise ValueError(f"{state_path}: no batch finished yet")
    records = [batches[i] for i in range(count)]
    labels = torch.tensor([y for r in records for y in r["labels"]], dtype=torch.long)
    clean = torch.tensor([bool(c) for r in records for c in r["clean_correct"]])
    cascade = bool(cfg.get("cascade", False))
    seen: set[str] = set()
    attacks = []
    for a, plan in enumerate(plans):
        family = attack_family(plan["kind"], plan["grad"])
        attacks.append(
            AttackOutcome(
                audit=path.name,
                name=plan["name"],
                kind=plan["kind"],
                grad=plan["grad"],
                spec=plan.get("spec"),
                budget=plan.get("budget", ""),
                correct=torch.tensor([bool(c) for r in records for c in r["attacks"][a]["correct"]])
                & clean,
                cumulative=cascade and family in seen,
            )
        )
        seen.add(family)
    return AuditRecords(
        path=path,
        model_sha256=str(model.get("sha256", "")),
        defense=dict(cfg.get("defense_params") or {}),
        steps=int(cfg["steps"]),
        labels=labels,
        clean=clean,
        attacks=attacks,
    )


def columns_of(attack: AttackOutcome, steps: int) -> tuple[str, ...]:
    """The single-attack columns an attack counts in besides ``worst`` (PGD-10 on an Eq. 11
    surrogate at z[N] is also an intermediate-state attack)."""
    family = attack_family(attack.kind, attack.grad)
    if family in ("adaptive", "autoattack"):
        return (family,)
    if attack.kind != "pgd":
        return ()
    final = attack.grad in ("undefended", "solver") or (
        attack.spec is not None and IntermediateSpec.parse(attack.spec).i == steps
    )
    cols = ("pgd10",) if final and attack.budget.startswith("PGD-10,") else ()
    return cols + (("intermediate",) if attack.grad == "eq11" else ())


@dataclass(frozen=True)
class Cell:
    """One table cell: ``correct`` of ``n`` images, and the attack(s) behind it."""

    correct: int
    n: int
    attack: str = ""
    audit: str = ""

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson_interval(self.correct, self.n)
        return {
            "correct": self.correct,
            "n": self.n,
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "attack": self.attack,
            "audit": self.audit,
        }


@dataclass(frozen=True)
class AblationRow:
    """One (model, defense) row: its cells by column (absent: no attack of that column ran)."""

    label: str
    audits: list[str]
    cells: dict[str, Cell]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "audits": self.audits,
            "cells": {k: c.to_dict() for k, c in self.cells.items()},
            "notes": self.notes,
        }


def _strongest(attacks: list[AttackOutcome]) -> Cell | None:
    """The single attack with the fewest robust images (on the images it covered)."""
    if not attacks:
        return None
    best = min(attacks, key=lambda a: (int(a.correct.sum()), -a.correct.numel()))
    return Cell(int(best.correct.sum()), int(best.correct.numel()), best.name, best.audit)


def _per_sample(attacks: list[AttackOutcome], clean: Tensor, what: str) -> Cell | None:
    """Per sample over ``attacks`` on the row's images [n]: robust when right on the clean
    image and under every attack that covered it."""
    if not attacks:
        return None
    robust = clean.clone()
    for a in attacks:
        robust[: a.correct.numel()] &= a.correct
    return Cell(int(robust.sum()), int(robust.numel()), what)


def build_row(label: str, audits: Sequence[AuditRecords]) -> AblationRow:
    """Combine the audits of one (model, defense) into a row.

    Raises ValueError when the audits do not describe the same model, defense, solver steps
    and images (their labels must agree where they overlap).
    """
    if not audits:
        raise ValueError(f"row {label!r}: no audits")
    first = audits[0]
    for a in audits[1:]:
        for what, mine, theirs in (
            ("model", a.model_sha256, first.model_sha256),
            ("defense", a.defense, first.defense),
            ("solver steps", a.steps, first.steps),
        ):
            if mine != theirs:
                raise ValueError(
                    f"row {label!r}: {a.path.name} has another {what} than {first.path.name}"
                )
    n = max(a.n for a in audits)
    labels = torch.full((n,), -1, dtype=torch.long)
    clean = torch.ones(n, dtype=torch.bool)
    covered = torch.zeros(n, dtype=torch.bool)
    disagreements = 0
    for a in audits:
        m = a.n
        seen = covered[:m]
        if bool((labels[:m][seen] != a.labels[seen]).any()):
            raise ValueError(f"row {label!r}: {a.path.name} audits other images")
        disagreements += int((clean[:m][seen] != a.clean[seen]).sum())
        labels[:m] = a.labels
        clean[:m] &= a.clean
        covered[:m] = True
    attacks = [o for a in audits for o in a.attacks]
    by_column: dict[str, list[AttackOutcome]] = {c: [] for c in COLUMNS}
    for o in attacks:
        for col in columns_of(o, first.steps):
            by_column[col].append(o)
    cells: dict[str, Cell] = {"clean": Cell(int(clean.sum()), n, "")}
    for col in _SINGLE_ATTACK:
        # a cascade's later attacks are cumulative, not single attacks: their family counts
        # instead, per sample over all its attacks of that audit (at least as strong a claim)
        candidates = [c for c in [_strongest([o for o in by_column[col] if not o.cumulative])] if c]
        if col in _FAMILY_COLUMNS:
            for audit in {o.audit for o in by_column[col] if o.cumulative}:
                members = [o for o in by_column[col] if o.audit == audit]
                covered = clean[: members[0].correct.numel()]  # the images that audit covered
                what = f"per sample over its {len(members)} attacks (cascade)"
                cell = _per_sample(members, covered, what)
                assert cell is not None
                candidates.append(replace(cell, audit=audit))
        if candidates:
            cells[col] = min(candidates, key=lambda c: (c.correct, -c.n))
    aa = _per_sample(by_column["autoattack"], clean, "per sample over its attacks")
    if aa is not None:
        cells["autoattack"] = aa
    worst = _per_sample(attacks, clean, f"per sample over {len(attacks)} attacks")
    if worst is not None:
        cells["worst"] = worst
    notes = []
    if disagreements:
        notes.append(
            f"{disagreements} clean decision(s) differ between audits (float rounding at the"
            " decision boundary); such an image counts as wrong"
        )
    short = sorted(
        {f"{o.audit} ({o.correct.numel()} images)" for o in attacks if o.correct.numel() < n}
    )
    if short:
        notes.append(
            "attacks of " + ", ".join(short) + f" cover fewer than the row's {n} images and"
            " count on the images they covered"
        )
    return AblationRow(label, [str(a.path) for a in audits], cells, notes)


def _pct(cell: Cell | None, with_ci: bool = False, with_attack: bool = True) -> str:
    if cell is None:
        return "-"
    text = f"{100 * cell.accuracy:.1f}%"
    if with_ci:
        lo, hi = wilson_interval(cell.correct, cell.n)
        text += f" ({100 * lo:.1f}-{100 * hi:.1f})"
    if with_attack and cell.attack:
        text += f" <sub>{cell.attack}</sub>"
    return text


def markdown_table(rows: Sequence[AblationRow]) -> str:
    """The rows as a Markdown table, with the rows' notes below it."""
    head = "| row | " + " | ".join(_HEADERS[c] for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [
            _pct(r.cells.get(c), with_ci=c == "worst", with_attack=c in _SINGLE_ATTACK)
            for c in COLUMNS
        ]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    for r in rows:
        lines += [f"\n{r.label}: " + "; ".join(r.notes) + "."] if r.notes else []
    return "\n".join(lines) + "\n"


def _row_arg(text: str) -> tuple[str, list[str]]:
    label, sep, dirs = text.partition("=")
    if not sep or not label.strip() or not dirs.strip():
        raise argparse.ArgumentTypeError(f"expected LABEL=DIR[,DIR...], got {text!r}")
    return label.strip(), [d for d in (s.strip() for s in dirs.split(",")) if d]


def main(argv: Sequence[str] | None = None) -> int:
    """`deqguard audit-table --row "TRADES, off=docs/audits/a,docs/audits/b" ...`: print the
    table (Markdown); ``--json`` also writes the rows as JSON."""
    p = argparse.ArgumentParser(prog="deqguard audit-table", description=__doc__.splitlines()[0])
    p.add_argument("--row", action="append", type=_row_arg, required=True, metavar="LABEL=DIRS")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument(
        "--allow-partial", action="store_true", help="use unfinished audits' finished batches"
    )
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        rows = [
            build_row(label, [load_audit(d, args.allow_partial) for d in dirs])
            for label, dirs in args.row
        ]
    except ValueError as exc:
        print(f"deqguard audit-table: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(rows), end="")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
