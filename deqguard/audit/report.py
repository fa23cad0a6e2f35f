"""Audit reports: per-batch records -> one JSON report (validated against REPORT_SCHEMA),
a Markdown summary. Statistics are computed here, from per-sample records, never estimated.

Accuracy conventions: a sample counts as robust to an attack when the defended model is right on
the clean image and on the attack's output. The paper's headline is the minimum over attacks of
the dataset-level accuracy; the stricter per-sample worst case counts a sample only when it
survives every attack. P and Delta H (Eqs. 12, 13) compare the entropy of the reported prediction
on the clean image and on its attacked counterpart.

Schema 2 adds the attacks' gradient source, selection and budget, the ``non_standard`` label
(a run that is not its suite's standard evaluation, e.g. the paper suite without AutoAttack: its
minimum over attacks is not a headline figure) and the ``sanity`` section (see
:func:`sanity_checks`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = [
    "REPORT_SCHEMA",
    "SCHEMA_VERSION",
    "ReportValidationError",
    "build_report",
    "markdown_summary",
    "sanity_checks",
    "validate_report",
    "wilson_interval",
]

SCHEMA_VERSION = 2


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


_NUM = {"type": "number"}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
_CURVE = {"type": "array", "items": _NUM}
_ACC = {
    "type": "object",
    "required": ["correct", "n", "accuracy", "ci95"],
    "properties": {
        "correct": {"type": "integer", "minimum": 0},
        "n": {"type": "integer", "minimum": 0},
        "accuracy": _PROB,
        "ci95": {"type": "array", "items": _PROB, "minItems": 2, "maxItems": 2},
    },
}
_CHECK = {
    "type": "object",
    "required": ["name", "status", "values", "detail"],
    "properties": {
        "name": {"type": "string"},
        "status": {"type": "string", "enum": ["pass", "flag", "n/a"]},
        "values": {"type": "object"},
        "detail": {"type": "string"},
    },
}
_SANITY = {
    "type": "object",
    "required": ["status", "n", "runs", "checks"],
    "properties": {
        "status": {"type": "string", "enum": ["pass", "flag", "not run"]},
        "n": {"type": "integer", "minimum": 0},
        "runs": {"type": "object"},
        "checks": {"type": "array", "items": _CHECK},
        "seconds": _NUM,
    },
}
_ATTACK = {
    "type": "object",
    "required": ["name", "kind", "robust", "P", "delta_H", "entropy_curve", "state_deviation"],
    "properties": {
        "name": {"type": "string"},
        "kind": {
            "type": "string",
            "enum": [
                "pgd",
                "apgd-ce",
                "apgd-t",
                "autoattack",
                "square",
                "transfer",
                "bpda",
                "exact",
            ],
        },
        "spec": {"type": ["string", "null"]},
        "grad": {
            "type": "string",
            "enum": ["eq11", "undefended", "solver", "bpda", "exact", "none", "source-model"],
        },
        "select": {"type": "string", "enum": ["undefended", "defended", "source-model"]},
        "budget": {"type": "string"},
        "robust": _ACC,
        "n_ran": {"type": "integer", "minimum": 0},
        "P": _PROB,
        "delta_H": _NUM,
        "entropy_curve": _CURVE,
        "undefended_entropy_curve": _CURVE,
        "state_deviation": _CURVE,
    },
}
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [
        "schema_version",
        "kind",
        "config",
        "model",
        "n",
        "batches",
        "complete",
        "clean",
        "attacks",
        "headline",
        "worst_case",
        "P_stats",
        "delta_H_stats",
        "clean_entropy_curve",
        "non_standard",
        "sanity",
    ],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "kind": {"type": "string", "enum": ["deqguard.audit"]},
        "config": {"type": "object"},
        "model": {"type": "object"},
        "n": {"type": "integer", "minimum": 0},
        "n_attacked": {"type": "integer", "minimum": 0},
        "batches": {"type": "integer", "minimum": 0},
        "complete": {"type": "boolean"},
        "clean": _ACC,
        "attacks": {"type": "array", "items": _ATTACK},
        "headline": {
            "type": "object",
            "required": ["attack", "robust"],
            "properties": {
                "attack": {"type": ["string", "null"]},
                "robust": _ACC,
                "standard": {"type": "boolean"},
            },
        },
        "non_standard": {"type": "array", "items": {"type": "string"}},
        "sanity": _SANITY,
        "worst_case": _ACC,
        "P_stats": {"type": "object", "required": ["avg", "min", "max"]},
        "delta_H_stats": {"type": "object", "required": ["avg", "min", "max"]},
        "clean_entropy_curve": _CURVE,
        "clean_undefended_entropy_curve": _CURVE,
        "elapsed_s": _NUM,
        "notes": {"type": "array", "items": {"type": "string"}},
    },
}


class ReportValidationError(ValueError):
    """The report does not match REPORT_SCHEMA (message names the path)."""


_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is(value: Any, typ: str) -> bool:
    if typ == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "number":
        return (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    return isinstance(value, _TYPES[typ])


def _check(value: Any, schema: dict[str, Any], path: str) -> None:
    """The JSON Schema subset REPORT_SCHEMA uses: type, enum, required, properties, items,
    minItems/maxItems, minimum/maximum."""
    typ = schema.get("type")
    if typ is not None:
        types = typ if isinstance(typ, list) else [typ]
        if not any(_is(value, t) for t in types):
            raise ReportValidationError(
                f"{path}: expected {typ}, got {type(value).__name__} {value!r:.60}"
            )
    if "enum" in schema and value not in schema["enum"]:
        raise ReportValidationError(f"{path}: {value!r} not in {schema['enum']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ReportValidationError(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ReportValidationError(f"{path}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                raise ReportValidationError(f"{path}: missing required field {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 62):
            raise ReportValidationError(f"{path}: {len(value)} items outside the allowed count")
        if "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{i}]")


def validate_report(report: dict[str, Any]) -> None:
    """Raise ReportValidationError unless ``report`` matches REPORT_SCHEMA."""
    _check(report, REPORT_SCHEMA, "report")


def _acc(correct: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(correct, n)
    return {
        "correct": int(correct),
        "n": int(n),
        "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi],
    }


def _stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"avg": None, "min": None, "max": None}
    return {"avg": sum(values) / len(values), "min": min(values), "max": max(values)}


def _mean_curve(sums: list[list[float]], n: int) -> list[float]:
    if not sums or n == 0:
        return []
    return [sum(col) / n for col in zip(*sums)]


def build_report(
    config: dict[str, Any],
    model_info: dict[str, Any],
    plans: list[dict[str, Any]],
    batches: list[dict[str, Any]],
    *,
    total_batches: int,
    elapsed_s: float = 0.0,
    notes: list[str] | None = None,
    non_standard: list[str] | None = None,
    sanity_setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate per-batch records (see :meth:`AuditRunner.run_batch`) into the report.

    ``non_standard``: why the run is not its suite's standard evaluation (empty: it is);
    ``sanity_setup``: what the sanity runs were (budgets), merged into the sanity section."""
    batches = sorted(batches, key=lambda b: b["index"])
    n = sum(len(b["labels"]) for b in batches)
    clean_ok = [c for b in batches for c in b["clean_correct"]]
    clean_h = [h for b in batches for h in b["clean_entropy"]]
    # Older records attacked every image; newer ones say which were. The curves' per-batch
    # sums run over the attacked images only.
    hit = [a for b in batches for a in b.get("attacked", [True] * len(b["labels"]))]
    n_hit = sum(hit)
    survive = list(clean_ok)
    attacks = []
    for a, plan in enumerate(plans):
        recs = [b["attacks"][a] for b in batches]
        ok = [c for r in recs for c in r["correct"]]
        adv_h = [h for r in recs for h in r["entropy"]]
        robust = [c and o for c, o in zip(clean_ok, ok)]
        survive = [s and r for s, r in zip(survive, robust)]
        # under a cascade an attack ran on some of the attacked images only (``ran``): its
        # P, Delta H and curves are over those
        ran = [
            x
            for b, r in zip(batches, recs)
            for x in r.get("ran", b.get("attacked", [True] * len(b["labels"])))
        ]
        n_ran = sum(ran)
        pairs = [(hc, ha) for hc, ha, h in zip(clean_h, adv_h, ran) if h]
        p = sum(hc < ha for hc, ha in pairs) / n_ran if n_ran else 0.0
        dh = sum(hc - ha for hc, ha in pairs) / n_ran if n_ran else 0.0
        attacks.append(
            {
                **plan,
                "robust": _acc(sum(robust), n),
                "n_ran": n_ran,
                "P": p,
                "delta_H": dh,
                "entropy_curve": _mean_curve([r["step_entropy_sum"] for r in recs], n_ran),
                "undefended_entropy_curve": _mean_curve(
                    [r["undefended_step_entropy_sum"] for r in recs], n_ran
                ),
                "state_deviation": _mean_curve([r["state_dev_sum"] for r in recs], n_ran),
                "seconds": float(sum(r.get("seconds", 0.0) for r in recs)),
            }
        )
    strongest = min(attacks, key=lambda a: a["robust"]["correct"], default=None)
    headline = {
        "attack": None if strongest is None else strongest["name"],
        "robust": _acc(sum(clean_ok), n) if strongest is None else strongest["robust"],
        "standard": not non_standard,
    }
    report = {
        "schema_version": SCHEMA_VERSION,
        "kind": "deqguard.audit",
        "config": config,
        "model": model_info,
        "n": n,
        "batches": len(batches),
        "complete": len(batches) == total_batches,
        "clean": _acc(sum(clean_ok), n),
        "n_attacked": n_hit,
        "attacks": attacks,
        "headline": headline,
        "worst_case": _acc(sum(survive), n),
        "P_stats": _stats([a["P"] for a in attacks]),
        "delta_H_stats": _stats([a["delta_H"] for a in attacks]),
        "clean_entropy_curve": _mean_curve([b["clean_step_entropy_sum"] for b in batches], n_hit),
        "clean_undefended_entropy_curve": _mean_curve(
            [b["clean_undefended_step_entropy_sum"] for b in batches], n_hit
        ),
        "elapsed_s": float(elapsed_s),
        "notes": list(notes or []),
        "non_standard": list(non_standard or []),
        "sanity": sanity_checks(plans, batches, sanity_setup),
    }
    validate_report(report)
    return report


_TRANSFER_GRADS = ("eq11", "undefended", "solver", "source-model")
_WHITE_BOX_GRADS = ("bpda", "exact")
_LARGE_EPS_MAX = 0.05


def sanity_checks(
    plans: list[dict[str, Any]],
    batches: list[dict[str, Any]],
    setup: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sanity section: the sanity runs' accuracies on their subset and the checks.

    Over the images that carry sanity runs (``batch["sanity"]["rows"]``), an image counts as
    robust to a run or attack when the served prediction is right on the clean image and on the
    attack's output. Checks (status ``pass``, ``flag`` or ``n/a``):

    - ``large_eps``: accuracy at the large radius near 0: flagged when the lower end of its 95%
      Wilson interval exceeds 5% (a subset of ~20 images cannot tell 0% from 5% apart; a
      significant excess means the attack is broken or the gradient masked).
    - ``more_steps`` / ``more_restarts``: accuracy with 4x the steps (half the step size) / 3
      restarts not above the k-step, 1-restart PGD.
    - ``transfer_vs_white_box`` (defense on): the strongest transfer attack of the suite (gradient
      not through the defense) not stronger on the subset than the strongest white-box attack
      (through the defense: the sanity PGD runs at eps and the suite's BPDA / exact attacks);
      when it is, a sign of gradient masking.
    - ``score_based_vs_white_box`` (suites with Square): likewise for the score-based attack.
    """
    setup = dict(setup or {})
    batches = sorted(batches, key=lambda b: b["index"])
    rows = [
        (b, r, j) for b in batches if b.get("sanity") for j, r in enumerate(b["sanity"]["rows"])
    ]
    n = len(rows)
    run_names = ["large_eps", "pgd", "pgd_more_steps", "pgd_more_restarts"]

    def robust(b: dict[str, Any], r: int, ok: bool) -> bool:
        return bool(b["clean_correct"][r]) and bool(ok)

    def run_count(name: str) -> int:
        return sum(robust(b, r, b["sanity"]["runs"][name][j]) for b, r, j in rows)

    def plan_count(a: int) -> int:
        return sum(robust(b, r, b["attacks"][a]["correct"][r]) for b, r, _ in rows)

    runs: dict[str, Any] = {}
    for name in run_names:
        info = dict(setup.get("runs", {}).get(name, {}))
        if n:
            info.update(_acc(run_count(name), n))
        runs[name] = info
    section: dict[str, Any] = {
        **{k: v for k, v in setup.items() if k != "runs"},
        "n": n,
        "runs": runs,
        "seconds": float(sum(b["sanity"].get("seconds", 0.0) for b in batches if b.get("sanity"))),
    }
    if n == 0:
        section.update(status="not run", checks=[])
        return section

    def acc(k: int) -> float:
        return k / n

    checks = []
    big = run_count("large_eps")
    checks.append(
        {
            "name": "large_eps",
            "status": "pass" if wilson_interval(big, n)[0] <= _LARGE_EPS_MAX else "flag",
            "values": {"eps": runs["large_eps"].get("eps"), "correct": big, "n": n,
                       "accuracy": acc(big), "ci95": list(wilson_interval(big, n)),
                       "max_accuracy": _LARGE_EPS_MAX},
            "detail": "robust accuracy at the large radius should be near 0: flagged when the"
            " lower end of its 95% interval exceeds 5% (the attack is broken or the gradient"
            " masked)",
        }
    )  # fmt: skip
    base = run_count("pgd")
    for check, name, what in (
        ("more_steps", "pgd_more_steps", "4x the steps at half the step size"),
        ("more_restarts", "pgd_more_restarts", "3 random restarts"),
    ):
        more = run_count(name)
        checks.append(
            {
                "name": check,
                "status": "pass" if more <= base else "flag",
                "values": {"pgd": acc(base), name: acc(more), "n": n},
                "detail": f"robust accuracy with {what} must not exceed the k-step PGD's",
            }
        )
    active = bool(setup.get("defense_active", True))
    white = {f"sanity:{name}": run_count(name) for name in run_names[1:]}
    for a, p in enumerate(plans):
        if p.get("grad") in _WHITE_BOX_GRADS:
            white[p["name"]] = plan_count(a)
    w_name = min(white, key=lambda k: white[k])
    for check, grads, label in (
        ("transfer_vs_white_box", _TRANSFER_GRADS, "transfer"),
        ("score_based_vs_white_box", ("none",), "score-based"),
    ):
        other = {p["name"]: plan_count(a) for a, p in enumerate(plans) if p.get("grad") in grads}
        if check == "score_based_vs_white_box" and not other:
            continue
        if not other or not active:
            why = (
                "the defense is off: every attack is white-box"
                if not active
                else (f"no {label} attack in this suite")
            )
            checks.append({"name": check, "status": "n/a", "values": {"n": n}, "detail": why})
            continue
        o_name = min(other, key=lambda k: other[k])
        checks.append(
            {
                "name": check,
                "status": "pass" if other[o_name] >= white[w_name] else "flag",
                "values": {
                    "n": n,
                    label: {k: acc(v) for k, v in other.items()},
                    "white_box": {k: acc(v) for k, v in white.items()},
                    f"strongest_{label.replace('-', '_')}": o_name,
                    "strongest_white_box": w_name,
                },
                "detail": f"the strongest {label} attack must not beat the strongest white-box"
                " attack through the defense on the subset (else: gradient masking?)",
            }
        )
    section["checks"] = checks
    section["status"] = "flag" if any(c["status"] == "flag" for c in checks) else "pass"
    return section


def _pct(acc: dict[str, Any]) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.1f}% ({acc['correct']}/{acc['n']}; 95% CI {100 * lo:.1f}-{100 * hi:.1f})"


def markdown_summary(report: dict[str, Any], plots: list[str] | None = None) -> str:
    """A short human summary of a report."""
    cfg = report["config"]
    standard = not report.get("non_standard")
    head = "headline (min over attacks of dataset accuracy, the paper's)"
    if not standard:
        head = "min over attacks of dataset accuracy (NON-STANDARD run: not a headline figure)"
    lines = [
        f"# Audit: {report['model'].get('ref', cfg.get('model'))}, defense `{cfg.get('defense')}`, suite `{cfg.get('suite')}`",
        "",
    ]
    if not standard:
        lines += [
            "**Non-standard evaluation**: " + "; ".join(report["non_standard"]) + ". Its"
            " figures are not a robustness claim of the suite.",
            "",
        ]
    lines += [
        f"- images: first {report['n']} CIFAR-10 test images (official order); complete: {report['complete']}",
        f"- defense parameters: `{cfg.get('defense_params')}`",
        f"- eps {cfg.get('eps', 0) * 255:.0f}/255 (l_inf); PGD {cfg.get('pgd_steps')} steps of "
        f"{cfg.get('pgd_step_size', 0) * 255:.1f}/255, {cfg.get('pgd_restarts')} restart(s); seed {cfg.get('seed')}",
        f"- clean accuracy: {_pct(report['clean'])}",
        f"- {head}: {_pct(report['headline']['robust'])} by `{report['headline']['attack']}`",
        f"- per-sample worst case over all {len(report['attacks'])} attacks: {_pct(report['worst_case'])}",
    ]
    if cfg.get("cascade"):
        lines.append(
            "- cascade: each attack ran only on its family's survivors (AutoAttack's protocol);"
            " per-attack rows are cumulative within the family"
        )
    ps, ds = report["P_stats"], report["delta_H_stats"]
    if ps["avg"] is not None:
        lines.append(
            f"- P (Eq. 12) avg/min/max: {100 * ps['avg']:.1f}% / {100 * ps['min']:.1f}% / {100 * ps['max']:.1f}%;"
            f" Delta H (Eq. 13): {ds['avg']:.4f} / {ds['min']:.4f} / {ds['max']:.4f}"
        )
    lines.append(f"- wall time: {report.get('elapsed_s', 0):.0f} s")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    lines += [
        "",
        "| attack | kind | gradient | examples picked by | budget | robust accuracy | P | Delta H |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in sorted(report["attacks"], key=lambda a: a["robust"]["accuracy"])[:15]:
        lines.append(
            f"| {a['name']} | {a['kind']} | {a.get('grad', '')} | {a.get('select', '')} |"
            f" {a.get('budget', '')} | {_pct(a['robust'])} | {100 * a['P']:.1f}% | {a['delta_H']:.4f} |"
        )
    if len(report["attacks"]) > 15:
        lines.append(f"| ... {len(report['attacks']) - 15} more in the JSON report | | | | | | | |")
    lines += ["", "Every attack's output is judged by the served prediction (defended when the"
              " defense is on)."]  # fmt: skip
    lines += _sanity_lines(report.get("sanity"))
    if plots:
        lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _sanity_lines(sanity: dict[str, Any] | None) -> list[str]:
    if not sanity:
        return []
    lines = ["", f"## Sanity checks: {sanity['status'].upper()}", ""]
    if sanity["status"] == "not run":
        return lines + ["Not run (no attacked image in the sanity subset, or sanity_images = 0)."]
    lines.append(
        f"On {sanity.get('subset', 'the sanity subset')} ({sanity['n']} images; "
        f"{sanity.get('seconds', 0):.0f} s): {sanity.get('attack', '')}."
    )
    for name, run in sanity["runs"].items():
        if "accuracy" in run:
            lines.append(
                f"- run `{name}`: eps {255 * run.get('eps', 0):.0f}/255, {run.get('steps')} steps of"
                f" {255 * run.get('step_size', 0):.2f}/255, {run.get('restarts')} restart(s):"
                f" {_pct(run)}"
            )
    for c in sanity["checks"]:
        v = c["values"]
        if c["name"] == "large_eps":
            got = f"{100 * v['accuracy']:.1f}% ({v['correct']}/{v['n']})"
        elif c["name"] in ("more_steps", "more_restarts"):
            got = ", ".join(f"{k} {100 * x:.1f}%" for k, x in v.items() if k != "n")
        elif c["status"] == "n/a":
            got = "-"
        else:
            kind = "transfer" if "transfer" in v else "score-based"
            o = v[f"strongest_{kind.replace('-', '_')}"]
            w = v["strongest_white_box"]
            got = (
                f"{kind} `{o}` {100 * v[kind][o]:.1f}% vs white-box `{w}`"
                f" {100 * v['white_box'][w]:.1f}%"
            )
        lines.append(f"- **{c['status'].upper()}** `{c['name']}`: {got}. {c['detail']}")
    return lines
