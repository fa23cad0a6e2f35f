"""Forward throughput and peak memory of the undefended DEQ forward (Broyden, N = 8).

Each (model, batch) runs in a fresh subprocess so that its peak resident memory is its own.
Usage: python benchmarks/bench_forward.py [--models micro large] [--batches 1 64] [--write]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402


def _measure(model_name: str, batch: int, repeats: int, steps: int) -> dict[str, float]:
    import torch

    from deqguard.configs import SolverConfig
    from deqguard.dynamics import deq_forward
    from deqguard.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name).eval()
    x = torch.rand(batch, 3, 32, 32)
    cfg = SolverConfig(max_steps=steps, tol=0)  # tol 0: every sample pays all N steps
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    deq_forward(model, x, cfg, record=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        deq_forward(model, x, cfg, record=False)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(times)
    return {
        "samples_per_s": batch / med,
        "median_s": med,
        "peak_rss_mib": peak,
        "rss_before_forward_mib": rss_before,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["micro", "large"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        res = _measure(args.child[0], int(args.child[1]), args.repeats, args.steps)
        print(json.dumps(res))
        return
    rows = []
    for m in args.models:
        for b in args.batches:
            reps = (
                args.repeats if not (m in ("large", "xl") and b > 8) else max(2, args.repeats // 2)
            )
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    m,
                    str(b),
                    "--repeats",
                    str(reps),
                    "--steps",
                    str(args.steps),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((m, b, res))
            print(m, b, json.dumps(res), flush=True)
    cmd = "python benchmarks/bench_forward.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "## Undefended forward (core)",
        "",
        f"Command: `{cmd.strip()}` (commit {git_commit()}, {now()}).",
        f"Machine: {machine()}; load average before the run: {load_average()}.",
        f"Broyden, N = {args.steps} steps (tol 0: every sample pays every step, N + 1 f-evaluations), "
        "head on the last raw iterate, float32, eval mode, random weights and inputs. "
        "Peak RSS is the whole process (Python + torch + model + activations).",
        "",
        "| model | batch | samples/s | median s / batch | peak RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, b, r in rows:
        lines.append(
            f"| {m} | {b} | {r['samples_per_s']:.1f} | {r['median_s']:.3f} | {r['peak_rss_mib']:.0f} |"
        )
    if args.write:
        write_section("forward", "\n".join(lines))


if __name__ == "__main__":
    main()
