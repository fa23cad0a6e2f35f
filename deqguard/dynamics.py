"""Forward dynamics: solve the equilibrium of a model on an input and read it out.

One inference entry point, :func:`deq_forward`, returns a typed :class:`DEQResult`: the logits
at the chosen ("early") state, the prediction entropy (the paper's Eq. 6) at every recorded
step, residuals, and the f-evaluations spent. The solver runs without autograd; training graphs
live in :mod:`deqguard.gradients`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from deqguard.configs import SolverConfig
from deqguard.models.mdeq import Injection, MDEQClassifier
from deqguard.solvers import (
    CellFn,
    FixedPointSolver,
    SolverState,
    Trajectory,
    make_solver,
)

__all__ = [
    "DEQResult",
    "cached_weights",
    "cell_fn",
    "deq_forward",
    "head_on_states",
    "prediction_entropy",
    "resolve_solver",
    "solve_and_classify",
]


def prediction_entropy(logits: Tensor) -> Tensor:
    """Eq. 6: H = -sum_j p_j log p_j with p = softmax(logits). [..., C] -> [...] (nats)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def cell_fn(model: MDEQClassifier, injection: Injection) -> CellFn:
    """f(., x) in the solver's calling convention (subset rows select the injection rows)."""

    def fn(z: Tensor, index: Tensor | None) -> Tensor:
        inj = injection if index is None else injection.select(index)
        return model.cell(z, inj)

    return fn


def resolve_solver(solver: SolverConfig | FixedPointSolver | None) -> FixedPointSolver:
    if solver is None:
        return make_solver(SolverConfig())
    if isinstance(solver, SolverConfig):
        return make_solver(solver)
    return solver


@contextmanager
def cached_weights(model: nn.Module) -> Iterator[None]:
    """Compute weight-normed weights once for the whole solve instead of at every f call.

    A model without parametrizations (``prepare_for_inference``'s) skips it: the cache is
    process-global state, better left alone by threads that have nothing to cache."""
    if not any(parametrize.is_parametrized(m) for m in model.modules()):
        yield
        return
    with parametrize.cached():
        yield


HEAD_CHUNK_ROWS = 128
"""Eval-mode head calls over many states run in chunks of at most this many rows, which bounds
the head's peak activation memory (its widest map is [rows, 384, 8, 8] on ``micro``) whatever
the batch. On this project's 2-core CPU, 8 states x 32 rows took 65-66 ms in chunks of 128
against 61-95 ms in one call (``python benchmarks/probe_f.py head``, three runs)."""


def head_on_states(model: MDEQClassifier, states: Tensor) -> Tensor:
    """Logits of a stack of states [T, B, D] -> [T, B, C].

    One head call in training mode (BatchNorm statistics span the whole stack); in eval mode
    the rows are cut into chunks of at most :data:`HEAD_CHUNK_ROWS` (same numbers: eval-mode
    layers treat rows independently).
    """
    t, b, d = states.shape
    flat = states.reshape(t * b, d)
    if model.training or t * b <= HEAD_CHUNK_ROWS:
        return model.head(flat).view(t, b, -1)
    return torch.cat([model.head(rows) for rows in flat.split(HEAD_CHUNK_ROWS)]).view(t, b, -1)


@dataclass
class DEQResult:
    """What one forward through the dynamics produced.

    Attributes:
        logits: [B, C] at the chosen state.
        state: [B, D] the chosen state (default z[N], the last raw iterate).
        state_index: [B] int64, 1-based step of the chosen state (0 = the initial state).
        best_state: [B, D] the lowest-residual iterate.
        step_logits: [T, B, C] logits at z[1..T] (None when not recorded).
        step_entropy: [T, B] Eq. 6 entropy at z[1..T] (None when not recorded).
        residuals: [T, B] relative residual at z[1..T] (None when not recorded).
        final_residual: [B] residual of the last iterate.
        nfe: [B] int64 f-evaluations spent on each sample.
        trajectory: the raw iterates (None when not recorded).
        solver_state: the solver's state, to continue from.
    """

    logits: Tensor
    state: Tensor
    state_index: Tensor
    best_state: Tensor
    step_logits: Tensor | None
    step_entropy: Tensor | None
    residuals: Tensor | None
    final_residual: Tensor
    nfe: Tensor
    trajectory: Trajectory | None
    solver_state: SolverState

    @property
    def entropy(self) -> Tensor:
        """[B] entropy of the prediction from the chosen state."""
        return prediction_entropy(self.logits)


def pick_states(trajectory: Trajectory, index: Tensor) -> Tensor:
    """Per-sample state z[index_b] (1-based) from a trajectory: index [B] -> [B, D]."""
    stacked = trajectory.stacked_states()  # [T, B, D]
    rows = torch.arange(stacked.shape[1], device=stacked.device)
    return stacked[index - 1, rows]


@torch.no_grad()
def deq_forward(
    model: MDEQClassifier,
    x: Tensor,
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    steps: int | None = None,
    state_index: int | Tensor | None = None,
    record: bool = True,
    step_logits: bool | None = None,
) -> DEQResult:
    """Solve z = f(z; x) from z = 0 and classify, without autograd (the served path; see
    :func:`solve_and_classify` for the arguments and for the same with a graph)."""
    return solve_and_classify(
        model, x, solver, steps=steps, state_index=state_index, record=record,
        step_logits=step_logits,
    )  # fmt: skip


def solve_and_classify(
    model: MDEQClassifier,
    x: Tensor,
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    steps: int | None = None,
    state_index: int | Tensor | None = None,
    record: bool = True,
    step_logits: bool | None = None,
) -> DEQResult:
    """Solve z = f(z; x) from z = 0 and classify, under the caller's autograd mode: with a
    solver whose memory writes are out of place (``DifferentiableBroydenSolver``, Picard) the
    logits carry a graph to ``x`` through every solver step (an attack on the served
    prediction's own gradient).

    Args:
        model: the MDEQ classifier (its train/eval mode is respected).
        x: [B, 3, H, W] images in [0, 1].
        solver: config or solver instance (default Broyden, N = 8, tol 1e-3).
        steps: solver steps N (default ``solver.config.max_steps``).
        state_index: the early state to predict from, 1..N, an int or per-sample [B]; default N
            (the last raw iterate, the paper's choice). ``-1`` selects the best iterate.
        record: keep the trajectory and per-step logits/entropy/residuals.
        step_logits: compute the head at every recorded state (default: ``record``).
    """
    slv = resolve_solver(solver)
    n = slv.config.max_steps if steps is None else steps
    if n < 1:
        raise ValueError(f"need at least one solver step, got {n}")
    batch = x.shape[0]
    dev = x.device
    per_sample = isinstance(state_index, Tensor)
    if state_index is None:
        idx = torch.full((batch,), n, dtype=torch.long, device=dev)
    elif per_sample:
        idx = state_index.to(device=dev, dtype=torch.long)
    else:
        idx = torch.full((batch,), int(state_index), dtype=torch.long, device=dev)
    use_best = bool((idx == -1).any())
    if bool(((idx < 1) & (idx != -1)).any()) or bool((idx > n).any()):
        raise ValueError(f"state_index must lie in 1..{n} (or -1 for the best iterate)")
    need_traj = record or bool((idx != n).any() & (idx != -1).any())

    with cached_weights(model):
        injection = model.inject(x)
        fn = cell_fn(model, injection)
        z0 = model.zero_state(batch, dev, x.dtype)
        state, trajectory = slv.solve(fn, z0, steps=n, record=need_traj)
        if trajectory is not None:
            chosen = pick_states(trajectory, idx.clamp_min(1))
        else:
            chosen = state.z
        if use_best:
            chosen = torch.where((idx == -1)[:, None], state.best_z, chosen)
            idx = torch.where(idx == -1, state.best_step, idx)
        logits_steps = entropy_steps = residuals = None
        if record and trajectory is not None:
            residuals = trajectory.stacked_residuals()
            if step_logits is None or step_logits:
                logits_steps = head_on_states(model, trajectory.stacked_states())
                entropy_steps = prediction_entropy(logits_steps)
        if logits_steps is not None and not use_best:
            rows = torch.arange(batch, device=dev)
            logits = logits_steps[idx - 1, rows]
        else:
            logits = model.head(chosen)
    return DEQResult(
        logits=logits,
        state=chosen,
        state_index=idx,
        best_state=state.best_z,
        step_logits=logits_steps,
        step_entropy=entropy_steps,
        residuals=residuals,
        final_residual=state.residual,
        nfe=state.nfe,
        trajectory=trajectory if record else None,
        solver_state=state,
    )
