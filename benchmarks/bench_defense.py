"""Defended inference throughput over the paper's Table 10 grid, with the work each setting does
and the fraction of this machine's conv compute bound, all measured in the same run.

For each model (random weights, the served form, float32, Broyden N = 8 with tol 0 so every
sample pays every step) and each (Tf, R) of Tf 1/2/4/8 x R 5/10/20 plus R = 0 (the undefended
served path: z[N] and the entropy at every state): median samples/s of ``defended_forward`` as
the paper's Algorithm 1 runs it (interventions after every step t with t mod Tf = 0, t = N
included, each followed by the line-13 redo). Work per sample is counted on a real call: the
f-evaluations and input-gradient steps the result reports, and the MACs of every conv and linear
layer that ran (forward hooks; a layer whose output carries a gradient is counted twice, for its
backward to the input). The bound is (MAC rate of the model's largest conv alone, this run) /
(MACs per sample). Next to it: the work the authors' loop does for the same prediction, where
IMPLEMENTATION-NOTES.md counts it. No cross-machine speed ratios: their samples/s were measured
elsewhere.

Usage: python benchmarks/bench_defense.py [--models tiny micro large] [--grid full|minimal]
       [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402
from deqguard.configs import SolverConfig  # noqa: E402
from deqguard.cpu_memory import retain_freed_memory  # noqa: E402
from deqguard.defense import DefenseParams, defended_forward  # noqa: E402
from deqguard.models import build_model, prepare_for_inference  # noqa: E402

N = 8
BATCH = {"tiny": 64, "micro": 64, "large": 8, "xl": 8}
TFS = (1, 2, 4, 8)
RS = (5, 10, 20)
# The authors' loop, per prediction (IMPLEMENTATION-NOTES.md): f-evaluations (solver and
# unrolled tail included) and input-gradient passes through stem, f and head. Counted there only
# for the undefended path and for Tf 2, R 10.
AUTHORS_WORK = {0: (19, 0), (2, 10): (66, 40)}

ConvRecord = tuple[int, tuple[int, ...], nn.Conv2d]


def count_macs(model: nn.Module, fn: Callable[[], object]) -> tuple[float, list[ConvRecord]]:
    """MACs of one call of ``fn`` over its conv and linear layers, a layer whose output needs a
    gradient counted twice (forward + backward to its input; weights need none in the served
    form), and each conv's (forward MACs, input shape, layer)."""
    total = 0.0
    convs: list[ConvRecord] = []

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
            convs.append((macs, tuple(inp[0].shape), mod))
        else:
            macs = out.numel() * mod.in_features
        total += macs * (2 if out.requires_grad else 1)

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return total, convs


def conv_rate(convs: list, repeats: int = 10) -> float:
    """MAC/s of the largest conv of the model, run alone (oneDNN, this machine, now): the better
    of NCHW and channels-last (the layout the model runs in), best of ``repeats``."""
    macs, shape, mod = max(convs, key=lambda c: c[0])
    best = float("inf")
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.rand(shape).contiguous(memory_format=layout)
        w = mod.weight.detach().contiguous(memory_format=layout)
        with torch.no_grad():
            F.conv2d(x, w, None, mod.stride, mod.padding)
            for _ in range(repeats):
                t0 = time.perf_counter()
                F.conv2d(x, w, None, mod.stride, mod.padding)
                best = min(best, time.perf_counter() - t0)
    return macs / best


def measure(model, x: torch.Tensor, params: DefenseParams, repeats: int) -> tuple[float, float]:
    """Run after :func:`work`, which warms the setting up. (wall-clock samples/s, samples per CPU-second of this process x threads): the second
    is what the wall-clock figure would be if this process had its threads' cores to itself."""
    cfg = SolverConfig(max_steps=N, tol=0.0)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        defended_forward(model, x, params, cfg, steps=N)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    threads = torch.get_num_threads()
    return x.shape[0] / statistics.median(times), x.shape[0] * threads / statistics.median(cpu)


def work(model: nn.Module, x: torch.Tensor, params: DefenseParams) -> dict[str, float]:
    """Per-sample work of one defended forward: f-evaluations and input-gradient steps as the
    result reports them, and the MACs that ran (see :func:`count_macs`)."""
    cfg = SolverConfig(max_steps=N, tol=0.0)
    res: list = []
    macs, convs = count_macs(
        model, lambda: res.append(defended_forward(model, x, params, cfg, steps=N))
    )
    out = res[0]
    batch = x.shape[0]
    return {
        "f_evals": out.nfe.double().mean().item(),
        "grad_steps": out.grad_steps.double().mean().item(),
        "interventions": out.acted.any(dim=1).sum().item(),
        "macs_per_sample": macs / batch,
        "_convs": convs,
    }


def run(models: list[str], grid: str, repeats: int) -> dict:
    out: dict = {
        "machine": machine(),
        "date": now(),
        "commit": git_commit(),
        "load_before": load_average(),
        "grid": grid,
    }
    for name in models:
        torch.manual_seed(0)
        model = prepare_for_inference(build_model(name))  # what the service runs
        batch = BATCH[name]
        x = torch.rand(batch, 3, 32, 32)
        if grid == "full" and name != "large":
            points = [(1, 0)] + [(tf, r) for tf in TFS for r in RS]
        else:  # large, or --grid minimal: the undefended and the paper's setting
            points = [(1, 0), (2, 10)]
        rows, rate = [], None
        for tf, r in points:
            params = DefenseParams(R=r, Tf=tf)
            w = work(model, x, params)
            convs = w.pop("_convs")
            if rate is None:
                rate = conv_rate(convs)
            sps, cpu_sps = measure(model, x, params, repeats)
            bound = rate / w["macs_per_sample"]
            a_f, a_g = AUTHORS_WORK.get(0 if r == 0 else (tf, r), (None, None))
            rows.append(
                {
                    "Tf": tf, "R": r, "samples_per_s": sps, "cpu_time_samples_per_s": cpu_sps,
                    **w, "bound_samples_per_s": bound, "fraction_of_bound": sps / bound,
                    "authors_f_evals": a_f, "authors_grad_steps": a_g,
                }
            )  # fmt: skip
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
        out[name] = {"batch": batch, "conv_mac_rate": rate, "rows": rows}
    out["load_after"] = load_average()
    return out


def markdown(res: dict, argv: list[str]) -> str:
    lines = [
        f"## Defended inference (Table 10 grid: {res.get('grid', 'full')})",
        "",
        f"Command: `python benchmarks/bench_defense.py {' '.join(argv)}`; {res['date']},"
        f" commit {res['commit']}.",
        f"Machine: {res['machine']}. Load average before/after: {res['load_before']} /"
        f" {res['load_after']}. 'CPU time' divides the batch by this process's CPU seconds over"
        " its threads (what the wall-clock figure would be with its cores to itself).",
        "Random weights, the served form (`prepare_for_inference`), float32, Broyden N = 8 with"
        " tol 0 (every sample pays every step); median of the repeats. Algorithm 1 as the paper"
        " writes it: interventions after steps Tf, 2Tf, ... <= N (N included), each followed by"
        " the line-13 redo of that step. R = 0 (Tf -) is the undefended served path. Work per"
        " sample, counted on a real call: f-evaluations and input-gradient steps as the result"
        " reports them (the f-passes inside gradient steps are in the MACs, not in f-evals);"
        " MACs of every conv and linear that ran, twice where a gradient flows back through it."
        " Bound: MAC rate of the model's largest conv alone (this run, best of NCHW and"
        " channels-last) / MACs per sample. Authors: the work their loop does for the same"
        " prediction (IMPLEMENTATION-NOTES.md; counted there only for these two settings):"
        " f-evaluations / input-gradient passes through stem, f and head."
        + (
            " Freed memory retained in the process, as the service does (`deqguard.cpu_memory`)."
            if res.get("retain_memory")
            else " glibc's default allocator policy (`--release-memory`)."
        ),
        "",
    ]
    for name in [k for k in res if isinstance(res[k], dict) and "rows" in res[k]]:
        r = res[name]
        lines += [
            f"### {name}, batch {r['batch']}",
            "",
            f"Measured conv rate {r['conv_mac_rate'] / 1e9:.1f} GMAC/s.",
            "",
            "| Tf | R | samples/s (wall) | samples/s (CPU time) | interventions | f-evals"
            " | grad steps | MMACs / sample | bound | % of bound (wall / CPU time)"
            " | authors: f-evals / grad passes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            tf = "-" if row["R"] == 0 else row["Tf"]
            auth = (
                "-"
                if row["authors_f_evals"] is None
                else f"{row['authors_f_evals']} / {row['authors_grad_steps']}"
            )
            lines.append(
                f"| {tf} | {row['R']} | {row['samples_per_s']:.1f} |"
                f" {row['cpu_time_samples_per_s']:.1f} | {row['interventions']} |"
                f" {row['f_evals']:.0f} | {row['grad_steps']:.0f} |"
                f" {row['macs_per_sample'] / 1e6:.0f} | {row['bound_samples_per_s']:.1f} |"
                f" {100 * row['fraction_of_bound']:.0f}% /"
                f" {100 * row['cpu_time_samples_per_s'] / row['bound_samples_per_s']:.0f}% |"
                f" {auth} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["tiny", "micro", "large"], choices=sorted(BATCH)
    )
    ap.add_argument("--grid", choices=["full", "minimal"], default="full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--section", default="bench-defense", help="section key in BENCHMARKS.md")
    ap.add_argument(
        "--release-memory",
        action="store_true",
        help="leave glibc's default of returning freed memory (the service retains it)",
    )
    args = ap.parse_args(argv)
    if not args.release_memory:
        retain_freed_memory()  # as the service does (deqguard.cpu_memory)
    res = run(args.models, args.grid, args.repeats)
    res["retain_memory"] = not args.release_memory
    md = markdown(res, [a for a in argv if a != "--write"])
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.write:
        write_section(args.section, md)


if __name__ == "__main__":
    main()
