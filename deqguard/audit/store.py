"""Where an audit keeps its finished batches, so that a stopped audit resumes.

:meth:`AuditRunner.run` loads the records through an :class:`AuditStore` before it starts and
saves them after every batch; a resumed audit skips the batches it finds, and because every
batch's randomness is seeded by (seed, batch, attack) the result equals the uninterrupted one.
:class:`StateFile` is the command line's store (one JSON file, replaced atomically); the service
supplies its SQLite job table instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

__all__ = ["AuditStore", "StateFile", "batch_counts"]

Records = dict[int, dict[str, Any]]


class AuditStore(Protocol):
    """Persistence of one audit's batch records."""

    def load(self) -> tuple[Records, float]:
        """The records saved so far by batch index, and the compute seconds they took."""

    def save(self, done: Records, compute_s: float) -> None:
        """After each batch: every record so far and the total compute seconds."""


class StateFile:
    """Records in one JSON file tagged with the audit's fingerprint (config, model, plans), so
    that another audit's partial results are refused rather than mixed in."""

    def __init__(self, path: str | os.PathLike[str], fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back

    def load(self) -> tuple[Records, float]:
        if not self.path.exists():
            return {}, 0.0
        state = json.loads(self.path.read_text())
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{self.path} holds partial results of a different audit; refusing to mix them"
            )
        done = {int(k): v for k, v in state["batches"].items()}
        return done, float(state.get("compute_s", 0.0))

    def save(self, done: Records, compute_s: float) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "fingerprint": self.fingerprint,
                    "batches": {str(k): v for k, v in done.items()},
                    "compute_s": compute_s,
                }
            )
        )
        os.replace(tmp, self.path)


def batch_counts(record: dict[str, Any]) -> tuple[int, int, int]:
    """(samples, clean correct, correct under every attack) of one batch record."""
    clean = [bool(c) for c in record["clean_correct"]]
    worst = list(clean)
    for attack in record["attacks"]:
        worst = [w and bool(c) for w, c in zip(worst, attack["correct"])]
    return len(record["labels"]), sum(clean), sum(worst)
