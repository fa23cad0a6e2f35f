"""A/B of the served prediction without the defense, as the audits compute it: through
``defended_forward`` (a head at every state, for the per-step entropy) against one head at the
served state (``served_logits``; with ``--grad``, ``solve_and_classify`` under autograd, the
undefended ``SolverGradSurrogate``), on the served copy of ``micro-trades-ri@2``.

    python benchmarks/ab_served_logits.py [-n 128]           # the judge: no autograd
    python benchmarks/ab_served_logits.py --grad [-n 128]    # an attack step: forward + backward

One thread; pause other jobs (SIGSTOP). Prints the largest logit (and gradient) difference,
whether the decisions agree, and wall seconds (6 alternating repeats after a warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.defense import DefenseParams, defended_forward, served_logits
from deqguard.dynamics import solve_and_classify
from deqguard.solvers.broyden import DifferentiableBroydenSolver
from deqguard.store import default_store_root, load_entry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import alternating_wall_s, input_gradient  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=128, help="first n test images (one batch)")
    p.add_argument("--grad", action="store_true", help="forward + backward to the input")
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu", inference=True)
    model, solver, off = entry.model, entry.manifest.solver, DefenseParams(R=0)
    split = load_test(n=args.n)
    x, y = split.float_images("cpu"), split.labels
    forwards: dict[str, Callable[[Tensor], Tensor]]
    if args.grad:
        diff = DifferentiableBroydenSolver(solver)
        forwards = {
            "defended_forward": lambda v: (
                defended_forward(model, v, off, diff, steps=8, differentiable="bpda").logits
            ),
            "solve_and_classify": lambda v: (
                solve_and_classify(model, v, diff, steps=8, record=False).logits
            ),
        }
    else:
        forwards = {
            "defended_forward": lambda v: defended_forward(model, v, off, solver, steps=8).logits,
            "served_logits": lambda v: served_logits(model, v, off, solver, steps=8),
        }

    def run(f: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor | None]:
        if args.grad:
            return input_gradient(f, x, y)
        with torch.no_grad():
            return f(x), None

    (a, ga), (b, gb) = (run(f) for f in forwards.values())
    times = alternating_wall_s({k: (lambda f=f: run(f)) for k, f in forwards.items()}, 6, 3)
    out = {"n": args.n, "grad": args.grad, "logit_max_abs_diff": float((a - b).abs().max()),
           "decisions_agree": int((a.argmax(1) == b.argmax(1)).sum()), "wall_s": times}  # fmt: skip
    if ga is not None and gb is not None:
        out["grad_max_abs_diff"] = float((ga - gb).abs().max())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
