"""Admin settings and the SQLite job store, in process (no server, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.admin.jobs import JobStore
from service.admin.settings import AdminSettings

SPEC = {"model": "m@1", "suite": "smoke", "n_samples": 8, "batch_size": 4, "seed": 0}


def test_settings_token_and_database_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEQGUARD_ADMIN_TOKEN", raising=False)
    assert AdminSettings().token is None
    assert AdminSettings(admin_token="").token is None  # empty = off
    s = AdminSettings(admin_token="zq-secret-9", state_dir=tmp_path)
    assert s.token == "zq-secret-9" and s.database_path == tmp_path / "jobs.db"
    assert "zq-secret-9" not in repr(s)  # the token is a secret
    monkeypatch.setenv("DEQGUARD_DATABASE_URL", f"sqlite:///{tmp_path}/other.db")
    assert AdminSettings().database_path == tmp_path / "other.db"
    for bad in ("postgres://x/y", "sqlite:///"):
        with pytest.raises(ValidationError, match="database_url"):
            AdminSettings(database_url=bad)
    with pytest.raises(ValidationError, match="max_concurrent_audits"):
        AdminSettings(max_concurrent_audits=0)


def test_job_store_idempotency_progress_cancel_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    store = JobStore(db)
    a, created = store.create(SPEC, 8, "key-1")
    b, again = store.create(SPEC, 8, "key-1")
    assert created and not again and a.id == b.id
    c, _ = store.create(SPEC, 8)
    store.mark_running(a.id)
    store.save_progress(a.id, {"batches": [{"index": 0}]}, samples_done=4, robust_correct=1,
                        clean_correct=2, compute_s=0.5)  # fmt: skip
    assert store.request_cancel(c.id).state == "cancelled"  # queued: at once
    assert store.counts()["running"] == 1 and store.counts()["cancelled"] == 1
    store.close()
    reopened = JobStore(db)  # what a restarted server sees
    job = reopened.get(a.id)
    assert job is not None and job.state == "running" and job.samples_done == 4
    assert job.partial == {"batches": [{"index": 0}]}
    assert [j.id for j in reopened.active()] == [a.id]
    reopened.mark_running(a.id)
    assert reopened.get(a.id).resumes == 1
    reopened.finish(a.id, "succeeded", report={"ok": True})
    assert reopened.get(a.id).report == {"ok": True} and not reopened.active()
    assert reopened.get("nope") is None


def test_job_store_keeps_the_validated_config_and_opens_an_older_database(
    tmp_path: Path,
) -> None:
    """A job keeps the AuditConfig it was accepted with (what a resume runs); a database
    written before configs were stored gains the column and its jobs read back without one."""
    import sqlite3

    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript(
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, spec TEXT NOT NULL,"
        " state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,"
        " updated REAL NOT NULL, samples_done INTEGER NOT NULL DEFAULT 0,"
        " samples_total INTEGER NOT NULL, robust_correct INTEGER NOT NULL DEFAULT 0,"
        " clean_correct INTEGER NOT NULL DEFAULT 0, compute_s REAL NOT NULL DEFAULT 0,"
        " partial TEXT, report TEXT, error TEXT, cancel_requested INTEGER NOT NULL DEFAULT 0,"
        " resumes INTEGER NOT NULL DEFAULT 0);"
        "INSERT INTO jobs (id, spec, state, created, updated, samples_total)"
        " VALUES ('0123456789abcdef', '{}', 'running', 0, 0, 8);"
    )
    conn.commit()
    conn.close()
    store = JobStore(db)
    old = store.get("0123456789abcdef")
    assert old is not None and old.config is None and old.state == "running"
    config = {"model": "m@1", "suite": "quick", "n": 8, "defense": "paper"}
    job, created = store.create(SPEC, 8, config=config)
    assert created and job.config == config
    store.close()
    assert JobStore(db).get(job.id).config == config
