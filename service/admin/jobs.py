"""The audit job store: one SQLite table, so that jobs, their progress and their partial
results survive a restart (or a kill -9) and a restarted server resumes where it stopped.

Every write is one short transaction; the database runs in WAL mode so that readers (the HTTP
routes) never wait for the runner's per-batch commits.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ACTIVE_STATES", "STATES", "AuditJob", "JobStore"]

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    spec TEXT NOT NULL,
    config TEXT,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    updated REAL NOT NULL,
    samples_done INTEGER NOT NULL DEFAULT 0,
    samples_total INTEGER NOT NULL,
    robust_correct INTEGER NOT NULL DEFAULT 0,
    clean_correct INTEGER NOT NULL DEFAULT 0,
    compute_s REAL NOT NULL DEFAULT 0,
    partial TEXT,
    report TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    resumes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
"""


@dataclass
class AuditJob:
    """One row of the job table, decoded."""

    id: str
    spec: dict[str, Any]
    state: str
    created: float
    updated: float
    samples_total: int
    samples_done: int = 0
    robust_correct: int = 0
    clean_correct: int = 0
    compute_s: float = 0.0
    started: float | None = None
    finished: float | None = None
    idempotency_key: str | None = None
    partial: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    cancel_requested: bool = False
    resumes: int = 0
    config: dict[str, Any] | None = None
    """The audit configuration validated when the job was created (what a resume runs)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AuditJob:
        return cls(
            id=row["id"],
            spec=json.loads(row["spec"]),
            state=row["state"],
            created=row["created"],
            updated=row["updated"],
            samples_total=row["samples_total"],
            samples_done=row["samples_done"],
            robust_correct=row["robust_correct"],
            clean_correct=row["clean_correct"],
            compute_s=row["compute_s"],
            started=row["started"],
            finished=row["finished"],
            idempotency_key=row["idempotency_key"],
            partial=json.loads(row["partial"]) if row["partial"] else None,
            report=json.loads(row["report"]) if row["report"] else None,
            error=row["error"],
            cancel_requested=bool(row["cancel_requested"]),
            resumes=row["resumes"],
            config=json.loads(row["config"]) if row["config"] else None,
        )


class JobStore:
    """Thread-safe access to the job table (one connection, one lock: writes are tiny)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        columns = {r["name"] for r in self._conn.execute("PRAGMA table_info(jobs)")}
        if "config" not in columns:  # a database from before configs were stored
            self._conn.execute("ALTER TABLE jobs ADD COLUMN config TEXT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # ------------------------------------------------------------------ create / read
    def create(
        self,
        spec: dict[str, Any],
        samples_total: int,
        idempotency_key: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> tuple[AuditJob, bool]:
        """Insert a queued job (its spec and validated config); with a known idempotency key
        return that job instead. Returns (job, created)."""
        now = time.time()
        with self._tx() as c:
            if idempotency_key is not None:
                row = c.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
                ).fetchone()
                if row is not None:
                    return AuditJob.from_row(row), False
            job_id = uuid.uuid4().hex[:16]
            c.execute(
                "INSERT INTO jobs (id, idempotency_key, spec, config, state, created, updated, "
                "samples_total) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (job_id, idempotency_key, json.dumps(spec, sort_keys=True),
                 None if config is None else json.dumps(config), now, now, samples_total),
            )  # fmt: skip
            row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return AuditJob.from_row(row), True

    def get(self, job_id: str) -> AuditJob | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return AuditJob.from_row(row) if row is not None else None

    def list(self, state: str | None = None, limit: int = 100) -> list[AuditJob]:
        q = "SELECT * FROM jobs"
        args: tuple[Any, ...] = ()
        if state is not None:
            q += " WHERE state = ?"
            args = (state,)
        q += " ORDER BY created DESC LIMIT ?"
        with self._lock:
            rows = self._conn.execute(q, (*args, limit)).fetchall()
        return [AuditJob.from_row(r) for r in rows]

    def active(self) -> list[AuditJob]:
        """Queued and running jobs, oldest first (the order they run or resume in)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') ORDER BY created"
            ).fetchall()
        return [AuditJob.from_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

    # ------------------------------------------------------------------ transitions
    def mark_running(self, job_id: str) -> None:
        now = time.time()
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET state = 'running', started = COALESCE(started, ?), updated = ?, "
                "resumes = resumes + (CASE WHEN partial IS NULL THEN 0 ELSE 1 END) "
                "WHERE id = ? AND state IN ('queued', 'running')",
                (now, now, job_id),
            )

    def save_progress(
        self,
        job_id: str,
        partial: dict[str, Any],
        *,
        samples_done: int,
        robust_correct: int,
        clean_correct: int,
        compute_s: float,
    ) -> None:
        """Persist the partial result after a finished batch (the resume point)."""
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET partial = ?, samples_done = ?, robust_correct = ?, "
                "clean_correct = ?, compute_s = ?, updated = ? WHERE id = ?",
                (json.dumps(partial), samples_done, robust_correct, clean_correct, compute_s,
                 time.time(), job_id),
            )  # fmt: skip

    def finish(
        self,
        job_id: str,
        state: str,
        *,
        report: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        if state not in ("succeeded", "failed", "cancelled"):
            raise ValueError(f"not a final state: {state}")
        now = time.time()
        with self._tx() as c:
            c.execute(
                "UPDATE jobs SET state = ?, report = COALESCE(?, report), error = ?, "
                "finished = ?, updated = ? WHERE id = ?",
                (state, json.dumps(report) if report is not None else None, error, now, now,
                 job_id),
            )  # fmt: skip

    def request_cancel(self, job_id: str) -> AuditJob | None:
        """Flag a job for cancellation; a queued one is cancelled at once."""
        now = time.time()
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["state"] == "queued":
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished = ?, "
                    "updated = ? WHERE id = ?",
                    (now, now, job_id),
                )
            elif row["state"] == "running":
                c.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?",
                    (now, job_id),
                )
        return self.get(job_id)
