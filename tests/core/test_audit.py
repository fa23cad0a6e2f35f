"""Audit engine: suites, report schema, statistics, sanity checks, the non-standard label,
cancel + resume = uninterrupted, CLI outputs."""

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
from tests._toys import MisleadingImageDEQ, mean_half_images

DEFENSE = DefenseParams(R=1, Tf=1)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def _cfg(**kw) -> AuditConfig:
    base = dict(
        model="t",
        suite="quick",
        n=4,
        batch_size=2,
        steps=2,
        pgd_steps=1,
        apgd_iters=2,
        defense=DEFENSE,
    )
    base.update(kw)
    return AuditConfig(**base)


def _strip(report: dict) -> dict:
    """The report without wall-clock figures (total, per attack, sanity checks)."""
    out = {k: v for k, v in report.items() if k != "elapsed_s"}
    out["attacks"] = [{k: v for k, v in a.items() if k != "seconds"} for a in report["attacks"]]
    out["sanity"] = {k: v for k, v in report["sanity"].items() if k != "seconds"}
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
    with pytest.raises(ValueError, match="apgd_targets"):
        _cfg(apgd_targets=0)
    assert AuditConfig.from_dict(_cfg().to_dict()) == _cfg()


def _kinds(suite: str, defense: str, **kw) -> set[tuple[str, str]]:
    plans = build_suite(AuditConfig(model="t", suite=suite, defense=defense, **kw))
    return {(p.kind, p.grad) for p in plans}


UNDEFENDED_APGD = {("apgd-ce", "undefended"), ("apgd-t", "undefended")}


def test_suites_contain_the_attacks_that_matter() -> None:
    """By (kind, gradient): quick = PGD + APGD-CE + APGD-T on the undefended served prediction,
    plus BPDA APGD-T through the defense when it is on; paper = the 144-attack grid +
    AutoAttack; adaptive = the undefended APGD (transfer), BPDA and exact APGD-CE/T and PGD-50
    with 5 restarts, Square."""
    assert _kinds("quick", "off") == {("pgd", "undefended")} | UNDEFENDED_APGD
    assert _kinds("quick", "paper") == {("pgd", "undefended"), ("apgd-t", "bpda")} | UNDEFENDED_APGD
    quick = build_suite(AuditConfig(model="t", suite="quick", defense="paper"))
    for p in quick:
        if p.kind.startswith("apgd"):
            assert p.iters == 100
        if p.kind == "apgd-t":
            assert p.targets >= 3
    assert {p.select for p in quick if p.grad == "bpda"} == {"defended"}
    assert {p.select for p in quick if p.grad == "undefended"} == {"undefended"}
    paper = build_suite(AuditConfig(model="t", suite="paper"))
    assert [p.kind for p in paper].count("pgd") == 144 and paper[-1].kind == "autoattack"
    through = {(k, g) for k in ("apgd-ce", "apgd-t", "pgd") for g in ("bpda", "exact")}
    assert _kinds("adaptive", "paper") == UNDEFENDED_APGD | through | {("square", "none")}
    no_pgd = _kinds("adaptive", "paper", adaptive_pgd_steps=0)
    assert no_pgd == UNDEFENDED_APGD | through - {("pgd", "bpda"), ("pgd", "exact")} | {
        ("square", "none")
    }
    assert _kinds("adaptive", "off") == UNDEFENDED_APGD | {("square", "none")}
    adaptive = build_suite(AuditConfig(model="t", suite="adaptive", defense="paper"))
    assert all(p.restarts >= 3 for p in adaptive if p.kind == "apgd-ce")
    assert all(p.targets >= 3 for p in adaptive if p.kind == "apgd-t")
    assert {(p.iters, p.restarts, p.select) for p in adaptive if p.kind == "pgd"} == {
        (50, 5, "defended")
    }
    assert ("pgd", "source-model") in _kinds("adaptive", "paper", transfer_from="other")


def _toy_audit(**kw) -> dict:
    base = dict(model="toy", defense="off", n=4, batch_size=4, steps=4)
    base.update(kw)
    x, y = mean_half_images(4), torch.zeros(4, dtype=torch.long)
    return AuditRunner(
        AuditConfig(**base), model=MisleadingImageDEQ().eval(), images=x, labels=y
    ).run()


def test_quick_suite_finds_what_pgd10_misses() -> None:
    """On the toy, CE points away from the reachable wrong class: PGD-10 (with restarts, on
    every Eq. 11 surrogate the former quick suite used, or on the served prediction) leaves
    every image correct; APGD-T in the new quick suite breaks them all."""
    old = _toy_audit(suite="paper", grid="quick", autoattack=False, pgd_restarts=2)
    assert old["worst_case"]["correct"] == 4
    new = _toy_audit(suite="quick", pgd_restarts=2)
    validate_report(new)
    robust = {a["name"]: a["robust"]["correct"] for a in new["attacks"]}
    assert robust["pgd-undefended"] == 4 and robust["apgd-ce"] == 4
    assert robust["apgd-t"] == 0 and new["worst_case"]["correct"] == 0
    assert new["headline"]["robust"]["correct"] == 0 and new["headline"]["attack"] == "apgd-t"


def test_sanity_section_runs_and_reports_every_check() -> None:
    report = _toy_audit(suite="quick", sanity_images=3)
    sanity = report["sanity"]
    assert sanity["n"] == 3  # the attacked images among the first 3
    names = [c["name"] for c in sanity["checks"]]
    assert names == ["large_eps", "more_steps", "more_restarts", "transfer_vs_white_box"]
    runs = sanity["runs"]
    assert set(runs) == {"large_eps", "pgd", "pgd_more_steps", "pgd_more_restarts"}
    assert runs["large_eps"]["eps"] == pytest.approx(32 / 255) and runs["large_eps"]["n"] == 3
    assert runs["pgd_more_steps"]["steps"] == 4 * runs["pgd"]["steps"]
    assert runs["pgd_more_restarts"]["restarts"] == 3
    # the toy falls at 32/255 (class 1 comes in reach) and resists PGD at 8/255
    assert runs["large_eps"]["correct"] == 0 and runs["pgd"]["correct"] == 3
    assert sanity["checks"][0]["values"]["accuracy"] == 0.0
    status = {c["name"]: c["status"] for c in sanity["checks"]}
    assert status == {
        "large_eps": "pass",
        "more_steps": "pass",
        "more_restarts": "pass",
        "transfer_vs_white_box": "n/a",  # the defense is off: nothing is a transfer attack
    }
    summary = markdown_summary(report)
    assert "## Sanity checks: PASS" in summary and "**PASS** `large_eps`" in summary


def _sanity_batch(runs: dict[str, list[bool]], attacks: list[list[bool]]) -> dict:
    return {
        "index": 0,
        "labels": [0, 0, 0, 0],
        "clean_correct": [True] * 4,
        "clean_entropy": [0.1] * 4,
        "clean_step_entropy_sum": [1.0],
        "clean_undefended_step_entropy_sum": [1.0],
        "attacks": [
            {
                "correct": c,
                "entropy": [0.2] * 4,
                "step_entropy_sum": [1.0],
                "undefended_step_entropy_sum": [1.0],
                "state_dev_sum": [0.0],
            }
            for c in attacks
        ],
        "sanity": {"rows": [0, 1, 2, 3], "runs": runs, "seconds": 0.5},
    }


def test_sanity_checks_flag_what_they_should() -> None:
    plans = [
        {"name": "apgd-t", "kind": "apgd-t", "spec": None, "grad": "undefended"},
        {"name": "bpda-apgd-t", "kind": "apgd-t", "spec": None, "grad": "bpda"},
    ]
    good = {
        "large_eps": [False] * 4,
        "pgd": [True, True, False, False],
        "pgd_more_steps": [True, False, False, False],
        "pgd_more_restarts": [True, True, False, False],
    }
    setup = {"defense_active": True}
    fine = build_report({}, {}, plans, [_sanity_batch(good, [[True, True, True, False],
                        [True, True, False, False]])], total_batches=1, sanity_setup=setup)  # fmt: skip
    assert fine["sanity"]["status"] == "pass"
    assert all(c["status"] == "pass" for c in fine["sanity"]["checks"])
    bad = {
        "large_eps": [True, True, True, False],  # 75% at 32/255 (95% CI from 30%)
        "pgd": [True, False, False, False],
        "pgd_more_steps": [True, True, False, False],  # more steps, higher accuracy
        "pgd_more_restarts": [True, True, True, False],  # more restarts, higher accuracy
    }
    # and the transfer attack (0/4) beats every white-box one (bpda-apgd-t 2/4, sanity pgd 1/4)
    flagged = build_report({}, {}, plans, [_sanity_batch(bad, [[False] * 4,
                           [True, True, False, False]])], total_batches=1, sanity_setup=setup)  # fmt: skip
    status = {c["name"]: c["status"] for c in flagged["sanity"]["checks"]}
    assert status == {
        "large_eps": "flag",
        "more_steps": "flag",
        "more_restarts": "flag",
        "transfer_vs_white_box": "flag",
    }
    values = flagged["sanity"]["checks"][3]["values"]
    assert values["strongest_transfer"] == "apgd-t" and values["transfer"]["apgd-t"] == 0.0
    assert values["white_box"]["sanity:pgd"] == 0.25
    assert flagged["sanity"]["status"] == "flag"
    assert "**FLAG** `transfer_vs_white_box`" in markdown_summary(flagged)
    # without a sanity record the section says so
    assert build_report({}, {}, [], [], total_batches=0)["sanity"]["status"] == "not run"


def test_non_standard_label_when_autoattack_is_off() -> None:
    def report(**kw) -> tuple[dict, AuditRunner]:
        runner = AuditRunner(
            AuditConfig(model="t", **kw),
            model=torch.nn.Identity(),  # report() needs no model
            images=torch.zeros(4, 3, 32, 32),
            labels=torch.zeros(4, dtype=torch.long),
        )
        return runner.report([]), runner

    no_aa, _ = report(suite="paper", autoattack=False)
    assert any("AutoAttack not run" in r for r in no_aa["non_standard"])
    assert no_aa["headline"]["standard"] is False
    text = markdown_summary(no_aa)
    assert "**Non-standard evaluation**: AutoAttack not run" in text
    assert "NON-STANDARD run: not a headline figure" in text
    assert "headline (min over attacks" not in text
    standard, runner = report(suite="paper")
    assert standard["non_standard"] == [] and standard["headline"]["standard"] is True
    assert "headline (min over attacks" in markdown_summary(standard)
    assert report(suite="quick")[0]["non_standard"] == []
    runner.plans = runner.plans[:1]  # the admin's smoke suite
    assert any("only 1 of the suite's 145" in r for r in runner.report([])["non_standard"])
    assert any("APGD with 5" in r for r in report(suite="quick", apgd_iters=5)[0]["non_standard"])


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


@pytest.mark.parametrize("cascade", [False, True])
def test_a_stop_mid_batch_resumes_after_the_last_finished_attack(
    model, data, tmp_path, cascade
) -> None:
    """With checkpoint_attacks, a stop during batch 1's third attack keeps its first two: the
    resumed audit runs only the rest and reports what an uninterrupted run reports."""
    x, y = data
    cfg = _cfg(cascade=cascade, attack_misclassified=True)  # every image: every attack runs
    full = AuditRunner(cfg, model=model, images=x, labels=y).run()
    state = tmp_path / "state.json"
    runner = AuditRunner(cfg, model=model, images=x, labels=y)
    ran: list[tuple[int, str]] = []
    real = runner._attack

    def attack(plan, a, index, *args):
        ran.append((index, plan.name))
        return real(plan, a, index, *args)

    runner._attack = attack  # type: ignore[method-assign]
    polls = iter(range(1000))  # should_cancel is polled before each batch and attack
    stop_at = 1 + 4 + 1 + 3  # batch 0 (1 + 4 attacks), batch 1 (1 + its first 2 attacks)
    with pytest.raises(AuditCancelled):
        runner.run(
            should_cancel=lambda: next(polls) >= stop_at - 1,
            state_path=state,
            checkpoint_attacks=True,
            checkpoint_every_s=0.0,  # every attack
        )
    if not cascade:  # (a cascade skips an attack with no survivors: fewer calls)
        assert [i for i, _ in ran] == [0, 0, 0, 0, 1, 1]  # stopped before batch 1's third
    saved = json.loads(state.read_text())["batches"]
    assert "partial" not in saved["0"] and saved["1"]["partial"] is True
    assert len(saved["1"]["attacks"]) == 2
    assert runner.report(list(runner.load_state(state).values()))["batches"] == 1

    again = AuditRunner(cfg, model=model, images=x, labels=y)
    ran.clear()
    real = again._attack
    again._attack = attack  # type: ignore[method-assign]
    resumed = again.run(state_path=state, checkpoint_attacks=True, checkpoint_every_s=0.0)
    rest = [p.name for p in again.plans[2:]]
    names = [n for _, n in ran]
    assert {i for i, _ in ran} <= {1} and names == [n for n in rest if n in names]
    if not cascade:
        assert [n for _, n in ran] == rest  # only the attacks the stop left
    assert _strip(resumed) == _strip(full)


class _MemoryStore:
    """An AuditStore in memory (the service's is its SQLite job table)."""

    def __init__(self) -> None:
        self.done: dict[int, dict] = {}
        self.compute_s = 0.0
        self.saves = 0

    def load(self) -> tuple[dict[int, dict], float]:
        return dict(self.done), self.compute_s

    def save(self, done: dict[int, dict], compute_s: float) -> None:
        self.done, self.compute_s, self.saves = dict(done), compute_s, self.saves + 1


class _CountingGate:
    """A DeviceGate that counts; once armed, it stops the audit at the ``after``-th acquire."""

    def __init__(self) -> None:
        self.acquired = self.released = 0
        self.countdown: int | None = None

    def arm(self, after: int) -> None:
        self.countdown = after

    def acquire(self) -> None:
        self.acquired += 1
        if self.countdown is not None:
            self.countdown -= 1
            if self.countdown <= 0:
                raise AuditCancelled("stopped by the gate")

    def release(self) -> None:
        self.released += 1


def test_the_one_loop_with_a_store_and_a_gate(model, data) -> None:
    """The service's hooks on the core loop: every f-evaluation of the model passes the gate
    (a stop there, mid-batch, discards only the batch in progress), each finished batch
    reaches the store, and a resumed run gives the uninterrupted result."""
    import copy

    x, y = data
    full = AuditRunner(_cfg(), model=model, images=x, labels=y).run()
    store, gate = _MemoryStore(), _CountingGate()
    AuditRunner(_cfg(), model=copy.deepcopy(model), images=x, labels=y, gate=gate).run(store=store)
    assert store.saves == 2 and sorted(store.done) == [0, 1]
    assert gate.acquired > 2 and gate.released >= 2  # per f-evaluation, and per batch
    stopped, stopper = _MemoryStore(), _CountingGate()
    runner = AuditRunner(_cfg(), model=copy.deepcopy(model), images=x, labels=y, gate=stopper)
    with pytest.raises(AuditCancelled):  # 3 acquires into the second batch: mid-batch
        runner.run(store=stopped, progress=lambda _: stopper.arm(3))
    assert sorted(stopped.done) == [0] and stopper.released >= 1
    resumed = AuditRunner(_cfg(), model=copy.deepcopy(model), images=x, labels=y).run(store=stopped)
    assert sorted(stopped.done) == [0, 1]
    assert _strip(resumed) == _strip(full)


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
    cfg = _cfg(
        suite="adaptive",
        n=2,
        square_queries=2,
        adaptive_ka=1,
        adaptive_pgd_steps=2,
        adaptive_pgd_restarts=2,
        attack_misclassified=True,
    )
    report = AuditRunner(cfg, model=model, images=x, labels=y).run()
    validate_report(report)
    assert len(report["attacks"]) == 9
    assert {a["budget"] for a in report["attacks"] if a["name"].endswith("-pgd")} == {
        "PGD-2, 2 restart(s), best iterate per sample"
    }
    assert len(report["attacks"][0]["state_deviation"]) == 2
    assert any("Square with 2 queries" in n for n in report["notes"])
    plots = write_plots(report, tmp_path)
    assert all((tmp_path / p).stat().st_size > 0 for p in plots)
    assert "per-sample worst case" in markdown_summary(report, plots)


def test_an_audit_judges_the_services_own_copy_unless_told_otherwise(model, tmp_path) -> None:
    """model_form: from the store, ``served`` (the default) attacks the eval-only copy the
    service runs, ``training`` the module as trained (the transfer model likewise); an audit
    begun before the option (its fingerprint lacks it) reads back as ``training``, so it
    resumes on the copy it began with."""
    from deqguard.audit.cli import _parser, config_from_args
    from deqguard.models import is_inference_only
    from deqguard.store import save_entry

    save_entry(tmp_path, "m", model, version="1")
    x, y = torch.rand(2, 3, 32, 32), torch.zeros(2, dtype=torch.long)

    def runner(**kw) -> AuditRunner:
        cfg = AuditConfig(model="m", store_root=str(tmp_path), n=2, batch_size=2, **kw)
        return AuditRunner(cfg, images=x, labels=y)

    served, trained = runner(transfer_from="m"), runner(transfer_from="m", model_form="training")
    assert is_inference_only(served.model) and is_inference_only(served.transfer_model)
    assert not is_inference_only(trained.model) and not is_inference_only(trained.transfer_model)
    assert served._fingerprint()["config"]["model_form"] == "served"
    assert "model_form" not in trained._fingerprint()["config"]  # as audits begun before it
    assert AuditConfig.from_dict(trained.config.to_dict()).model_form == "training"
    assert AuditConfig.from_dict(served.config.to_dict()) == served.config
    assert config_from_args(_parser().parse_args(["m", "--out", "x"])).model_form == "served"
    with pytest.raises(ValueError, match="model_form must be one of"):
        AuditConfig(model="m", model_form="folded")


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


def test_cli_refuses_an_unknown_attack_name_before_loading_anything(tmp_path, capsys) -> None:
    from deqguard.audit.cli import main

    # no such store: the name is checked first, so the error is about the attack
    argv = ["m", "--store", str(tmp_path / "none"), "--suite", "adaptive", "--attacks", "bogus"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "attacks ['bogus'] are not in this adaptive suite" in err and "exact-pgd" in err
    assert not (tmp_path / "out").exists()


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
        cwd=Path(__file__).resolve().parents[2],
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


def test_a_subset_of_attacks_reproduces_the_whole_suites_outcomes(model, data) -> None:
    """`attacks` runs only the named plans, each with its whole-suite seed: the same per-image
    outcomes as in the whole suite, and the report says what was left out."""
    x, y = data
    kw = dict(
        suite="adaptive",
        attack_misclassified=True,
        sanity_images=0,
        adaptive_pgd_steps=1,
        adaptive_pgd_restarts=1,
        square_queries=1,
    )
    whole = AuditRunner(_cfg(**kw), model=model, images=x, labels=y)
    part = AuditRunner(_cfg(**kw, attacks=("bpda-pgd",)), model=model, images=x, labels=y)
    assert [p.name for p in part.plans] == ["bpda-pgd"]
    full = whole.run_batch(0)["attacks"][[p.name for p in whole.plans].index("bpda-pgd")]
    got = part.run_batch(0)["attacks"][0]
    assert got["correct"] == full["correct"] and got["entropy"] == full["entropy"]
    assert any("left out: apgd-ce, apgd-t, bpda-apgd-ce" in s for s in part.non_standard())
    with pytest.raises(ValueError, match="not in this quick suite; its attacks: pgd-undefended"):
        _cfg(attacks=("square-defended",))
    assert AuditConfig.from_dict(_cfg(attacks=("apgd-t",)).to_dict()).attacks == ("apgd-t",)


def _scripted_runner(monkeypatch, fooled: dict[str, set[int]], **kw) -> tuple[AuditRunner, dict]:
    """The toy's quick suite with scripted outcomes: attack ``name`` fools the images
    ``fooled[name]`` among those it runs on; ``calls[name]`` records which images it ran on."""
    x, y = mean_half_images(4), torch.zeros(4, dtype=torch.long)
    cfg = AuditConfig(model="toy", defense="off", n=4, batch_size=4, steps=4, **kw)
    runner = AuditRunner(cfg, model=MisleadingImageDEQ().eval(), images=x, labels=y)
    calls: dict[str, list[int]] = {}
    current: list[str] = []

    def ids(v: torch.Tensor) -> list[int]:
        return [int((x == row).flatten(1).all(1).nonzero()[0]) for row in v]

    def attack(plan, a, index, xa, ya, strongest):  # the clean images, unchanged
        calls[plan.name] = ids(xa)
        current[:] = [plan.name]
        return xa

    def record(x_adv, ya, zc):
        bad = fooled.get(current[0], set())
        k = len(ya)
        return {
            "correct": [i not in bad for i in ids(x_adv)],
            "entropy": [0.0] * k,
            "step_entropy_sum": [0.0] * 4,
            "undefended_step_entropy_sum": [0.0] * 4,
            "state_dev_sum": [0.0] * 4,
        }

    monkeypatch.setattr(runner, "_attack", attack)
    monkeypatch.setattr(runner, "_record", record)
    return runner, calls


def test_cascade_runs_each_attack_only_on_its_familys_survivors(monkeypatch) -> None:
    fooled = {"pgd-undefended": set(), "apgd-ce": {0, 1}, "apgd-t": {0, 2}}
    runner, calls = _scripted_runner(monkeypatch, fooled, cascade=True, sanity_images=0)
    assert [p.family for p in runner.plans] == ["pgd", "autoattack", "autoattack"]
    record = runner.run_batch(0)
    # the first attack of each family sees every attacked image; APGD-T only APGD-CE's survivors
    assert calls == {"pgd-undefended": [0, 1, 2, 3], "apgd-ce": [0, 1, 2, 3], "apgd-t": [2, 3]}
    apgd_t = record["attacks"][2]
    assert apgd_t["ran"] == [False, False, True, True]
    assert apgd_t["correct"] == [False, False, False, True]  # cumulative within the family
    report = runner.run()
    validate_report(report)
    rows = {a["name"]: a for a in report["attacks"]}
    assert rows["apgd-t"]["robust"]["correct"] == 1 and rows["apgd-t"]["n_ran"] == 2
    assert rows["apgd-ce"]["n_ran"] == 4 and report["worst_case"]["correct"] == 1
    assert any(n.startswith("cascade:") for n in report["notes"])
    assert "- cascade: each attack ran only on its family's survivors" in markdown_summary(report)
    assert report["config"]["cascade"] is True

    # independent runs: APGD-T on all four; the same per-sample worst case
    plain, calls = _scripted_runner(monkeypatch, fooled, sanity_images=0)
    full = plain.run()
    assert calls["apgd-t"] == [0, 1, 2, 3]
    assert {a["name"]: a["robust"]["correct"] for a in full["attacks"]}["apgd-t"] == 2
    assert full["worst_case"] == report["worst_case"]
    assert "cascade" not in full["config"]  # off: the fingerprint of earlier audits
    assert "ran" not in plain.run_batch(0)["attacks"][2]


def test_cascade_with_nothing_left_runs_nothing_and_reports(monkeypatch) -> None:
    fooled = {"apgd-ce": {0, 1, 2, 3}, "apgd-t": {0, 1, 2, 3}}
    runner, calls = _scripted_runner(monkeypatch, fooled, cascade=True, sanity_images=0)
    report = runner.run()
    validate_report(report)
    assert "apgd-t" not in calls  # every image already fooled: the attack did not run
    rows = {a["name"]: a for a in report["attacks"]}
    assert rows["apgd-t"]["n_ran"] == 0 and rows["apgd-t"]["robust"]["correct"] == 0
    assert rows["pgd-undefended"]["robust"]["correct"] == 4  # its own family: untouched
