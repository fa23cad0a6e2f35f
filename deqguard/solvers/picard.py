"""Plain (optionally damped) fixed-point iteration z <- (1 - d) z + d f(z)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from deqguard.solvers.base import FixedPointSolver, SolverState

__all__ = ["PicardSolver"]


class PicardSolver(FixedPointSolver):
    """No memory: each step is one (damped) application of f."""

    def _init_memory(self, state: SolverState) -> dict[str, Any]:
        return {}

    def _propose(self, state: SolverState) -> Tensor:
        d = self.config.damping
        if d == 1.0:
            return state.fz
        return (1 - d) * state.z + d * state.fz

    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        return None

    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        return None
