"""scripts/campaign_session.sh start/stop, against a stand-in Python in a scratch repository.

Why: every session of the campaign starts and ends with it; a stop that misses a job, copies
nothing back or kills processes outside its worktree would lose a session's compute. The
stand-in marks a run finished when "trained" and sleeps when "auditing" (under a command line
that looks like an audit's), so start must chain each run into its audits and stop must end
them all and bring the state back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.training._git import git as _git

ROOT = Path(__file__).resolve().parents[2]
RUNS = ("campaign-micro-trades", "campaign-micro-trades-ri")

pytestmark = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("bash", "flock", "git", "pgrep"))
    or not Path("/proc/self/cwd").exists(),
    reason="needs bash, flock, git, pgrep and /proc (Linux)",
)

FAKE = """#!/bin/bash
case "$1" in -c|-) exec {python} "$@" ;; esac
echo "$*" >> {log}
if [ "$3" = train ]; then
    n=$(basename "$5" .toml)
    {python} -c "import json, sys; p = sys.argv[1]; d = json.load(open(p)); \\
d.update(finished=True, step=14060); json.dump(d, open(p, 'w'))" training/state/$n/state.json
elif [ "$3" = audit ]; then
    exec {python} -c "import time; time.sleep(120)" deqguard.cli audit "$@"
elif [ "$2" = training.evaluate ]; then
    m=$(echo "$*" | sed 's/.*--name \\([^ ]*\\).*/\\1/')
    echo '{{"version": 2}}' > model_store/$m/manifest.json
elif [ "$2" = training.curves ]; then
    touch "${{@: -1}}"
fi
"""


def _repo(tmp: Path, finished: dict[str, bool]) -> Path:
    repo = tmp / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("campaign_session.sh", "campaign_finish.sh"):
        shutil.copy(ROOT / "scripts" / name, repo / "scripts" / name)
    (repo / "docs" / "audits").mkdir(parents=True)
    (repo / "docs" / "audits" / "README.md").write_text("audits\n")
    (repo / "training" / "configs").mkdir(parents=True)
    for run in RUNS:
        (repo / "training" / "configs" / f"{run}.toml").write_text("")
        state = repo / "training" / "state" / run
        state.mkdir(parents=True)
        (state / "state.json").write_text(
            json.dumps({"step": 10, "total_steps": 14060, "finished": finished[run]})
        )
        logged = [{"step": 2, "elapsed_s": 0.0}, {"step": 5, "val_clean": 0.5, "val_pgd": 0.25}]
        logged.append({"step": 8, "elapsed_s": 7200.0})  # 6 steps in 2 h of training
        (state / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
        store = repo / "model_store" / run.removeprefix("campaign-")
        store.mkdir(parents=True)
        (store / "manifest.json").write_text(json.dumps({"version": 1}))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "scratch")
    venv = repo / ".venv" / "bin"  # untracked, as a real .venv is
    venv.mkdir(parents=True)
    fake = venv / "python"
    fake.write_text(FAKE.format(python=sys.executable, log=tmp / "calls.log"))
    fake.chmod(0o755)
    return repo


def _session(repo: Path, tmp: Path, verb: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PINNED=str(tmp / "pinned"), LOCKS=str(tmp / "locks"))
    return subprocess.run(
        ["bash", "scripts/campaign_session.sh", verb],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def _procs_in(tmp: Path) -> list[int]:
    """The processes whose working directory lies under ``tmp``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(tmp)):
                pids.append(int(proc.name))
    return pids


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, with whatever the scripts left running there killed afterwards."""
    yield tmp_path
    for pid in _procs_in(tmp_path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def test_start_chains_training_into_audits_and_stop_brings_everything_back(scratch: Path) -> None:
    tmp_path = scratch
    repo = _repo(tmp_path, {"campaign-micro-trades": False, "campaign-micro-trades-ri": True})
    started = _session(repo, tmp_path, "start")
    assert started.returncode == 0, started.stderr
    calls = tmp_path / "calls.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # both chains reach their first audit
        text = calls.read_text() if calls.exists() else ""
        if text.count("deqguard.cli audit") >= 2:
            break
        time.sleep(0.2)
    text = calls.read_text()
    assert "deqguard.cli train --config training/configs/campaign-micro-trades.toml" in text
    assert "campaign-micro-trades-ri.toml" not in text  # finished: audited, not trained
    assert text.count("deqguard.cli audit") == 2  # one worker per core, no duplicate
    status = _session(repo, tmp_path, "status")
    assert status.stdout.count("running: ") == 2, status.stdout
    assert "step 10 (this session from 10)" in status.stdout, status.stdout

    (repo / "docs" / "audits" / "README.md").write_text("edited during the session\n")
    (tmp_path / "pinned" / "docs" / "audits" / "a-run").mkdir()  # an audit's directory
    (tmp_path / "pinned" / "docs" / "audits" / "a-run" / "state.json").write_text("{}")
    stopped = _session(repo, tmp_path, "stop")
    assert stopped.returncode == 0, stopped.stderr
    # the draft of the session's progress row: each run's steps from the start to the stop
    assert "| 10 -> 14,060 | 10 -> 10 | 50.0% / 25.0% (5) | 50.0% / 25.0% (5) |" in stopped.stdout
    assert (repo / "docs" / "audits" / "README.md").read_text() == "edited during the session\n"
    assert (repo / "docs" / "audits" / "a-run" / "state.json").read_text() == "{}"
    assert not (tmp_path / "pinned").exists()
    state = json.loads((repo / "training/state/campaign-micro-trades/state.json").read_text())
    assert state["finished"] is True  # the pinned worktree's state came back
    for m in ("micro-trades", "micro-trades-ri"):
        assert json.loads((repo / f"model_store/{m}/manifest.json").read_text())["version"] == 2
    assert (repo / "docs" / "training-curves.png").exists()
    time.sleep(0.5)
    assert _procs_in(tmp_path) == [], "stop left a job running"


def test_start_refuses_while_a_pinned_worktree_exists(scratch: Path) -> None:
    tmp_path = scratch
    repo = _repo(tmp_path, {r: True for r in RUNS})
    (tmp_path / "pinned").mkdir()
    started = _session(repo, tmp_path, "start")
    assert started.returncode == 1
    assert "stop first" in started.stderr


def test_status_reports_the_rate_and_what_is_left(scratch: Path) -> None:
    repo = _repo(scratch, {r: False for r in RUNS})
    status = _session(repo, scratch, "status")  # no session started: the logged steps' rate
    assert status.returncode == 0, status.stderr
    assert "campaign-micro-trades: step 10, finished False, 3 steps/h (about 4683.3 h to go)" in (
        status.stdout
    ), status.stdout


def test_focus_train_gives_the_last_run_both_cores_then_two_workers(scratch: Path) -> None:
    repo = _repo(scratch, {"campaign-micro-trades": False, "campaign-micro-trades-ri": True})
    started = subprocess.run(
        ["bash", "scripts/campaign_session.sh", "start"],
        cwd=repo,
        env=dict(
            os.environ, PINNED=str(scratch / "pinned"), LOCKS=str(scratch / "locks"), FOCUS="train"
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    calls = scratch / "calls.log"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the chain reaches its two workers' first audits
        if calls.exists() and calls.read_text().count("deqguard.cli audit") >= 2:
            break
        time.sleep(0.2)
    lines = calls.read_text().splitlines()
    train = [i for i, c in enumerate(lines) if " train " in f" {c} "]
    audits = [i for i, c in enumerate(lines) if "deqguard.cli audit" in c]
    assert len(train) == 1 and "--threads 2" in lines[train[0]]
    assert "campaign-micro-trades-ri.toml" not in calls.read_text()
    # no audit beside the training: both workers start after it, one per model's first stage
    assert len(audits) == 2 and min(audits) > train[0], lines
    assert {lines[i].split("--out ")[1].split()[0].rsplit("/", 1)[1] for i in audits} == {
        "micro-trades@2-off-quick9-solver-1000",
        "micro-trades-ri@2-off-quick9-solver-1000",
    }
    exports = [c for c in lines if "training.robust_history" in c or "training.evaluate" in c]
    assert len(exports) == 4 and all("--threads 2" in c for c in exports), exports  # both @1 here
    assert _session(repo, scratch, "stop").returncode == 0


def test_focus_train_refuses_unless_exactly_one_run_trains(scratch: Path) -> None:
    repo = _repo(scratch, {r: False for r in RUNS})
    started = subprocess.run(
        ["bash", "scripts/campaign_session.sh", "start"],
        cwd=repo,
        env=dict(os.environ, PINNED=str(scratch / "pinned"), FOCUS="train"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1 and "exactly one unfinished run" in started.stderr
    assert not (scratch / "pinned").exists()  # nothing left behind
