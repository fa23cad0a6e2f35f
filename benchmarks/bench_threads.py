"""Device-thread policy on a shared CPU: latency and throughput of the served ``paper`` forward
with 1 or 2 torch threads, with and without a competing CPU-bound process (issue 16, item 4).

Why: with torch's default (one thread per core) and one other busy process on a 2-core machine,
an OpenMP team's threads wait for each other at every parallel region while the competitor holds
a core, so one image can take 100x longer. This measures what each policy costs and buys.

Each (policy, competitor) cell runs in a fresh subprocess (OpenMP reads its environment at
start), doing the service's own device work (``service.worker.run_batch`` on the shipped model,
preset ``paper``): single-image requests one after another (latency) and batches of 32
(throughput). The competitor is a separate process running convolution forward+backward (like a
training job) with 1 or 2 threads, started before and stopped after the cell.

Usage: python benchmarks/bench_threads.py [--model micro-trades-ri] [--budget-s 20] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402

#: name -> (torch threads, extra environment)
POLICIES: dict[str, tuple[int, dict[str, str]]] = {
    "1 thread": (1, {}),
    "2 threads": (2, {}),
    "2 threads, OMP_WAIT_POLICY=PASSIVE": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
}
COMPETITORS = (0, 1, 2)  # threads of the competing process (0: none)


def _compete(threads: int) -> None:
    """Competitor body: convolution forward + backward forever (a training job's shape)."""
    import torch

    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(64, 32, 32, 32)
    while True:
        conv(x).square().mean().backward()


def _cell(model: str, threads: int, budget_s: float) -> dict[str, float]:
    """Child body: load the model as the service does, then time single images and batches."""
    import torch

    torch.set_num_threads(threads)
    from deqguard.cpu_memory import retain_freed_memory
    from deqguard.defense import Preset, get_preset
    from deqguard.store import load_entry
    from service.settings import default_store_root
    from service.worker import _served, run_batch

    retain_freed_memory()
    served = _served(load_entry(default_store_root(), model, inference=True), None)
    paper = get_preset(Preset.PAPER)
    gen = torch.Generator().manual_seed(0)
    one = torch.rand(1, 3, 32, 32, generator=gen)
    batch = torch.rand(32, 3, 32, 32, generator=gen)
    with torch.inference_mode(False):
        run_batch(served, one, [paper], chunk=1)  # warm-up
        lat: list[float] = []
        t_end = time.perf_counter() + budget_s
        while len(lat) < 30 and (time.perf_counter() < t_end or len(lat) < 3):
            t0 = time.perf_counter()
            run_batch(served, one, [paper], chunk=1)
            lat.append(time.perf_counter() - t0)
        bt: list[float] = []
        t_end = time.perf_counter() + budget_s
        while len(bt) < 5 and (time.perf_counter() < t_end or not bt):
            t0 = time.perf_counter()
            run_batch(served, batch, [paper] * 32, chunk=32)
            bt.append(time.perf_counter() - t0)
    lat.sort()
    return {
        "n_single": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p90_ms": 1000 * lat[min(len(lat) - 1, int(0.9 * len(lat)))],
        "max_ms": 1000 * lat[-1],
        "batch32_img_per_s": 32 / statistics.median(bt),
    }


def _run_cell(model: str, policy: str, competitor: int, budget_s: float) -> dict[str, float]:
    threads, extra = POLICIES[policy]
    env = {**os.environ, **extra}
    env.pop("OMP_NUM_THREADS", None)
    comp = None
    if competitor:
        comp_env = {**os.environ, "OMP_NUM_THREADS": str(competitor)}
        comp = subprocess.Popen(
            [sys.executable, __file__, "--compete", str(competitor)], env=comp_env
        )
        time.sleep(2.0)  # let it reach its loop
    try:
        out = subprocess.run(
            [sys.executable, __file__, "--cell", model, str(threads), str(budget_s)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        if comp is not None:
            comp.kill()
            comp.wait()
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="micro-trades-ri")
    p.add_argument("--budget-s", type=float, default=20.0, help="time budget per measurement")
    p.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md section")
    p.add_argument("--compete", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cell", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.compete:
        _compete(args.compete)
        return
    if args.cell:
        model, threads, budget = args.cell
        print(json.dumps(_cell(model, int(threads), float(budget))))
        return

    started, load = now(), load_average()
    rows = []
    for competitor in COMPETITORS:
        for policy in POLICIES:
            r = _run_cell(args.model, policy, competitor, args.budget_s)
            comp = f"{competitor}-thread process" if competitor else "none"
            row = (
                f"| {comp} | {policy} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | "
                f"{r['max_ms']:.0f} | {r['n_single']} | {r['batch32_img_per_s']:.1f} |"
            )
            print(row, flush=True)
            rows.append(row)
    cmd = "python benchmarks/bench_threads.py " + " ".join(argv or sys.argv[1:])
    body = "\n".join(
        [
            "### Device threads on a shared CPU (issue 16 item 4)",
            "",
            f"`{cmd.strip()}`, commit {git_commit()}, {started}; {machine()}; "
            f"load average before: {load}. Model `{args.model}`, preset `paper` "
            "(N 8, Tf 2, R 10), the service's `run_batch`; single images one after another "
            "(latency), batches of 32 (throughput). Competitor: a separate process running "
            "convolution forward+backward with the stated threads.",
            "",
            "| competing process | device threads | single p50 ms | p90 ms | max ms | n | "
            "batch-32 img/s |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    if args.write:
        write_section("threads", body)
    print(body)


if __name__ == "__main__":
    main()
