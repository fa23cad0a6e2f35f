"""Limited-memory Broyden's method (the "good" inverse update) on g(z) = f(z) - z.

The inverse Jacobian estimate is B = -I + sum_m u_m v_m^T, kept as secant pairs in a circular
buffer of ``memory`` slots per sample; the step is z <- z - B g(z) (no line search), so the first
step from a fresh memory is the plain iteration z <- f(z).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deqguard.solvers.base import FixedPointSolver, SolverState

__all__ = ["BroydenSolver"]


def _matvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """B x with B = -I + U V^T. us, vts [B, M, D]; x [B, D] -> [B, D].

    The coefficients are x^T V as a [B, 1, D] x [B, D, M] product: on CPU that reads the
    memory row by row and ran 4-7x faster than V^T x as [B, M, D] x [B, D, 1] (64 x 8 x
    30720, one thread; ``python benchmarks/probe_f.py broyden``); the sums differ in rounding only.
    """
    coef = torch.bmm(x.unsqueeze(1), vts.transpose(1, 2))  # [B, 1, M]
    return torch.bmm(coef, us).squeeze(1) - x  # = -x + ..., one pass fewer


def _rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """x^T B. us, vts [B, M, D]; x [B, D] -> [B, D]."""
    coef = torch.bmm(x.unsqueeze(1), us.transpose(1, 2))  # [B, 1, M]
    return torch.bmm(coef, vts).squeeze(1) - x


class BroydenSolver(FixedPointSolver):
    """Per-sample limited-memory Broyden; see :class:`FixedPointSolver` for the API."""

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        b, d = state.z.shape
        m = self.config.memory
        zeros = torch.zeros(b, m, d, device=state.z.device, dtype=state.z.dtype)
        return {"us": zeros, "vts": zeros.clone(), "count": 0}

    def _used(self, state: SolverState) -> tuple[Tensor, Tensor]:
        """The filled slots only (the buffer fills up during the first ``memory`` steps)."""
        mem = state.memory
        k = min(mem["count"], self.config.memory)
        return mem["us"][:, :k], mem["vts"][:, :k]

    def _propose(self, state: SolverState) -> Tensor:
        g = state.fz - state.z
        if state.memory["count"] == 0:
            return state.z + g
        us, vts = self._used(state)
        return state.z - _matvec(us, vts, g)

    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        mem = state.memory
        us, vts = self._used(state)
        dz = z_new - state.z
        dg = (fz_new - z_new) - (state.fz - state.z)
        if not bool(moved.all()):
            mask = moved[:, None].to(z_new.dtype)
            dz, dg = dz * mask, dg * mask
        vt = _rmatvec(us, vts, dz)
        denom = (vt * dg).sum(dim=1, keepdim=True)
        u = (dz - _matvec(us, vts, dg)) / denom
        ok = (denom.abs() > 1e-30) & torch.isfinite(denom) & moved[:, None]
        if not bool(ok.all()):  # usually every row updates: skip two passes over [B, D]
            u = torch.where(ok, u, torch.zeros_like(u))
            vt = torch.where(ok, vt, torch.zeros_like(vt))
        slot = mem["count"] % self.config.memory
        mem["us"][:, slot] = u  # in place: memory tensors are never shared outside the state
        mem["vts"][:, slot] = vt
        mem["count"] += 1

    def _idle(self, state: SolverState) -> None:
        """A step with every row held: a zero pair (it adds nothing to B) in the next slot."""
        mem = state.memory
        slot = mem["count"] % self.config.memory
        mem["us"][:, slot] = 0.0
        mem["vts"][:, slot] = 0.0
        mem["count"] += 1

    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        """Forget rows ``which``. When that is every row, restarting the slot count is enough
        (only the first ``count`` slots are ever read); otherwise the rows' pairs are zeroed
        in place (a zero pair adds nothing to B), touching those rows only: the buffers are
        [B, memory, D], far larger than the state."""
        mem = state.memory
        if bool(which.all()):
            mem["count"] = 0
            return
        rows = which.nonzero().squeeze(1)
        if rows.numel():
            mem["us"][rows] = 0.0
            mem["vts"][rows] = 0.0
