"""A/B of Broyden implementations: speed on `tiny` and served decisions on the shipped models.

Three forms of the same limited-memory "good" Broyden update, all computing z - B g with
B = -I + U V^T (they differ in rounding only):

- ``v1``: coefficients as bmm(V, x) (until commit f5a1f50);
- ``textbook``: coefficients as bmm(x^T, V^T), the update written term by term (until 7c768eb);
- ``current``: ``deqguard.solvers.broyden`` as it is (fewer passes over [B, D]: baddbmm, and
  dg = df - dz).

Usage (numbers quoted in docs/BENCHMARKS.md):

    python benchmarks/ab_broyden.py speed --old textbook --new current
        # tiny, random weights, served form, batch 64, 2 threads, Broyden N 8 with tol 0;
        # undefended and Tf 2 R 10, alternating in one process, best of 3 wall
    python benchmarks/ab_broyden.py decisions --old textbook --new current [-n 1000]
        # both shipped models, presets off and paper, first n test images, 1 thread:
        # how many served decisions are identical
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import deqguard.solvers as solvers  # noqa: E402
from deqguard.configs import SolverConfig  # noqa: E402
from deqguard.cpu_memory import retain_freed_memory  # noqa: E402
from deqguard.solvers.base import SolverState  # noqa: E402
from deqguard.solvers.broyden import BroydenSolver  # noqa: E402


def _v1_matvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(torch.bmm(vts, x.unsqueeze(2)).transpose(1, 2), us).squeeze(1) - x


def _v1_rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(torch.bmm(us, x.unsqueeze(2)).transpose(1, 2), vts).squeeze(1) - x


def _tb_matvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(torch.bmm(x.unsqueeze(1), vts.transpose(1, 2)), us).squeeze(1) - x


def _tb_rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    return torch.bmm(torch.bmm(x.unsqueeze(1), us.transpose(1, 2)), vts).squeeze(1) - x


class _TermByTerm(BroydenSolver):
    """The update as it was written until commit 7c768eb, with a choice of matvec layout."""

    matvec = staticmethod(_tb_matvec)
    rmatvec = staticmethod(_tb_rmatvec)

    def _propose(self, state: SolverState) -> Tensor:
        g = state.fz - state.z
        if state.memory["count"] == 0:
            return state.z + g
        us, vts = self._used(state)
        return state.z - self.matvec(us, vts, g)

    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        mem = state.memory
        us, vts = self._used(state)
        dz = z_new - state.z
        dg = (fz_new - z_new) - (state.fz - state.z)
        if not bool(moved.all()):
            mask = moved[:, None].to(z_new.dtype)
            dz, dg = dz * mask, dg * mask
        vt = self.rmatvec(us, vts, dz)
        denom = (vt * dg).sum(dim=1, keepdim=True)
        u = (dz - self.matvec(us, vts, dg)) / denom
        ok = (denom.abs() > 1e-30) & torch.isfinite(denom) & moved[:, None]
        if not bool(ok.all()):
            u = torch.where(ok, u, torch.zeros_like(u))
            vt = torch.where(ok, vt, torch.zeros_like(vt))
        slot = mem["count"] % self.config.memory
        mem["us"][:, slot] = u
        mem["vts"][:, slot] = vt
        mem["count"] += 1


class _V1(_TermByTerm):
    matvec = staticmethod(_v1_matvec)
    rmatvec = staticmethod(_v1_rmatvec)


FORMS: dict[str, type[BroydenSolver]] = {
    "v1": _V1,
    "textbook": _TermByTerm,
    "current": BroydenSolver,
}


def _use(form: str) -> None:
    """Every Broyden solver built from a SolverConfig from now on has this form."""
    solvers._SOLVERS["broyden"] = FORMS[form]


def speed(old: str, new: str) -> None:
    from deqguard.defense import DefenseParams, defended_forward
    from deqguard.models import build_model, prepare_for_inference

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = prepare_for_inference(build_model("tiny"))
    x = torch.rand(64, 3, 32, 32)
    cfg = SolverConfig(max_steps=8, tol=0.0)
    for name, p in (("off", DefenseParams(R=0, Tf=1)), ("paper", DefenseParams(R=10, Tf=2))):
        times: dict[str, list[float]] = {old: [], new: []}
        for _ in range(3):
            for form in (old, new):
                _use(form)
                defended_forward(model, x, p, cfg, steps=8)  # warm-up
                t0 = time.perf_counter()
                defended_forward(model, x, p, cfg, steps=8)
                times[form].append(time.perf_counter() - t0)
        rates = {k: round(64 / min(v), 1) for k, v in times.items()}
        print(name, rates, "samples/s (wall, 2 threads, best of 3)", flush=True)
    _use("current")


def decisions(old: str, new: str, n: int) -> None:
    from deqguard.data import load_test
    from deqguard.defense import Preset, get_preset
    from deqguard.store import load_entry
    from service.worker import _served, run_batch

    torch.set_num_threads(1)
    x = load_test(n=n).float_images()
    for model in ("micro-trades-ri", "micro-trades"):
        served = _served(load_entry("model_store", model, "cpu", inference=True), None)
        for preset in (Preset.OFF, Preset.PAPER):
            p = get_preset(preset)
            preds = {}
            for form in (old, new):
                _use(form)
                with torch.inference_mode(False):
                    outs = run_batch(served, x, [p] * x.shape[0], chunk=64)
                preds[form] = torch.tensor([o.class_index for o in outs])
            same = int((preds[old] == preds[new]).sum())
            print(model, preset.value, f"identical decisions {same}/{n}", flush=True)
    _use("current")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["speed", "decisions"])
    ap.add_argument("--old", choices=sorted(FORMS), default="textbook")
    ap.add_argument("--new", choices=sorted(FORMS), default="current")
    ap.add_argument("-n", type=int, default=1000, help="test images (decisions)")
    args = ap.parse_args()
    retain_freed_memory()
    if args.mode == "speed":
        speed(args.old, args.new)
    else:
        decisions(args.old, args.new, args.n)


if __name__ == "__main__":
    main()
