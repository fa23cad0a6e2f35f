"""Defended inference throughput over the paper's Table 10 grid, next to the authors' figures
and this machine's conv compute bound.

For each model (random weights, eval mode, float32, Broyden N = 8 with tol 0 so every sample pays
every step) and each (Tf, R): median samples/s of ``defended_forward``. R = 0 is the undefended
served path (early state z[N] plus the entropy at every state). The bound is
(measured MAC rate of the model's largest conv, alone) / (MACs per sample of that setting,
counted with hooks; an input-gradient step costs its forward MACs twice).

Usage: python benchmarks/bench_defense.py [--models tiny micro large] [--grid full|reduced]
       [--repeats 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402
from deqguard.configs import SolverConfig  # noqa: E402
from deqguard.defense import DefenseParams, defended_forward  # noqa: E402
from deqguard.models import build_model, prepare_for_inference  # noqa: E402

N = 8
BATCH = {"tiny": 64, "micro": 64, "large": 8, "xl": 8}
TFS = (1, 2, 4, 8)
RS = (0, 1, 5, 10, 20)
# The authors' implementation on a 2-core CPU (IMPLEMENTATION-NOTES.md), samples/s.
AUTHORS = {
    "tiny": {
        0: 52.0,
        (1, 1): 16.0, (1, 5): 7.3, (1, 10): 4.7, (1, 20): 2.7,
        (2, 1): 24.8, (2, 5): 13.3, (2, 10): 8.6, (2, 20): 4.9,
        (4, 1): 29.4, (4, 5): 19.6, (4, 10): 13.6, (4, 20): 8.7,
        (8, 1): 31.0, (8, 5): 24.4, (8, 10): 19.0, (8, 20): 14.0,
    },
    "large": {0: 14.5, (2, 10): 2.6},
}  # fmt: skip


def _count_macs(model: nn.Module, fn) -> tuple[int, list[tuple[int, tuple, nn.Conv2d]]]:
    """MACs of one call of ``fn`` (convs and linears), and each conv's (macs, input shape, layer)."""
    total = 0
    convs: list[tuple[int, tuple, nn.Conv2d]] = []

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
            convs.append((macs, tuple(inp[0].shape), mod))
        else:
            macs = out.numel() * mod.in_features
        total += macs

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total, convs


def part_macs(model, batch: int) -> dict[str, float]:
    """Per-sample MACs of the stem, one f and one head call."""
    x = torch.rand(batch, 3, 32, 32)
    inj = model.inject(x)
    z = torch.rand(batch, model.state_size)
    stem, c1 = _count_macs(model, lambda: model.inject(x))
    f, c2 = _count_macs(model, lambda: model.cell(z, inj))
    inner = model.cell_inner(z)
    f_outer, _ = _count_macs(model, lambda: model.cell_outer(z, inner, inj))
    head, c3 = _count_macs(model, lambda: model.head(z))
    return {
        "stem": stem / batch,
        "f": f / batch,
        "f_outer": f_outer / batch,
        "head": head / batch,
        "_convs": c1 + c2 + c3,
    }


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


def setting_macs(p: dict[str, float], tf: int, r: int) -> float:
    """Per-sample MACs of one defended forward at (Tf, R), N = 8 (as deqguard does it)."""
    n_int = sum(1 for t in range(1, N) if t % tf == 0) if r > 0 else 0
    fwd = p["stem"] + (1 + N) * p["f"] + N * p["head"]
    # per intervention: the z-only part of f once, the new stem, the restart's input-dependent
    # part of f, the post-update entropy's head
    fwd += n_int * (p["f"] - p["f_outer"] + p["stem"] + p["f_outer"] + p["head"])
    grad = n_int * r * 2 * (p["stem"] + p["f_outer"] + p["head"])
    return fwd + grad


def authors_macs(p: dict[str, float], tf: int, r: int) -> float | None:
    """Per-sample MACs of the authors' loop from their counts in the notes (Tf = 2, R = 10:
    66 f-evaluations, 40 input-gradient passes through stem, f and head, 45 stem and 81 head
    calls); None for other settings (not counted there)."""
    if (tf, r) != (2, 10):
        return None
    return 66 * p["f"] + 45 * p["stem"] + 81 * p["head"] + 40 * (p["stem"] + p["f"] + p["head"])


def measure(model, x: torch.Tensor, params: DefenseParams, repeats: int) -> tuple[float, float]:
    """(wall-clock samples/s, samples per CPU-second of this process x threads): the second
    is what the wall-clock figure would be if this process had its threads' cores to itself."""
    cfg = SolverConfig(max_steps=N, tol=0.0)
    defended_forward(model, x, params, cfg, steps=N)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        defended_forward(model, x, params, cfg, steps=N)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    threads = torch.get_num_threads()
    return x.shape[0] / statistics.median(times), x.shape[0] * threads / statistics.median(cpu)


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
        parts = part_macs(model, batch)
        rate = conv_rate(parts.pop("_convs"))
        if grid == "full" and name != "large":
            points = [(1, 0)] + [(tf, r) for tf in TFS for r in RS if r > 0]
        elif grid == "reduced" and name != "large":
            points = [(1, 0), (2, 10), (2, 5), (4, 10), (1, 20)]
        else:  # large, or --grid minimal: the undefended and the paper's setting
            points = [(1, 0), (2, 10)]
        rows = []
        for tf, r in points:
            sps, cpu_sps = measure(model, x, DefenseParams(R=r, Tf=tf), repeats)
            macs = setting_macs(parts, tf, r)
            bound = rate / macs
            ref = AUTHORS.get(name, {}).get(0 if r == 0 else (tf, r))
            rows.append(
                {
                    "Tf": tf, "R": r, "samples_per_s": sps, "cpu_time_samples_per_s": cpu_sps,
                    "authors": ref, "speedup": None if ref is None else sps / ref,
                    "cpu_time_speedup": None if ref is None else cpu_sps / ref,
                    "macs_per_sample": macs, "bound_samples_per_s": bound, "fraction_of_bound": sps / bound,
                }
            )  # fmt: skip
            print(json.dumps({"model": name, **rows[-1]}), flush=True)
        out[name] = {"batch": batch, "parts_macs": parts, "conv_mac_rate": rate, "rows": rows}
    out["load_after"] = load_average()
    return out


def markdown(res: dict, argv: list[str]) -> str:
    lines = [
        f"## Defended inference (Table 10 grid: {res.get('grid', 'full')})",
        "",
        f"Command: `python benchmarks/bench_defense.py {' '.join(argv)}`; {res['date']}, commit {res['commit']}.",
        f"Machine: {res['machine']}. Load average before/after: {res['load_before']} / {res['load_after']}"
        " (other jobs shared the 2 cores: the wall-clock figures are lower bounds). 'CPU time'"
        " divides the batch by this process's CPU seconds over its threads: the throughput it would"
        " have with its cores to itself (an estimate that assumes perfect use of both threads).",
        "Random weights, the served form (`prepare_for_inference`: BatchNorm folded, eval only), float32, Broyden N = 8 with tol 0 (every sample pays every step);"
        " median of the repeats. R = 0 is the undefended served path (z[N] plus entropy at all 8 states)."
        " Authors: their own code on a 2-core CPU (IMPLEMENTATION-NOTES.md). Bound: MAC rate of the"
        " model's largest conv alone (best of NCHW and channels-last) / MACs per sample of the setting (an input-gradient step counts"
        " its forward MACs twice). Tf = 8 with N = 8 never intervenes (an update after the last step"
        " changes nothing), so it costs what R = 0 costs; the authors pay for those updates.",
        "",
    ]
    for name in [k for k in res if isinstance(res[k], dict) and "rows" in res[k]]:
        r = res[name]
        p = r["parts_macs"]
        lines += [
            f"### {name}, batch {r['batch']}",
            "",
            f"MACs per sample: stem {p['stem'] / 1e6:.1f}M, f {p['f'] / 1e6:.1f}M (of which"
            f" {p['f_outer'] / 1e6:.1f}M depend on the input), head {p['head'] / 1e6:.1f}M;"
            f" measured conv rate {r['conv_mac_rate'] / 1e9:.1f} GMAC/s.",
            "",
            "| Tf | R | samples/s (wall) | speedup (wall) | samples/s (CPU time) | speedup (CPU time)"
            " | authors | bound | % of bound (wall / CPU time) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in r["rows"]:
            a = "-" if row["authors"] is None else f"{row['authors']:.1f}"
            s = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
            c = "-" if row["cpu_time_speedup"] is None else f"{row['cpu_time_speedup']:.2f}x"
            tf = "-" if row["R"] == 0 else row["Tf"]
            lines.append(
                f"| {tf} | {row['R']} | {row['samples_per_s']:.1f} | {s} | "
                f"{row['cpu_time_samples_per_s']:.1f} | {c} | {a} | "
                f"{row['bound_samples_per_s']:.1f} | {100 * row['fraction_of_bound']:.0f}% / "
                f"{100 * row['cpu_time_samples_per_s'] / row['bound_samples_per_s']:.0f}% |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models", nargs="+", default=["tiny", "micro", "large"], choices=sorted(BATCH)
    )
    ap.add_argument("--grid", choices=["full", "reduced", "minimal"], default="full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--write", action="store_true", help="update docs/BENCHMARKS.md")
    ap.add_argument("--section", default="bench-defense", help="section key in BENCHMARKS.md")
    args = ap.parse_args(argv)
    res = run(args.models, args.grid, args.repeats)
    md = markdown(res, [a for a in argv if a != "--write"])
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.write:
        write_section(args.section, md)


if __name__ == "__main__":
    main()
