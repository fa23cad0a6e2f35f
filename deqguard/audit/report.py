"""Audit reports: per-batch records -> one JSON report (validated against REPORT_SCHEMA),
a Markdown summary. Statistics are computed here, from per-sample records, never estimated.

Accuracy conventions: a sample counts as robust to an attack when the defended model is right on
the clean image and on the attack's output. The paper's headline is the minimum over attacks of
the dataset-level accuracy; the stricter per-sample worst case counts a sample only when it
survives every attack. P and Delta H (Eqs. 12, 13) compare the entropy of the reported prediction
on the clean image and on its attacked counterpart.
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
    "validate_report",
    "wilson_interval",
]

SCHEMA_VERSION = 1


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
_ATTACK = {
    "type": "object",
    "required": ["name", "kind", "robust", "P", "delta_H", "entropy_curve", "state_deviation"],
    "properties": {
        "name": {"type": "string"},
        "kind": {
            "type": "string",
            "enum": ["pgd", "autoattack", "bpda", "exact", "square", "transfer"],
        },
        "spec": {"type": ["string", "null"]},
        "robust": _ACC,
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
            "properties": {"attack": {"type": ["string", "null"]}, "robust": _ACC},
        },
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
) -> dict[str, Any]:
    """Aggregate per-batch records (see :meth:`AuditRunner.run_batch`) into the report."""
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
        pairs = [(hc, ha) for hc, ha, h in zip(clean_h, adv_h, hit) if h]
        p = sum(hc < ha for hc, ha in pairs) / n_hit if n_hit else 0.0
        dh = sum(hc - ha for hc, ha in pairs) / n_hit if n_hit else 0.0
        attacks.append(
            {
                **plan,
                "robust": _acc(sum(robust), n),
                "P": p,
                "delta_H": dh,
                "entropy_curve": _mean_curve([r["step_entropy_sum"] for r in recs], n_hit),
                "undefended_entropy_curve": _mean_curve(
                    [r["undefended_step_entropy_sum"] for r in recs], n_hit
                ),
                "state_deviation": _mean_curve([r["state_dev_sum"] for r in recs], n_hit),
                "seconds": float(sum(r.get("seconds", 0.0) for r in recs)),
            }
        )
    strongest = min(attacks, key=lambda a: a["robust"]["correct"], default=None)
    headline = {
        "attack": None if strongest is None else strongest["name"],
        "robust": _acc(sum(clean_ok), n) if strongest is None else strongest["robust"],
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
    }
    validate_report(report)
    return report


def _pct(acc: dict[str, Any]) -> str:
    lo, hi = acc["ci95"]
    return f"{100 * acc['accuracy']:.1f}% ({acc['correct']}/{acc['n']}; 95% CI {100 * lo:.1f}-{100 * hi:.1f})"


def markdown_summary(report: dict[str, Any], plots: list[str] | None = None) -> str:
    """A short human summary of a report."""
    cfg = report["config"]
    lines = [
        f"# Audit: {report['model'].get('ref', cfg.get('model'))}, defense `{cfg.get('defense')}`, suite `{cfg.get('suite')}`",
        "",
        f"- images: first {report['n']} CIFAR-10 test images (official order); complete: {report['complete']}",
        f"- defense parameters: `{cfg.get('defense_params')}`",
        f"- eps {cfg.get('eps', 0) * 255:.0f}/255 (l_inf); PGD {cfg.get('pgd_steps')} steps of "
        f"{cfg.get('pgd_step_size', 0) * 255:.1f}/255, {cfg.get('pgd_restarts')} restart(s); seed {cfg.get('seed')}",
        f"- clean accuracy: {_pct(report['clean'])}",
        f"- headline (min over attacks of dataset accuracy, the paper's): {_pct(report['headline']['robust'])}"
        f" by `{report['headline']['attack']}`",
        f"- per-sample worst case over all {len(report['attacks'])} attacks: {_pct(report['worst_case'])}",
    ]
    ps, ds = report["P_stats"], report["delta_H_stats"]
    if ps["avg"] is not None:
        lines.append(
            f"- P (Eq. 12) avg/min/max: {100 * ps['avg']:.1f}% / {100 * ps['min']:.1f}% / {100 * ps['max']:.1f}%;"
            f" Delta H (Eq. 13): {ds['avg']:.4f} / {ds['min']:.4f} / {ds['max']:.4f}"
        )
    lines.append(f"- wall time: {report.get('elapsed_s', 0):.0f} s")
    for note in report.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", "| attack | kind | robust accuracy | P | Delta H |", "|---|---|---|---|---|"]
    for a in sorted(report["attacks"], key=lambda a: a["robust"]["accuracy"])[:15]:
        lines.append(
            f"| {a['name']} | {a['kind']} | {_pct(a['robust'])} | {100 * a['P']:.1f}% | {a['delta_H']:.4f} |"
        )
    if len(report["attacks"]) > 15:
        lines.append(f"| ... {len(report['attacks']) - 15} more in the JSON report | | | | |")
    if plots:
        lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"
