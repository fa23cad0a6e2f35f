"""A/B of Broyden's coefficient layout on `tiny` (random weights, served form), batch 64, 2 threads:
the old bmm(V, x) against the current bmm(x^T, V^T), alternating in one process, best of 3 wall.

Usage: python benchmarks/ab_broyden_layout.py   (numbers quoted in docs/BENCHMARKS.md)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import deqguard.solvers.broyden as br  # noqa: E402
from deqguard.configs import SolverConfig  # noqa: E402
from deqguard.cpu_memory import retain_freed_memory  # noqa: E402
from deqguard.defense import DefenseParams, defended_forward  # noqa: E402
from deqguard.models import build_model, prepare_for_inference  # noqa: E402


def _old_matvec(us: torch.Tensor, vts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    coef = torch.bmm(vts, x.unsqueeze(2))
    return torch.bmm(coef.transpose(1, 2), us).squeeze(1) - x


def _old_rmatvec(us: torch.Tensor, vts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    coef = torch.bmm(us, x.unsqueeze(2))
    return torch.bmm(coef.transpose(1, 2), vts).squeeze(1) - x


def main() -> None:
    torch.set_num_threads(2)
    retain_freed_memory()
    layouts = {"old": (_old_matvec, _old_rmatvec), "new": (br._matvec, br._rmatvec)}
    torch.manual_seed(0)
    model = prepare_for_inference(build_model("tiny"))
    x = torch.rand(64, 3, 32, 32)
    cfg = SolverConfig(max_steps=8, tol=0.0)
    for name, p in (("off", DefenseParams(R=0, Tf=1)), ("paper", DefenseParams(R=10, Tf=2))):
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(3):
            for tag, (m, r) in layouts.items():
                br._matvec, br._rmatvec = m, r
                defended_forward(model, x, p, cfg, steps=8)  # warm-up
                t0 = time.perf_counter()
                defended_forward(model, x, p, cfg, steps=8)
                times[tag].append(time.perf_counter() - t0)
        rates = {k: round(64 / min(v), 1) for k, v in times.items()}
        print(name, rates, "samples/s (wall, 2 threads, best of 3)")
    br._matvec, br._rmatvec = layouts["new"]


if __name__ == "__main__":
    main()
