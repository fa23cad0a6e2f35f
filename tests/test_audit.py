"""Audit engine: report schema, statistics, cancel + resume = uninterrupted, CLI outputs."""

from __future__ import annotations

import json

import pytest
import torch

from deqguard.audit import (
    AuditCancelled,
    AuditConfig,
    AuditRunner,
    ReportValidationError,
    build_report,
    build_suite,
    markdown_summary,
    validate_report,
    wilson_interval,
    write_plots,
)
from deqguard.defense import DefenseParams, defended_forward

DEFENSE = DefenseParams(R=1, Tf=1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def _cfg(**kw) -> AuditConfig:
    base = dict(model="t", suite="quick", n=4, batch_size=2, steps=2, pgd_steps=1, defense=DEFENSE)
    base.update(kw)
    return AuditConfig(**base)


def _strip(report: dict) -> dict:
    """The report without wall-clock figures (total and per attack)."""
    out = {k: v for k, v in report.items() if k != "elapsed_s"}
    out["attacks"] = [{k: v for k, v in a.items() if k != "seconds"} for a in report["attacks"]]
    return out


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-4
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="suite"):
        _cfg(suite="nope")
    with pytest.raises(ValueError, match="preset"):
        _cfg(defense="nope")
    with pytest.raises(ValueError, match="batch_size"):
        _cfg(batch_size=0)
    with pytest.raises(ValueError, match="subset"):
        _cfg(grid="nope")
    assert len(build_suite(_cfg(suite="paper", steps=8))) == 145
    assert len(build_suite(_cfg(suite="paper", steps=8, autoattack=False))) == 144
    no_aa = AuditRunner(
        _cfg(suite="paper", grid="quick", autoattack=False),
        model=torch.nn.Identity(),  # report() needs no model
        images=torch.zeros(4, 3, 32, 32),
        labels=torch.zeros(4, dtype=torch.long),
    ).report([])
    assert any("AutoAttack not run" in note for note in no_aa["notes"])
    kinds = {p.kind for p in build_suite(_cfg(suite="adaptive"))}
    assert kinds == {"bpda", "exact", "square"}
    assert AuditConfig.from_dict(_cfg().to_dict()) == _cfg()


def _record(correct: list[bool], entropy: list[float]) -> dict:
    return {
        "correct": correct,
        "entropy": entropy,
        "step_entropy_sum": [sum(entropy)] * 2,
        "undefended_step_entropy_sum": [sum(entropy)] * 2,
        "state_dev_sum": [0.1, 0.2],
    }


def test_headline_vs_per_sample_worst_case_and_entropy_stats() -> None:
    batch = {
        "index": 0,
        "labels": [0, 1, 2, 3],
        "clean_correct": [True, True, True, False],
        "clean_entropy": [0.1, 0.2, 0.3, 0.4],
        "clean_step_entropy_sum": [1.0, 1.0],
        "clean_undefended_step_entropy_sum": [1.0, 1.2],
        "attacks": [
            _record([False, True, True, True], [0.5, 0.1, 0.3, 0.4]),
            _record([True, False, True, False], [0.2, 0.5, 0.6, 0.0]),
        ],
    }
    plans = [
        {"name": "a", "kind": "pgd", "spec": "z1-Ka1-lam1"},
        {"name": "b", "kind": "pgd", "spec": None},
    ]
    r = build_report({"model": "t"}, {"ref": "t"}, plans, [batch], total_batches=1)
    assert r["clean"]["correct"] == 3
    assert [a["robust"]["correct"] for a in r["attacks"]] == [2, 2]  # clean-wrong never counts
    assert r["headline"]["robust"]["correct"] == 2
    assert r["worst_case"]["correct"] == 1  # only sample 2 survives both
    a = r["attacks"][0]
    assert a["P"] == pytest.approx(0.25)  # only sample 0 has lower clean entropy
    assert a["delta_H"] == pytest.approx((0.1 - 0.5 + 0.2 - 0.1) / 4)
    assert r["clean_undefended_entropy_curve"] == [0.25, 0.3]
    validate_report(r)
    bad = dict(r, clean={"correct": 3})
    with pytest.raises(ReportValidationError, match="clean"):
        validate_report(bad)
    with pytest.raises(ReportValidationError, match="kind"):
        validate_report(dict(r, kind="other"))


def test_cancel_and_resume_give_the_uninterrupted_result(model, data, tmp_path) -> None:
    x, y = data
    full = AuditRunner(_cfg(), model=model, images=x, labels=y).run()
    validate_report(full)
    assert full["complete"] and full["n"] == 4

    seen: list[dict] = []
    state = tmp_path / "state.json"
    runner = AuditRunner(_cfg(), model=model, images=x, labels=y)
    with pytest.raises(AuditCancelled):
        runner.run(progress=seen.append, should_cancel=lambda: len(seen) >= 1, state_path=state)
    assert [s["done"] for s in seen] == [1] and state.exists()
    resumed = AuditRunner(_cfg(), model=model, images=x, labels=y).run(
        progress=seen.append, state_path=state
    )
    assert [s["done"] for s in seen] == [1, 2]  # only the missing batch ran
    assert _strip(resumed) == _strip(full)
    with pytest.raises(ValueError, match="different audit"):
        AuditRunner(_cfg(seed=1), model=model, images=x, labels=y).run(state_path=state)


def test_only_clean_correct_images_are_attacked_unless_asked(model, data) -> None:
    x, _ = data
    pred = defended_forward(model, x, DEFENSE, steps=2).prediction
    y = torch.cat([pred[:2], (pred[2:] + 1) % 10])  # right on the first two, wrong on the rest
    skip = AuditRunner(_cfg(), model=model, images=x, labels=y)
    record = skip.run_batch(1)  # images 2, 3: nothing to attack
    assert record["attacked"] == [False, False]
    assert all(r["correct"] == [False, False] for r in record["attacks"])
    report = skip.run()
    validate_report(report)
    assert report["clean"]["correct"] == 2 and report["n_attacked"] == 2
    assert any("only images the defended model classifies correctly" in n for n in report["notes"])
    every = AuditRunner(_cfg(attack_misclassified=True), model=model, images=x, labels=y).run()
    assert every["n_attacked"] == 4 and every["clean"] == report["clean"]
    for a, b in zip(report["attacks"], every["attacks"], strict=True):
        assert a["robust"]["correct"] <= 2 and b["robust"]["correct"] <= 2
        assert a["seconds"] >= 0.0 and len(a["state_deviation"]) == 2


def test_sharding_covers_every_batch_once(model, data) -> None:
    x, y = data
    runner = AuditRunner(_cfg(), model=model, images=x, labels=y)
    parts = [runner.run(shard=(r, 2)) for r in range(2)]
    assert [p["batches"] for p in parts] == [1, 1]
    assert sum(p["n"] for p in parts) == 4


def test_adaptive_suite_report_plots_and_summary(model, data, tmp_path) -> None:
    x, y = data
    cfg = _cfg(suite="adaptive", n=2, square_queries=2, adaptive_ka=1, attack_misclassified=True)
    report = AuditRunner(cfg, model=model, images=x, labels=y).run()
    validate_report(report)
    assert len(report["attacks"]) == 4
    assert len(report["attacks"][0]["state_deviation"]) == 2
    assert any("Square with 2 queries" in n for n in report["notes"])
    plots = write_plots(report, tmp_path)
    assert all((tmp_path / p).stat().st_size > 0 for p in plots)
    assert "per-sample worst case" in markdown_summary(report, plots)


def test_cli_writes_report_plots_and_summary(model, tmp_path) -> None:
    from deqguard.audit.cli import main
    from deqguard.data import DatasetError, load_test
    from deqguard.store import save_entry

    try:
        load_test(n=2)
    except DatasetError:
        pytest.skip("CIFAR-10 not available")
    save_entry(tmp_path / "store", "m", model, version="1")
    out = tmp_path / "out"
    argv = ["m", "--store", str(tmp_path / "store"), "--defense", '{"R": 1, "Tf": 1}', "-n", "2"]
    argv += ["--batch-size", "2", "--steps", "2", "--pgd-steps", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    validate_report(report)
    assert report["model"]["ref"] == "m@1" and report["config"]["defense"] == "custom"
    assert (out / "summary.md").exists() and (out / "entropy.png").exists()
    (out / "report.json").unlink()
    assert main(argv + ["--partial"]) == 0  # report from the saved batches, no recomputation
    assert _strip(json.loads((out / "report.json").read_text())) == _strip(report)
    assert (
        main(["m", "--store", str(tmp_path / "store"), "--suite", "nope", "--out", str(out)]) != 0
    )


def test_torchrun_sharded_cli_gives_the_single_process_report(model, tmp_path) -> None:
    """Two real processes under torchrun (gloo): each audits every other batch, rank 0 gathers
    and writes the report, which equals the one-process report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from deqguard.audit.cli import main
    from deqguard.data import DatasetError, load_test
    from deqguard.store import save_entry

    try:
        load_test(n=4)
    except DatasetError:
        pytest.skip("CIFAR-10 not available")
    store = tmp_path / "store"
    save_entry(store, "m", model, version="1")
    argv = ["m", "--store", str(store), "--defense", '{"R": 1, "Tf": 1}', "-n", "4"]
    argv += [
        "--batch-size",
        "1",
        "--steps",
        "2",
        "--pgd-steps",
        "1",
        "--quiet",
        "--attack-misclassified",
    ]
    # one thread here too, as in the torchrun workers: oneDNN's reductions differ with the
    # thread count, and the defense's sign step turns a last-bit difference into a pixel's step
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "deqguard.audit.cli"]
        + argv
        + ["--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((tmp_path / "two" / "report.json").read_text())
    single = json.loads((tmp_path / "one" / "report.json").read_text())
    assert sharded["n"] == 4 and sharded["batches"] == 4 and sharded["complete"]
    assert sorted((tmp_path / "two").glob("state.rank*.json")) != []
    # decisions and counts exactly; float statistics to 4 digits (the timings are stripped)
    assert _rounded(_strip(sharded)) == _rounded(_strip(single))


def _rounded(value: object, digits: int = 4) -> object:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value
