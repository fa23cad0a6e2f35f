"""Training curves of one or more runs as a PNG (from their ``metrics.jsonl``).

Usage: python -m training.curves training/state/campaign-micro-trades \
           training/state/campaign-micro-trades-ri --out docs/training-curves.png

Top: training loss (a running mean over 10 logged steps, so the random-depth noise of Sec. 3.3
does not hide the trend). Bottom: validation clean and PGD-10 accuracy, one point per validation.
The x axis is epochs (steps / steps per epoch), which means the same across sessions and machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["load_metrics", "plot_runs"]


def load_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
    """(step records, validation records, steps per epoch) of one run."""
    steps: list[dict[str, Any]] = []
    vals: list[dict[str, Any]] = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (vals if "val_pgd" in rec else steps).append(rec)
    cfg = json.loads((run_dir / "config.json").read_text())
    n_train = 50_000 - int(cfg["n_val"])
    per_epoch = max(1, n_train // int(cfg["batch_size"]))
    return steps, vals, float(per_epoch)


def _smooth(values: list[float], k: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_runs(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in run_dirs:
        steps, vals, per_epoch = load_metrics(run)
        name = run.name
        x = [r["step"] / per_epoch for r in steps if "task_loss" in r]
        y = [r["task_loss"] for r in steps if "task_loss" in r]
        top.plot(x, _smooth(y), label=name, lw=1)
        vx = [r["step"] / per_epoch for r in vals]
        (line,) = bottom.plot(vx, [100 * r["val_clean"] for r in vals], "o-", label=f"{name} clean")
        bottom.plot(
            vx,
            [100 * r["val_pgd"] for r in vals],
            "s--",
            color=line.get_color(),
            label=f"{name} PGD-10",
        )
    top.set_ylabel("training loss (task)")
    top.legend(fontsize=7)
    top.grid(alpha=0.3)
    bottom.set_xlabel("epoch")
    bottom.set_ylabel("validation accuracy (%)")
    bottom.legend(fontsize=7)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.curves", description=__doc__)
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    print(plot_runs(args.runs, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
