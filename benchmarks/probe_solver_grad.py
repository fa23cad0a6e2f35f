"""APGD-CE on the served prediction with two gradients: the audits' default (Ka 5 damped steps
from the served state, ``ServedSurrogate``) and backpropagation through every solver step
(``SolverGradSurrogate``). Why: the first is the served prediction's gradient only near a fixed
point, and the campaign's TRADES run lost its fixed point (docs/TRAINING.md).

    python benchmarks/probe_solver_grad.py -n 64                    # undefended, one thread
    python benchmarks/probe_solver_grad.py -n 32 --defense paper    # through the defense, BPDA
    python benchmarks/probe_solver_grad.py --profile -n 128         # one step's time, per op

Prints one JSON line per model: images attacked (clean-correct under the served prediction),
robust under each gradient, robust under both, CPU seconds. Models: the shipped
``micro-trades-ri@2`` and the campaign's TRADES run (its validation-selected and latest weights,
from training/state/; ``--no-last`` skips the latter).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deqguard.attacks.apgd import ServedSurrogate, SolverGradSurrogate, apgd_attack
from deqguard.configs import SolverConfig
from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.defense import DefenseParams, get_preset
from deqguard.store import default_store_root, load_entry
from training.evaluate import load_run_model

RUN = Path("training/state/campaign-micro-trades")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=64, help="first n test images")
    p.add_argument("--defense", default="off", help="preset (off: undefended)")
    p.add_argument("--no-last", action="store_true", help="skip the TRADES run's latest state")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead: time forward + backward of the solver-gradient surrogate on the shipped"
        " model (3 repeats) and print torch.profiler's per-op table of one",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    if args.profile:
        profile_step(args.n, args.defense)
        return
    params = DefenseParams(R=0) if args.defense == "off" else get_preset(args.defense)
    split = load_test(n=args.n)
    x, y = split.float_images("cpu"), split.labels
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu")
    models = [("micro-trades-ri@2", entry.model.eval(), entry.manifest.solver)]
    if RUN.is_dir():
        for which in ("best",) if args.no_last else ("best", "last"):
            m, meta = load_run_model(RUN, which)
            label = f"campaign-micro-trades {which} (step {meta['step']})"
            models.append((label, m, SolverConfig(name="broyden", max_steps=8)))
    for name, model, solver in models:
        unrolled = ServedSurrogate(model, params, solver, steps=8, ka=5)
        exact = SolverGradSurrogate(model, solver, steps=8, params=params)
        with torch.no_grad():
            ok = unrolled(x).argmax(1) == y
        xi, yi = x[ok], y[ok]
        out: dict[str, object] = {
            "model": name,
            "defense": args.defense,
            "n": args.n,
            "clean": int(ok.sum()),
        }
        robust = {}
        for label, surrogate in (("ka5", unrolled), ("solver", exact)):
            t = time.process_time()
            _, correct = apgd_attack(surrogate, xi, yi, loss="ce", n_iter=100, seed=0)
            out[label], out[f"{label}_s"] = int(correct.sum()), round(time.process_time() - t, 1)
            robust[label] = correct
        out["both"] = int((robust["ka5"] & robust["solver"]).sum())
        print(json.dumps(out), flush=True)


def profile_step(n: int, defense: str) -> None:
    """Where a step of an attack on the solver's gradient goes (``micro-trades-ri@2``)."""
    from torch.profiler import ProfilerActivity, profile

    params = DefenseParams(R=0) if defense == "off" else get_preset(defense)
    split = load_test(n=n)
    x, y = split.float_images("cpu"), split.labels
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu")
    surrogate = SolverGradSurrogate(entry.model.eval(), entry.manifest.solver, params=params)

    def step() -> None:
        xx = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(surrogate(xx), y)
        torch.autograd.grad(loss, xx)

    step()  # warm-up
    times = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        times.append(round(time.perf_counter() - t, 2))
    print(json.dumps({"n": n, "defense": defense, "forward_backward_s": times}), flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
