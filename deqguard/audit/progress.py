"""How far a resumable audit has got, read from its directory alone (``state.json``).

Why: the campaign's audits run for hours across sessions; whoever plans the next session needs
each one's batches done, the attacks done in the batch in progress, the compute spent and a
rough time to go, without loading the model. A directory holding a ``SUPERSEDED`` file (its
text says why) is an audit that will not be resumed. The running tallies are over finished batches
only and are a progress view, not a claim: an audit's figures are its ``report.json``.

    deqguard audit-status docs/audits/*/
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deqguard.audit.store import batch_counts

__all__ = ["AuditProgress", "audit_progress", "main"]


@dataclass(frozen=True)
class AuditProgress:
    """One audit directory's state. ``partial_attacks``: attacks finished in the batch in
    progress (0 when none is saved mid-way); ``hours_left``: finished batches' mean compute
    times the batches left (None before the first batch finishes)."""

    name: str
    batches_done: int
    batches_total: int
    attacks_total: int
    partial_attacks: int
    compute_s: float
    samples: int
    clean_correct: int
    worst_correct: int
    superseded: str | None = None  # why, from the directory's SUPERSEDED file: not resumed

    @property
    def finished(self) -> bool:
        return self.batches_done >= self.batches_total

    @property
    def hours_left(self) -> float | None:
        if self.finished:
            return 0.0
        if self.batches_done == 0:
            return None
        return self.compute_s / self.batches_done * (self.batches_total - self.batches_done) / 3600

    def line(self) -> str:
        """One line for a terminal."""
        if self.superseded is not None:
            return f"{self.name}: superseded after {self.batches_done} of {self.batches_total} batches ({self.superseded})"
        head = f"{self.name}: batch {self.batches_done} of {self.batches_total} done"
        if self.finished:
            head = f"{self.name}: finished ({self.batches_total} batch(es))"
        elif self.partial_attacks:
            head += f" (the next: {self.partial_attacks} of {self.attacks_total} attacks)"
        left = self.hours_left
        eta = (
            ""
            if self.finished
            else ("; to go: unknown" if left is None else f"; about {left:.1f} h to go")
        )
        tally = ""
        if self.samples:
            tally = (
                f"; {'' if self.finished else 'so far '}"
                f"{self.clean_correct / self.samples:.1%} clean, "
                f"{self.worst_correct / self.samples:.1%} worst case over {self.samples:,} images"
            )
        return f"{head}, {self.compute_s / 3600:.2f} h of compute{eta}{tally}"


def audit_progress(directory: str | Path) -> AuditProgress:
    """Read ``directory/state.json`` (written by ``deqguard audit``). Raises ValueError naming
    the file when it is missing or not an audit's state."""
    path = Path(directory) / "state.json"
    try:
        state = json.loads(path.read_text())
        fp = state["fingerprint"]
        n, batch_size = int(fp["config"]["n"]), int(fp["config"]["batch_size"])
        attacks_total = len(fp["plans"])
        batches = list(state["batches"].values())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an audit's state ({exc})") from exc
    done = [b for b in batches if not b.get("partial")]
    note = Path(directory) / "SUPERSEDED"
    partial = [b for b in batches if b.get("partial")]
    counts = [batch_counts(b) for b in done]
    return AuditProgress(
        name=Path(directory).resolve().name,
        batches_done=len(done),
        batches_total=math.ceil(n / batch_size),
        attacks_total=attacks_total,
        partial_attacks=len(partial[0]["attacks"]) if partial else 0,
        compute_s=float(state.get("compute_s", 0.0)),
        samples=sum(c[0] for c in counts),
        clean_correct=sum(c[1] for c in counts),
        worst_correct=sum(c[2] for c in counts),
        superseded=" ".join(note.read_text().split()) if note.is_file() else None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`deqguard audit-status DIR...`: one line per audit directory (those without a
    ``state.json`` are skipped with ``--quiet``, else reported as errors)."""
    p = argparse.ArgumentParser(prog="deqguard audit-status", description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="audit directories (deqguard audit --out)")
    p.add_argument(
        "--unfinished", action="store_true", help="only audits still to run (not superseded)"
    )
    p.add_argument("--quiet", action="store_true", help="skip directories without state.json")
    try:
        args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    rc = 0
    for d in args.dirs:
        if args.quiet and not (Path(d) / "state.json").is_file():
            continue
        try:
            prog = audit_progress(d)
        except ValueError as exc:
            print(f"deqguard audit-status: {exc}", file=sys.stderr)
            rc = 1
            continue
        if not (args.unfinished and (prog.finished or prog.superseded is not None)):
            print(prog.line())
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
