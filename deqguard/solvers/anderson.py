"""Anderson acceleration (type II, with the affine constraint) on f.

The history holds ``memory`` (z, f(z)) pairs per sample in a circular buffer. It starts (and
restarts after ``retarget``) filled with copies of the current pair: duplicates are harmless
under the sum-to-one constraint, so every sample always solves the same-size system and the
first step is the plain (or damped) iteration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from deqguard.solvers.base import FixedPointSolver, SolverState

__all__ = ["AndersonSolver"]


class AndersonSolver(FixedPointSolver):
    """Per-sample Anderson acceleration; mixing ``damping`` (beta), regulariser ``anderson_lam``."""

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        m = self.config.memory
        xs = state.z.unsqueeze(1).expand(-1, m, -1).clone()
        fs = state.fz.unsqueeze(1).expand(-1, m, -1).clone()
        return {"xs": xs, "fs": fs, "count": 0}

    def _push(self, state: SolverState) -> None:
        """Record the pair at the current iterate in the next slot."""
        mem = state.memory
        slot = mem["count"] % self.config.memory
        mem["xs"][:, slot] = state.z  # in place: never shared outside the state
        mem["fs"][:, slot] = state.fz
        mem["count"] += 1

    def _idle(self, state: SolverState) -> None:
        """A step with every row held records the (repeated) current pair, as _propose would."""
        self._push(state)

    def _propose(self, state: SolverState) -> Tensor:
        self._push(state)
        mem = state.memory
        m = self.config.memory
        xs, fs = mem["xs"], mem["fs"]
        g = fs - xs  # [B, m, D]
        g = g.to(torch.promote_types(g.dtype, torch.float32))
        b = g.shape[0]
        gram = torch.bmm(g, g.transpose(1, 2))  # [B, m, m]
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
        eye = torch.eye(m, device=g.device, dtype=g.dtype)
        h = torch.zeros(b, m + 1, m + 1, device=g.device, dtype=g.dtype)
        h[:, 0, 1:] = 1
        h[:, 1:, 0] = 1
        h[:, 1:, 1:] = gram / scale + self.config.anderson_lam * eye
        rhs = torch.zeros(b, m + 1, 1, device=g.device, dtype=g.dtype)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(h, rhs)[:, 1:, 0]  # [B, m]
        alpha = torch.nan_to_num(alpha).to(xs.dtype).unsqueeze(1)
        beta = self.config.damping
        mixed_f = torch.bmm(alpha, fs).squeeze(1)
        if beta == 1.0:
            return mixed_f
        return beta * mixed_f + (1 - beta) * torch.bmm(alpha, xs).squeeze(1)

    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        # History is appended in _propose (it needs the pair at the current iterate).
        return None

    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        mem = state.memory
        sel = which[:, None, None]
        mem["xs"] = torch.where(sel, state.z.unsqueeze(1), mem["xs"])
        mem["fs"] = torch.where(sel, state.fz.unsqueeze(1), mem["fs"])
