"""What a cascaded audit would cost: each attack run only on the images every earlier attack of
the audit left correct (as AutoAttack runs its four), from committed per-batch records.

Why: at this project's CPU budget the campaign's audits are its longest part; this estimates the
saving before building a cascade mode (docs/TRAINING.md). Per batch, attack a's recorded seconds
are scaled by the fraction of the batch's attacked images still robust before it; records
without seconds are skipped. An estimate from the old models' audits, not a measurement.

    python benchmarks/cascade_estimate.py docs/audits/*
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cascade_fraction(batches: list[dict]) -> tuple[float, float]:
    """(cascaded seconds, independent seconds) over the batches' attacks, in suite order."""
    full = cascaded = 0.0
    for b in batches:
        alive = [bool(a) for a in b.get("attacked", b["clean_correct"])]
        n = sum(alive) or 1
        for rec in b["attacks"]:
            sec = float(rec.get("seconds", 0.0))
            full += sec
            cascaded += sec * sum(alive) / n
            alive = [x and bool(c) for x, c in zip(alive, rec["correct"], strict=True)]
    return cascaded, full


def main(argv: list[str]) -> int:
    for d in argv:
        path = Path(d) / "state.json"
        if not path.is_file():
            continue
        state = json.loads(path.read_text())
        records = state.get("batches", {})
        batches = [b for b in (records.values() if isinstance(records, dict) else records)]
        cascaded, full = cascade_fraction(
            [b for b in batches if "attacks" in b and not b.get("partial")]
        )
        if full <= 0:
            print(f"{d}: no timed records")
            continue
        print(
            f"{d}: {len(batches)} batches, {len(batches[0]['attacks'])} attacks;"
            f" independent {full / 3600:.2f} h, cascaded {cascaded / 3600:.2f} h"
            f" ({cascaded / full:.0%})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
