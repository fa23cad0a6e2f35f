"""Shared machinery of the fixed-point solvers: state, trajectory, per-sample bookkeeping.

A solver finds z with z = f(z) for a batch of flat states z [B, D]. Unlike off-the-shelf DEQ
solvers it is *resumable*: everything it knows lives in an explicit :class:`SolverState`, which
can be advanced k steps at a time and re-targeted to a new f (a changed input) before continuing.
That is what the paper's Algorithm 1 needs, and what makes "4 chunks of 2 steps = 1 run of 8" hold.

Conventions: every step costs one evaluation of f per active sample, and starting costs one
(k steps = k + 1 evaluations). Tensors are never modified in place after they are stored in a
state or a trajectory, so recorded iterates stay valid.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deqguard.configs import SolverConfig

__all__ = [
    "CellFn",
    "FixedPointSolver",
    "SolverState",
    "Trajectory",
    "relative_residual",
]

CellFn = Callable[[Tensor, Tensor | None], Tensor]
"""f for the solver: ``fn(z, index)`` with z [b, D] the rows ``index`` (int64 [b]) of the batch,
or all rows when ``index`` is None. Returns f(z) [b, D]."""

_EPS = 1e-8


def relative_residual(z: Tensor, fz: Tensor) -> Tensor:
    """Per-sample ||f(z) - z|| / ||f(z)||: [B, D], [B, D] -> [B] (float32)."""
    diff = (fz - z).float().flatten(1).norm(dim=1)
    return diff / (fz.float().flatten(1).norm(dim=1) + _EPS)


@dataclass
class Trajectory:
    """The raw iterate after every solver step, in order, with its per-sample residual.

    ``states[t]`` is z[t + 1] [B, D] (the state after step t + 1); ``residuals[t]`` is [B].
    """

    states: list[Tensor] = field(default_factory=list)
    residuals: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.states)

    def append(self, z: Tensor, residual: Tensor) -> None:
        self.states.append(z)
        self.residuals.append(residual)

    def stacked_states(self) -> Tensor:
        """[T, B, D]."""
        return torch.stack(self.states)

    def stacked_residuals(self) -> Tensor:
        """[T, B]."""
        return torch.stack(self.residuals)


@dataclass
class SolverState:
    """Everything a solver needs to continue: current iterate, f at it, bookkeeping, memory.

    Shapes: z, fz, best_z [B, D]; residual, best_residual, first_residual [B] float32;
    converged, diverged [B] bool; nfe [B] int64 (f-evaluations spent on each sample).
    ``memory`` holds the solver-specific tensors (Broyden secant pairs, Anderson history).
    """

    z: Tensor
    fz: Tensor
    residual: Tensor
    best_z: Tensor
    best_residual: Tensor
    best_step: Tensor
    first_residual: Tensor
    converged: Tensor
    diverged: Tensor
    nfe: Tensor
    steps: int = 0
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> Tensor:
        """[B] bool: samples that still move."""
        return ~(self.converged | self.diverged)

    @property
    def batch_size(self) -> int:
        return self.z.shape[0]


class FixedPointSolver(ABC):
    """Base class: subclasses define the proposal rule and their memory; this class does the rest.

    Usage::

        state = solver.init(fn, z0)            # 1 f-evaluation
        state = solver.advance(fn, state, 2)   # 2 more steps (2 evaluations)
        state = solver.retarget(fn2, state)    # f changed (new input): 1 evaluation
        state = solver.advance(fn2, state, 2)

    ``select_rows`` / ``merge_rows`` snapshot some rows and put them back, which is how the
    test-time defense redoes a step under a changed input from the memory as it was before.
    """

    def __init__(self, config: SolverConfig) -> None:
        self.config = config

    # ------------------------------------------------------------------ hooks
    @abstractmethod
    def _init_memory(self, state: SolverState) -> dict[str, Any]: ...

    @abstractmethod
    def _propose(self, state: SolverState) -> Tensor:
        """The next iterate for every sample [B, D] (inactive rows are discarded)."""

    @abstractmethod
    def _observe(self, state: SolverState, z_new: Tensor, fz_new: Tensor, moved: Tensor) -> None:
        """Update the memory with the step z -> z_new (``state`` still holds the old iterate)."""

    @abstractmethod
    def _reset_memory(self, state: SolverState, which: Tensor) -> None:
        """Forget the memory of samples ``which`` [B] bool (their f changed)."""

    def _idle(self, state: SolverState) -> None:
        """Update the memory for a step in which no sample moved (default: nothing to do).

        Solvers with a batch-wide slot counter advance it here as a step with every row held
        would, so the counter only depends on the number of steps taken: that is what lets
        :meth:`merge_rows` put rows of two states that took the same steps back together.
        """
        return None

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, fn: CellFn, z: Tensor, which: Tensor, fallback: Tensor) -> Tensor:
        """f(z) on the rows ``which`` [B] bool; other rows take ``fallback``.

        Evaluates the whole batch unless few rows are needed (``skip_fraction``): gathering a
        subset is only worth it when it saves real compute.
        """
        n = int(which.sum())
        batch = z.shape[0]
        if n == 0:
            return fallback
        if n == batch:
            return fn(z, None).to(z.dtype)
        if n <= self.config.skip_fraction * batch:
            index = which.nonzero().squeeze(1)
            out = fallback.clone()
            out[index] = fn(z[index], index).to(z.dtype)
            return out
        return torch.where(which[:, None], fn(z, None).to(z.dtype), fallback)

    # ------------------------------------------------------------------ public API
    def init(self, fn: CellFn, z0: Tensor) -> SolverState:
        """Start from z0 [B, D]: evaluates f(z0) once."""
        if z0.dim() != 2:
            raise ValueError(f"solver states are flat [B, D]; got shape {tuple(z0.shape)}")
        batch = z0.shape[0]
        dev = z0.device
        fz = fn(z0, None).to(z0.dtype)
        res = relative_residual(z0, fz)
        finite = torch.isfinite(res)
        state = SolverState(
            z=z0,
            fz=fz,
            residual=res,
            best_z=z0,
            best_residual=torch.where(finite, res, torch.full_like(res, float("inf"))),
            best_step=torch.zeros(batch, dtype=torch.long, device=dev),
            first_residual=res,
            converged=(res < self.config.tol) & finite & self.config.freeze_converged,
            diverged=~finite,
            nfe=torch.ones(batch, dtype=torch.long, device=dev),
        )
        state.memory = self._init_memory(state)
        return state

    def advance(
        self,
        fn: CellFn,
        state: SolverState,
        steps: int,
        trajectory: Trajectory | None = None,
    ) -> SolverState:
        """Run ``steps`` steps; append each raw iterate to ``trajectory`` when given.

        Samples that converged (residual < tol) or diverged are frozen: their iterate repeats
        in the trajectory and costs no f-evaluation. The trajectory always gains exactly
        ``steps`` entries.
        """
        cfg = self.config
        for _ in range(steps):
            moved = state.active
            n_moved = int(moved.sum())
            if n_moved:
                everyone = n_moved == state.batch_size
                z_new = self._propose(state)
                if not everyone:
                    z_new = torch.where(moved[:, None], z_new, state.z)
                fz_new = self._evaluate(fn, z_new, moved, state.fz)
                res_new = relative_residual(z_new, fz_new)
                bad = moved & ~torch.isfinite(res_new)  # a NaN/inf anywhere shows in the norm
                if bool(bad.any()):  # NaN guard: revert and freeze the sample
                    z_new = torch.where(bad[:, None], state.z, z_new)
                    fz_new = torch.where(bad[:, None], state.fz, fz_new)
                    moved = moved & ~bad
                    everyone = False
                if not everyone:
                    res_new = torch.where(moved, res_new, state.residual)
                self._observe(state, z_new, fz_new, moved)
                state.nfe = state.nfe + moved.long()
                improved = moved & (res_new < state.best_residual)
                state.best_z = (
                    z_new  # the usual case: skip a pass over [B, D]
                    if bool(improved.all())
                    else torch.where(improved[:, None], z_new, state.best_z)
                )
                state.best_residual = torch.where(improved, res_new, state.best_residual)
                state.best_step = torch.where(
                    improved, torch.full_like(state.best_step, state.steps + 1), state.best_step
                )
                blown = moved & (res_new > cfg.divergence_factor * state.first_residual)
                state.diverged = state.diverged | bad | blown
                if cfg.freeze_converged:
                    state.converged = state.converged | (moved & (res_new < cfg.tol))
                state.z, state.fz, state.residual = z_new, fz_new, res_new
            else:
                self._idle(state)
            state.steps += 1
            if trajectory is not None:
                trajectory.append(state.z, state.residual)
        return state

    def retarget(
        self, fn: CellFn, state: SolverState, which: Tensor | None = None, reset_memory: bool = True
    ) -> SolverState:
        """f changed for samples ``which`` [B] bool (all when None): warm-start them there.

        Re-evaluates f at their current iterate (one evaluation each), un-freezes them (a
        fixed point of the old f is not one of the new), restarts their best-iterate record at
        the current iterate and, with ``reset_memory``, forgets their secant/history memory,
        which described the old f. Diverged samples stay frozen.
        """
        batch = state.batch_size
        if which is None:
            which = torch.ones(batch, dtype=torch.bool, device=state.z.device)
        which = which & ~state.diverged
        if not bool(which.any()):
            return state
        fz = self._evaluate(fn, state.z, which, state.fz)
        res = torch.where(which, relative_residual(state.z, fz), state.residual)
        state.fz, state.residual = fz, res
        state.nfe = state.nfe + which.long()
        state.best_z = torch.where(which[:, None], state.z, state.best_z)
        state.best_residual = torch.where(which, res, state.best_residual)
        state.best_step = torch.where(
            which, torch.full_like(state.best_step, state.steps), state.best_step
        )
        if self.config.freeze_converged:
            state.converged = (state.converged & ~which) | (which & (res < self.config.tol))
        if reset_memory:
            self._reset_memory(state, which)
        return state

    def select_rows(self, state: SolverState, rows: Tensor) -> SolverState:
        """A copy of the rows ``rows`` (int64 [b]) of ``state``, memory included.

        The copy shares no tensor with ``state`` (memory is updated in place), so it is a
        snapshot: it can be advanced under another f, or kept to redo a step from it, while
        ``state`` goes on. Memory tensors are per sample (leading dim B); the other memory
        entries (slot counters) are batch-wide and copied as they are.
        """
        batch = state.batch_size

        def pick(value: Any) -> Any:
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == batch:
                return value[rows]  # advanced indexing: a copy
            return value

        return SolverState(
            z=state.z[rows],
            fz=state.fz[rows],
            residual=state.residual[rows],
            best_z=state.best_z[rows],
            best_residual=state.best_residual[rows],
            best_step=state.best_step[rows],
            first_residual=state.first_residual[rows],
            converged=state.converged[rows],
            diverged=state.diverged[rows],
            nfe=state.nfe[rows],
            steps=state.steps,
            memory={k: pick(v) for k, v in state.memory.items()},
        )

    def merge_rows(self, state: SolverState, rows: Tensor, sub: SolverState) -> SolverState:
        """``state`` with its rows ``rows`` (int64 [b]) replaced by the b rows of ``sub``.

        Both must have taken the same number of steps (then the batch-wide memory entries,
        which only depend on it, agree). The iterate tensors are replaced, never written in
        place (a trajectory may hold them); the memory tensors are written in place.
        """
        if sub.steps != state.steps:
            raise ValueError(f"cannot merge a state at step {sub.steps} into one at {state.steps}")
        batch = state.batch_size

        def put(full: Tensor, part: Tensor) -> Tensor:
            return full.index_put((rows,), part)

        mem = state.memory
        for key, value in sub.memory.items():
            full = mem[key]
            if isinstance(full, Tensor) and full.dim() and full.shape[0] == batch:
                self._put_memory_rows(mem, key, rows, value)
            elif full != value:
                raise ValueError(f"solver memory {key!r} differs: {full!r} vs {value!r}")
        return SolverState(
            z=put(state.z, sub.z),
            fz=put(state.fz, sub.fz),
            residual=put(state.residual, sub.residual),
            best_z=put(state.best_z, sub.best_z),
            best_residual=put(state.best_residual, sub.best_residual),
            best_step=put(state.best_step, sub.best_step),
            first_residual=put(state.first_residual, sub.first_residual),
            converged=put(state.converged, sub.converged),
            diverged=put(state.diverged, sub.diverged),
            nfe=put(state.nfe, sub.nfe),
            steps=state.steps,
            memory=mem,
        )

    def _put_memory_rows(self, mem: dict[str, Any], key: str, rows: Tensor, value: Tensor) -> None:
        """``mem[key][rows] = value``, in place (a differentiable solver replaces the tensor)."""
        mem[key][rows] = value

    def solve(
        self, fn: CellFn, z0: Tensor, steps: int | None = None, record: bool = True
    ) -> tuple[SolverState, Trajectory | None]:
        """init + advance(steps or config.max_steps); returns the final state and trajectory."""
        trajectory = Trajectory() if record else None
        state = self.init(fn, z0)
        state = self.advance(
            fn, state, self.config.max_steps if steps is None else steps, trajectory
        )
        return state, trajectory
