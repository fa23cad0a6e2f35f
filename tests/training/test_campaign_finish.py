"""scripts/campaign_finish.sh's queue, run against a stand-in Python that records its calls.

Why: the script drives days of audits across sessions; a queue that runs an audit twice or
starts the audits of a run that is still training wastes a session, and none of that shows
until the campaign ends. The stand-in answers the script's JSON look-ups with the real
interpreter and logs every ``-m`` call instead of running it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "campaign_finish.sh"
MODELS = ("micro-trades", "micro-trades-ri")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("flock") is None, reason="needs bash and flock"
)


def _tree(tmp: Path, finished: dict[str, bool], version: int = 1) -> Path:
    (tmp / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, tmp / "scripts" / SCRIPT.name)
    for m in MODELS:
        state = tmp / "training" / "state" / f"campaign-{m}"
        state.mkdir(parents=True)
        (state / "state.json").write_text(json.dumps({"finished": finished[m]}))
        store = tmp / "model_store" / m
        store.mkdir(parents=True)
        (store / "manifest.json").write_text(json.dumps({"version": version}))
    fake = tmp / "fakepy"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi\n'
        f'echo "$*" >> {tmp}/calls.log\n'
        "sleep 0.05\n"
    )
    fake.chmod(0o755)
    return tmp


def _run(
    tree: Path, workers: int, **extra: str
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    env = dict(os.environ, PY=str(tree / "fakepy"), LOCKS=str(tree / "locks"), **extra)
    env["WORKERS"] = str(workers)
    proc = subprocess.run(
        ["bash", str(tree / "scripts" / SCRIPT.name)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = tree / "calls.log"
    return proc, log.read_text().splitlines() if log.exists() else []


def _audit_dirs(calls: list[str]) -> list[str]:
    return [c.split("--out ")[1].split()[0] for c in calls if c.startswith("-m deqguard.cli audit")]


def test_two_workers_run_every_audit_of_both_models_once(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {m: True for m in MODELS})
    proc, calls = _run(tree, workers=2)
    assert proc.returncode == 0, proc.stderr
    dirs = _audit_dirs(calls)
    assert len(dirs) == 12 and len(set(dirs)) == 12  # six stages x two models, none twice
    assert {d.split("/")[-1].split("@")[0] for d in dirs} == set(MODELS)
    assert sum("training.evaluate" in c for c in calls) == 2  # both exported as @2


def test_an_unfinished_run_is_neither_exported_nor_audited(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"micro-trades": False, "micro-trades-ri": True})
    proc, calls = _run(tree, workers=1)
    assert proc.returncode == 0, proc.stderr
    assert "campaign-micro-trades has not finished" in proc.stderr
    dirs = _audit_dirs(calls)
    assert len(dirs) == 6 and all("/micro-trades-ri@2-" in d for d in dirs)
    exports = [c for c in calls if "training.evaluate" in c]
    assert len(exports) == 1 and "--name micro-trades-ri" in exports[0]
    # the weights exported are training.selection's, chosen on the robustness history
    assert "--weights selection" in exports[0]
    steps = [c.split()[1] for c in calls if c.split()[1].startswith("training.")]
    assert steps[:3] == ["training.robust_history", "training.selection", "training.evaluate"]
    history = next(c for c in calls if c.startswith("-m training.robust_history"))
    assert "--reuse docs/robust_history.json" in history  # measured snapshots: not again
    # the first stage is item 5's target check on 1,000 images; the defended worst case
    # (quick, adaptive, Square) comes before the two grid + AutoAttack audits, the undefended
    # one (the longest) last
    kinds = [d.split("@2-")[1] for d in dirs]
    assert kinds == [
        "off-quick9-solver-1000",
        "paper-quick-solver-1000",
        "paper-adaptive-solver-200",
        "paper-square-200",
        "paper-paper-200",
        "off-paper-solver-1000",
    ]
    # the audits with attacks on the undefended prediction take the solver's gradient
    for c in calls:
        if "-solver-" in c:
            assert "--undefended-grad solver" in c
        if "-paper-quick-solver-" in c or "-paper-adaptive-solver-" in c:
            assert "--defended-grad solver" in c
        if "-off-" in c:  # as the first stage-1 audit began (its fingerprint)
            assert "--defended-grad" not in c


def test_an_audit_begun_before_model_form_resumes_on_the_trained_module(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {"micro-trades": False, "micro-trades-ri": True}, version=2)
    for name, config in (
        ("micro-trades-ri@2-off-quick9-solver-1000", {"suite": "quick"}),  # before the option
        ("micro-trades-ri@2-paper-quick-solver-1000", {"model_form": "served"}),
    ):
        d = tree / "docs" / "audits" / name
        d.mkdir(parents=True)
        (d / "state.json").write_text(json.dumps({"fingerprint": {"config": config}}))
    proc, calls = _run(tree, workers=1)
    assert proc.returncode == 0, proc.stderr
    audits = [c for c in calls if c.startswith("-m deqguard.cli audit")]
    assert len(audits) == 6
    for c in audits:
        assert ("--model-form training" in c) == ("-off-quick9-solver-" in c), c


def test_without_export_only_the_exported_models_are_audited(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {m: True for m in MODELS})
    (tree / "model_store" / "micro-trades-ri" / "manifest.json").write_text('{"version": 2}')
    proc, calls = _run(tree, workers=2, EXPORT="0")
    assert proc.returncode == 0, proc.stderr
    assert "micro-trades@2 is not exported yet" in proc.stderr
    exporting = ("training.robust_history", "training.selection", "training.evaluate")
    assert not any(c.split()[1] in exporting for c in calls)  # nothing exported
    dirs = _audit_dirs(calls)
    assert len(dirs) == 6 and all("/micro-trades-ri@2-" in d for d in dirs)


def test_nothing_finished_is_an_error_that_says_so(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {m: False for m in MODELS})
    proc, calls = _run(tree, workers=2)
    assert proc.returncode == 2
    assert "no campaign run has finished" in proc.stderr
    assert calls == []


def test_an_exported_model_is_not_exported_again(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {m: True for m in MODELS}, version=2)
    proc, calls = _run(tree, workers=2)
    assert proc.returncode == 0, proc.stderr
    assert not any("training.evaluate" in c for c in calls)
    assert len(_audit_dirs(calls)) == 12


def test_a_gpu_run_writes_its_own_directories_with_its_batch_size(tmp_path: Path) -> None:
    tree = _tree(tmp_path, {m: True for m in MODELS}, version=2)
    proc, calls = _run(tree, workers=4, DEVICE="cuda", BATCH="256", SUFFIX="-cuda")
    assert proc.returncode == 0, proc.stderr
    audits = [c for c in calls if c.startswith("-m deqguard.cli audit")]
    assert len(audits) == 12
    assert all("--device cuda" in c and "--batch-size 256" in c for c in audits)
    assert all(d.endswith("-cuda") for d in _audit_dirs(calls))


def test_every_queued_audit_is_a_valid_deqguard_audit_command(tmp_path: Path) -> None:
    """The queue's argument lines parse with the real CLI, and each names attacks its suite
    has (the stand-in above would accept anything)."""
    import shlex

    from deqguard.audit.cli import _parser, config_from_args
    from deqguard.audit.config import build_suite

    tree = _tree(tmp_path, {m: True for m in MODELS}, version=2)
    proc, calls = _run(tree, workers=1)
    assert proc.returncode == 0, proc.stderr
    audits = [c for c in calls if c.startswith("-m deqguard.cli audit")]
    assert len(audits) == 12
    for call in audits:
        argv = shlex.split(call)[3:]  # after "-m deqguard.cli audit"
        cfg = config_from_args(_parser().parse_args(argv))
        plans = build_suite(cfg)
        assert plans, call
        out = argv[argv.index("--out") + 1]
        assert out.endswith(f"-{cfg.n}"), (out, cfg.n)
        if cfg.attacks:
            assert {p.name for p in plans} == set(cfg.attacks)
