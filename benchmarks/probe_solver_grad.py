"""APGD-CE on the undefended served prediction with two gradients: the audits' default (Ka 5
damped steps from z[8], ``ServedSurrogate``) and backpropagation through the 8 Broyden steps
(``SolverGradSurrogate``). Why: the first is the served prediction's gradient only near a fixed
point, and the campaign's TRADES run lost its fixed point (docs/TRAINING.md).

    python benchmarks/probe_solver_grad.py 64     # first 64 test images, one thread

Prints one JSON line per model: images attacked (clean-correct), robust under each gradient,
robust under both, CPU seconds. Models: the shipped ``micro-trades-ri@2`` and the campaign's
TRADES run (its validation-selected and latest weights, from training/state/).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from deqguard.attacks.apgd import ServedSurrogate, SolverGradSurrogate, apgd_attack
from deqguard.configs import SolverConfig
from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.defense import DefenseParams
from deqguard.store import default_store_root, load_entry
from training.evaluate import load_run_model

RUN = Path("training/state/campaign-micro-trades")


def main(n: int) -> None:
    torch.set_num_threads(1)
    retain_freed_memory()
    split = load_test(n=n)
    x, y = split.float_images("cpu"), split.labels
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu")
    models = [("micro-trades-ri@2", entry.model.eval(), entry.manifest.solver)]
    if RUN.is_dir():
        for which in ("best", "last"):
            m, meta = load_run_model(RUN, which)
            label = f"campaign-micro-trades {which} (step {meta['step']})"
            models.append((label, m, SolverConfig(name="broyden", max_steps=8)))
    for name, model, solver in models:
        unrolled = ServedSurrogate(model, DefenseParams(R=0), solver, steps=8, ka=5)
        exact = SolverGradSurrogate(model, solver, steps=8)
        with torch.no_grad():
            ok = unrolled(x).argmax(1) == y
        xi, yi = x[ok], y[ok]
        out: dict[str, object] = {"model": name, "n": n, "clean": int(ok.sum())}
        robust = {}
        for label, surrogate in (("ka5", unrolled), ("bptt", exact)):
            t = time.process_time()
            _, correct = apgd_attack(surrogate, xi, yi, loss="ce", n_iter=100, seed=0)
            out[label], out[f"{label}_s"] = int(correct.sum()), round(time.process_time() - t, 1)
            robust[label] = correct
        out["both"] = int((robust["ka5"] & robust["bptt"]).sum())
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
