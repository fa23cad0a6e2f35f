"""Training throughput: TRADES vs TRADES + Sec. 3.3 random intermediate states on `micro`.

The two methods alternate step by step (A, B, A, B, ...) in one process, so a shared machine's
varying load hits both alike; the ratio is the figure of merit (the paper reports about 1.27x
for TRADES on an RTX 3090: 24.0 vs 30.6 samples/s). Random depths make single steps noisy:
use several steps. Recipes: `paper` (10 attack steps of 2/255, phantom K = 5, 8 solver steps
in the attack) and `cpu` (the shipped CPU recipe, training/configs/micro-trades.toml).

Usage: python benchmarks/bench_training.py [--recipe cpu paper] [--batch 32] [--steps 4] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402


def _recipes() -> dict[str, dict[str, object]]:
    from training.config import load_config_file

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    cpu = load_config_file(root / "micro-trades.toml")
    paper = dict(
        cpu,
        phantom_k=5,
        attack_steps=10,
        attack_step_size=2 / 255,
        attack_solver_steps=8,
        attack_phantom_k=5,
    )
    return {"cpu": cpu, "paper": paper}


def measure(recipe: dict[str, object], batch: int, steps: int, threads: int) -> dict[str, float]:
    """Median samples/s of TRADES and TRADES+RI over ``steps`` alternating timed steps."""
    import torch

    from training.config import TrainConfig
    from training.trainer import Trainer

    torch.set_num_threads(threads)
    base = TrainConfig.from_dict(
        dict(
            recipe,
            name="bench",
            batch_size=batch,
            schedule="steps",
            total_steps=1000,
            pretrain_steps=0,
            val_samples=0,
            threads=threads,
            progress=False,
            out_dir="/tmp/deqguard-bench",
        )
    )
    trainers = {
        "trades": Trainer(replace(base, random_intermediate="off")),
        "trades_ri": Trainer(replace(base, random_intermediate="batch")),
    }
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for i in range(steps + 1):  # step 0 is a warm-up
        for key, tr in trainers.items():
            t0 = time.perf_counter()
            tr.train_step(i)
            if i > 0:
                times[key].append(time.perf_counter() - t0)
    out = {k: batch / statistics.median(v) for k, v in times.items()}
    out["speedup"] = out["trades_ri"] / out["trades"]
    out["mean_speedup"] = sum(times["trades"]) / sum(times["trades_ri"])
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", nargs="+", choices=["cpu", "paper"], default=["cpu", "paper"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    args = ap.parse_args(argv)
    recipes = _recipes()
    rows = []
    load_before = load_average()
    for name in args.recipe:
        r = measure(recipes[name], args.batch, args.steps, args.threads)
        print(name, {k: round(v, 3) for k, v in r.items()}, flush=True)
        rows.append(
            f"| {name} | {args.batch} | {r['trades']:.2f} | {r['trades_ri']:.2f} | "
            f"{r['speedup']:.2f}x | {r['mean_speedup']:.2f}x |"
        )
    if args.write:
        cmd = " ".join(["python benchmarks/bench_training.py", *(argv or sys.argv[1:])])
        body = "\n".join(
            [
                "## Training throughput: TRADES vs TRADES + random intermediate states (micro)",
                "",
                f"`{cmd}` — {now()}, commit {git_commit()}.",
                f"Machine: {machine()}. Load average before/after: {load_before} / "
                f"{load_average()} (shared machine; the two methods alternate step by step, so "
                "the ratio is fairer than the absolute numbers).",
                "",
                "| recipe | batch | TRADES samples/s (median) | TRADES+RI samples/s (median) "
                "| speedup (medians) | speedup (total time) |",
                "|---|---|---|---|---|---|",
                *rows,
                "",
                f"{args.steps} timed steps per method after one warm-up step; Broyden N = 8, "
                "random depth per forward call (per batch). Paper (RTX 3090, DEQ-Large): "
                "TRADES 24.0, with Sec. 3.3 30.6 samples/s (1.27x).",
            ]
        )
        write_section("bench-training", body)


if __name__ == "__main__":
    main()
