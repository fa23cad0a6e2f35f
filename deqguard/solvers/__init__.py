"""Resumable, per-sample fixed-point solvers (Broyden, Anderson, plain iteration)."""

from deqguard.configs import SolverConfig
from deqguard.solvers.anderson import AndersonSolver
from deqguard.solvers.base import (
    CellFn,
    FixedPointSolver,
    SolverState,
    Trajectory,
    relative_residual,
)
from deqguard.solvers.broyden import BroydenSolver
from deqguard.solvers.picard import PicardSolver

__all__ = [
    "AndersonSolver",
    "BroydenSolver",
    "CellFn",
    "FixedPointSolver",
    "PicardSolver",
    "SolverConfig",
    "SolverState",
    "Trajectory",
    "make_solver",
    "relative_residual",
]

_SOLVERS: dict[str, type[FixedPointSolver]] = {
    "broyden": BroydenSolver,
    "anderson": AndersonSolver,
    "picard": PicardSolver,
}


def make_solver(config: SolverConfig | None = None, **overrides: object) -> FixedPointSolver:
    """The solver named by ``config.name`` (default: Broyden, N = 8, tol 1e-3)."""
    if config is None:
        config = SolverConfig(**overrides)  # type: ignore[arg-type]
    elif overrides:
        from dataclasses import replace

        config = replace(config, **overrides)  # type: ignore[arg-type]
    return _SOLVERS[config.name](config)
