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

__all__ = ["BroydenSolver", "DifferentiableBroydenSolver"]


def _coefficients(x: Tensor, mem: Tensor) -> Tensor:
    """x^T M^T for each sample: x [B, D], mem [B, M, D] -> [B, 1, M].

    As a [B, 1, D] x [B, D, M] product: on CPU that reads the memory row by row and ran 4-7x
    faster than M x as [B, M, D] x [B, D, 1] (64 x 8 x 30720, one thread;
    ``python benchmarks/probe_f.py broyden``); the sums differ in rounding only.
    """
    return torch.bmm(x.unsqueeze(1), mem.transpose(1, 2))


def _minus_low_rank(base: Tensor, us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """base - U V^T x in one pass over [B, D]: base, x [B, D]; us, vts [B, M, D]."""
    return torch.baddbmm(base.unsqueeze(1), _coefficients(x, vts), us, alpha=-1).squeeze(1)


def _rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """x^T B. us, vts [B, M, D]; x [B, D] -> [B, D] (one pass: baddbmm)."""
    return torch.baddbmm(x.unsqueeze(1), _coefficients(x, us), vts, beta=-1).squeeze(1)


class BroydenSolver(FixedPointSolver):
    """Per-sample limited-memory Broyden; see :class:`FixedPointSolver` for the API."""

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        # Uninitialised: only the first ``count`` slots are ever read (``_used``), and each is
        # written before the count reaches it; zero-filling 2 x [B, M, D] cost 5-10 ms a solve
        # on `tiny` at batch 64.
        b, d = state.z.shape
        shape = (b, self.config.memory, d)
        return {"us": state.z.new_empty(shape), "vts": state.z.new_empty(shape), "count": 0}

    def _used(self, state: SolverState) -> tuple[Tensor, Tensor]:
        """The filled slots only (the buffer fills up during the first ``memory`` steps)."""
        mem = state.memory
        k = min(mem["count"], self.config.memory)
        return mem["us"][:, :k], mem["vts"][:, :k]

    def _propose(self, state: SolverState) -> Tensor:
        # z - B g with g = f(z) - z and B = -I + U V^T is f(z) - U (V^T g): one pass over
        # [B, D] besides g (the memory's bmm reads aside); the same value up to rounding.
        if state.memory["count"] == 0:
            return state.fz
        g = state.fz - state.z
        us, vts = self._used(state)
        return _minus_low_rank(state.fz, us, vts, g)

    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        # The "good" update with dz = z_new - z and dg = g(z_new) - g(z) = df - dz, where
        # df = f(z_new) - f(z):  v^T = dz^T B,  u = (dz - B dg) / (v^T dg) = (df - U V^T dg) /
        # (v^T dg). Written so that every [B, D] result is one pass (baddbmm, in-place ops), the
        # dot product a bmm (no [B, D] temporary): 8 passes a step where the textbook form takes
        # 13; the same values up to rounding.
        mem = state.memory
        us, vts = self._used(state)
        dz = z_new - state.z
        df = fz_new - state.fz
        if not bool(moved.all()):
            mask = moved[:, None].to(z_new.dtype)
            dz, df = dz.mul_(mask), df.mul_(mask)
        dg = df - dz
        vt = _rmatvec(us, vts, dz)
        denom = torch.bmm(vt.unsqueeze(1), dg.unsqueeze(2)).squeeze(2)  # [B, 1]
        u = _minus_low_rank(df, us, vts, dg).div_(denom)
        ok = (denom.abs() > 1e-30) & torch.isfinite(denom) & moved[:, None]
        if not bool(ok.all()):  # usually every row updates: skip two passes over [B, D]
            u = torch.where(ok, u, torch.zeros_like(u))
            vt = torch.where(ok, vt, torch.zeros_like(vt))
        self._write_slot(mem, u, vt)

    def _write_slot(self, mem: dict[str, Any], u: Tensor, vt: Tensor) -> None:
        """The pair (u, v^T) [B, D] into the next slot of the circular buffer."""
        slot = mem["count"] % self.config.memory
        mem["us"][:, slot] = u  # in place: memory tensors are never shared outside the state
        mem["vts"][:, slot] = vt
        mem["count"] += 1

    def _idle(self, state: SolverState) -> None:
        """A step with every row held: a zero pair (it adds nothing to B) in the next slot."""
        zero = state.z.new_zeros(state.z.shape)
        self._write_slot(state.memory, zero, zero)

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


class DifferentiableBroydenSolver(BroydenSolver):
    """The same iterates, with every memory write out of place, so autograd can run through
    the solve (an attack on the served prediction's exact gradient: backpropagation through
    all N steps from z = 0, not an implicit or unrolled approximation of it).

    The in-place writes of :class:`BroydenSolver` would overwrite tensors that earlier steps'
    products saved for backward. Here the buffers hold exactly the filled slots, [B, k, D]
    with k = min(count, memory): a write appends (``cat``) until the buffer is full, then
    replaces its slot out of place (``index_copy``). So no step reads a slice of a larger
    buffer, whose backward would zero-fill and copy a full [B, memory, D] gradient per read:
    that was 30% of a forward + backward on ``micro`` at batch 128, and dropping it took about
    20% off the step (``benchmarks/ab_solver_grad_memory.py``, docs/BENCHMARKS.md). The
    values are bit-identical.
    """

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        empty = state.z.new_zeros((state.z.shape[0], 0, state.z.shape[1]))
        return {"us": empty, "vts": empty, "count": 0}

    def _used(self, state: SolverState) -> tuple[Tensor, Tensor]:
        return state.memory["us"], state.memory["vts"]

    def _write_slot(self, mem: dict[str, Any], u: Tensor, vt: Tensor) -> None:
        if mem["us"].shape[1] < self.config.memory:  # filling up: slot count is the next one
            mem["us"] = torch.cat((mem["us"], u.unsqueeze(1)), 1)
            mem["vts"] = torch.cat((mem["vts"], vt.unsqueeze(1)), 1)
        else:
            slot = torch.tensor([mem["count"] % self.config.memory], device=u.device)
            mem["us"] = mem["us"].index_copy(1, slot, u.unsqueeze(1))
            mem["vts"] = mem["vts"].index_copy(1, slot, vt.unsqueeze(1))
        mem["count"] += 1

    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        mem = state.memory
        if bool(which.all()):
            state.memory = self._init_memory(state)
            return
        keep = (~which).to(mem["us"].dtype)[:, None, None]
        mem["us"], mem["vts"] = mem["us"] * keep, mem["vts"] * keep

    def _put_memory_rows(self, mem: dict[str, Any], key: str, rows: Tensor, value: Tensor) -> None:
        mem[key] = mem[key].index_put((rows,), value)
