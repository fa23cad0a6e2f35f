"""PNG plots of an audit report (matplotlib, Agg backend; nothing is shown)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_plots"]


def _save(fig: Any, out: Path, name: str) -> str:
    """Lay out, write and close one figure; returns its file name."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return name


def write_plots(report: dict[str, Any], out_dir: str | Path, prefix: str = "") -> list[str]:
    """Accuracy per attack (per state for Eq. 11 attacks, as in Fig. 3a), entropy along the
    dynamics clean vs attacked (Figs. 2c, 3b) and the relative state deviation (Fig. 3c).
    Returns the file names written in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    attacks = report["attacks"]
    written: list[str] = []
    if not attacks:
        return written
    strongest = min(attacks, key=lambda a: a["robust"]["accuracy"])

    # 1. accuracy per attack
    fig, ax = plt.subplots(figsize=(6, 3.5))
    inter = [a for a in attacks if a.get("spec") and a["kind"] in ("pgd", "bpda", "exact")]
    if inter:
        for lam, marker in ((0.5, "o"), (1.0, "s")):
            pts = [
                (int(a["spec"].split("-")[0][1:]), a)
                for a in inter
                if a["spec"].endswith(f"lam{lam:g}")
            ]
            if not pts:
                continue
            xs = [i for i, _ in pts]
            ys = [100 * a["robust"]["accuracy"] for _, a in pts]
            ax.scatter(xs, ys, alpha=0.25, marker=marker, label=f"lambda={lam:g} (all Ka)")
            best: dict[int, float] = {}
            for i, y in zip(xs, ys):
                best[i] = min(best.get(i, 101.0), y)
            ax.plot(
                sorted(best),
                [best[i] for i in sorted(best)],
                marker=marker,
                label=f"lambda={lam:g} (min)",
            )
        ax.set_xlabel("attacked state z[i]")
    others = [a for a in attacks if a not in inter]
    if others:
        base = max([int(a["spec"].split("-")[0][1:]) for a in inter] or [0]) + 1
        for k, a in enumerate(others):
            ax.bar(base + k, 100 * a["robust"]["accuracy"], width=0.6, label=a["name"])
    ax.axhline(100 * report["clean"]["accuracy"], color="k", ls="--", lw=1, label="clean")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("Accuracy under each attack (defended decision)")
    ax.legend(fontsize=6)
    written.append(_save(fig, out, f"{prefix}accuracy.png"))

    # 2. entropy along the dynamics
    fig, ax = plt.subplots(figsize=(6, 3.5))
    curves = [
        ("clean, defended", report["clean_entropy_curve"]),
        ("clean, undefended", report.get("clean_undefended_entropy_curve", [])),
        (f"{strongest['name']}, defended", strongest["entropy_curve"]),
        (f"{strongest['name']}, undefended", strongest.get("undefended_entropy_curve", [])),
    ]
    for label, c in curves:
        if c:
            ax.plot(range(1, len(c) + 1), c, marker=".", label=label)
    ax.set_xlabel("state z[t]")
    ax.set_ylabel("mean prediction entropy (nats)")
    ax.set_title("Entropy along the neural dynamics")
    if ax.get_legend_handles_labels()[0]:  # nothing to draw when no image was attacked
        ax.legend(fontsize=6)
    written.append(_save(fig, out, f"{prefix}entropy.png"))

    # 3. relative state deviation
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for a in sorted(attacks, key=lambda a: a["robust"]["accuracy"])[:5]:
        c = a["state_deviation"]
        ax.plot(range(1, len(c) + 1), [100 * v for v in c], marker=".", label=a["name"])
    ax.set_xlabel("state z[t]")
    ax.set_ylabel("||z~[t] - z[t]|| / ||z[t]|| (%)")
    ax.set_title("Relative state deviation, attacked vs clean (5 strongest attacks)")
    ax.legend(fontsize=6)
    written.append(_save(fig, out, f"{prefix}state_deviation.png"))
    return written
