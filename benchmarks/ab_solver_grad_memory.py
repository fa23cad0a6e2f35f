"""A/B of the differentiable Broyden's memory layout: one forward + backward of the
solver-gradient surrogate (``SolverGradSurrogate``, undefended) on ``micro-trades-ri@2``.

- ``slots``: a [B, memory, D] buffer written with ``index_copy`` and read as a slice of its
  filled slots (until commit 07dc110): each read's backward zero-fills and copies a full-size
  gradient;
- ``current``: ``DifferentiableBroydenSolver`` as it is (buffers of exactly the filled slots,
  grown with ``cat``).

    python benchmarks/ab_solver_grad_memory.py [-n 128] [--repeats 5]

One thread, first n test images, alternating in one process (pause other jobs: SIGSTOP).
Prints whether the logits are identical, the largest gradient difference, and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deqguard.attacks.apgd import SolverGradSurrogate
from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.solvers.base import SolverState
from deqguard.solvers.broyden import BroydenSolver, DifferentiableBroydenSolver
from deqguard.store import default_store_root, load_entry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import alternating_wall_s, input_gradient  # noqa: E402


class SlotsBroyden(BroydenSolver):
    """The layout before: fixed [B, memory, D] buffers, replaced whole at every write."""

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        shape = (state.z.shape[0], self.config.memory, state.z.shape[1])
        return {"us": state.z.new_zeros(shape), "vts": state.z.new_zeros(shape), "count": 0}

    def _write_slot(self, mem: dict[str, Any], u: Tensor, vt: Tensor) -> None:
        slot = torch.tensor([mem["count"] % self.config.memory], device=u.device)
        mem["us"] = mem["us"].index_copy(1, slot, u.unsqueeze(1))
        mem["vts"] = mem["vts"].index_copy(1, slot, vt.unsqueeze(1))
        mem["count"] += 1

    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        mem = state.memory
        if bool(which.all()):
            mem["count"] = 0
            return
        keep = (~which).to(mem["us"].dtype)[:, None, None]
        mem["us"], mem["vts"] = mem["us"] * keep, mem["vts"] * keep

    def _put_memory_rows(self, mem: dict[str, Any], key: str, rows: Tensor, value: Tensor) -> None:
        mem[key] = mem[key].index_put((rows,), value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=128, help="first n test images (one batch)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu")
    split = load_test(n=args.n)
    x, y = split.float_images("cpu"), split.labels
    cfg = entry.manifest.solver
    surrogates = {}
    for name, cls in (("slots", SlotsBroyden), ("current", DifferentiableBroydenSolver)):
        surrogate = SolverGradSurrogate(entry.model.eval(), cfg)
        surrogate.solver = cls(cfg)
        surrogates[name] = surrogate

    out = {name: input_gradient(s, x, y) for name, s in surrogates.items()}  # also the warm-up
    runs = {name: (lambda s=s: input_gradient(s, x, y)) for name, s in surrogates.items()}
    times = alternating_wall_s(runs, args.repeats)
    print(
        json.dumps(
            {
                "n": args.n,
                "logits_identical": torch.equal(out["slots"][0], out["current"][0]),
                "grad_max_abs_diff": float((out["slots"][1] - out["current"][1]).abs().max()),
                "wall_s": times,
            }
        )
    )


if __name__ == "__main__":
    main()
