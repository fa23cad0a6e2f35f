"""A run's state as committed to git: one snapshot per session that trained (issue 14 item 1).

Why: the trainer keeps only its latest state and its validation-selected weights; every
earlier state survives as a commit, which the dynamics and robustness histories
(``training.convergence``, ``training.robust_history``) and a re-selection of the exported
weights (``training.selection``) read back.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from training.checkpoint import STATE_JSON, STATE_WEIGHTS

__all__ = ["committed_revisions", "committed_snapshots", "state_at"]


def _git(cwd: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True).stdout


def _where(run_dir: Path) -> tuple[Path, Path]:
    """(repository top, the run directory relative to it)."""
    top = Path(_git(run_dir, "rev-parse", "--show-toplevel").decode().strip())
    return top, run_dir.resolve().relative_to(top.resolve())


def committed_revisions(run_dir: Path) -> list[str]:
    """Full hashes of the commits that changed the run's state weights, oldest first."""
    top, rel = _where(run_dir)
    log = _git(top, "log", "--format=%H", "--", str(rel / STATE_WEIGHTS)).decode()
    return list(reversed(log.split()))


def state_at(run_dir: Path, rev: str, into: Path) -> Path:
    """A run directory under ``into`` holding the run's state pair and config at commit
    ``rev`` (a hash or any prefix git accepts)."""
    top, rel = _where(run_dir)
    d = Path(tempfile.mkdtemp(dir=into, prefix=rev[:7] + "-"))
    for name in (STATE_WEIGHTS, STATE_JSON, "config.json"):
        (d / name).write_bytes(_git(top, "show", f"{rev}:{rel / name}"))
    return d


def committed_snapshots(run_dir: Path, into: Path) -> list[tuple[str, Path]]:
    """(short commit, run directory under ``into``) of every committed state, oldest first."""
    return [(rev[:7], state_at(run_dir, rev, into)) for rev in committed_revisions(run_dir)]
