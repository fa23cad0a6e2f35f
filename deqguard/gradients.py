"""Training graphs for DEQs: phantom gradient, unrolled pretraining, IFT, Jacobian penalty, and
the random depth of the paper's Sec. 3.3.

Pattern: solve the fixed point without autograd (cheap, O(1) memory), then attach a short graph
at the solution that defines the gradient:

- phantom: one plain step f(z*) from the detached solution, then K damped steps
  z <- (1 - lam) z + lam f(z) (Geng et al. 2021); it is literally autograd through those steps.
- IFT: the exact implicit gradient, via a backward fixed-point solve y = J_f(z*)^T y + g.
- unrolled: N applications of f from z = 0 with full backprop (the weight-tied pretraining net).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from deqguard.configs import SolverConfig
from deqguard.dynamics import cached_weights, cell_fn, pick_states, resolve_solver
from deqguard.models.mdeq import Injection, MDEQClassifier
from deqguard.solvers import FixedPointSolver, Trajectory

__all__ = [
    "GradientMode",
    "TrainForward",
    "implicit_step",
    "jacobian_penalty",
    "phantom_steps",
    "sample_depth",
    "select_at_depth",
    "train_forward",
    "unrolled_states",
]

GradientMode = Literal["phantom", "ift", "unrolled"]


def unrolled_states(model: MDEQClassifier, injection: Injection, steps: int) -> list[Tensor]:
    """The weight-tied unrolled network: z[t] = f(z[t-1]) from z[0] = 0, t = 1..steps, with graph."""
    b = injection.batch_size
    z = model.zero_state(b, injection.features.device, injection.features.dtype)
    out = []
    for _ in range(steps):
        z = model.cell(z, injection)
        out.append(z)
    return out


def phantom_steps(
    model: MDEQClassifier,
    z_star: Tensor,
    injection: Injection,
    *,
    damped_steps: int = 5,
    lam: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Phantom gradient from a (detached) solution z* [B, D].

    Returns ``(z, z_leaf, f_leaf)``: z [B, D] after one plain and ``damped_steps`` damped steps
    (carries the gradient to parameters and x); ``z_leaf`` the detached z* as a grad-requiring
    leaf and ``f_leaf = f(z_leaf)``, which :func:`jacobian_penalty` uses.
    """
    z_leaf = z_star.detach().requires_grad_()
    f_leaf = model.cell(z_leaf, injection)
    z = f_leaf
    for _ in range(damped_steps):
        z = (1 - lam) * z + lam * model.cell(z, injection)
    return z, z_leaf, f_leaf


def implicit_step(
    model: MDEQClassifier,
    z_star: Tensor,
    injection: Injection,
    backward_solver: SolverConfig | None = None,
) -> Tensor:
    """f(z*) with the implicit-function-theorem gradient attached.

    The value is f(z*) (= z* at a fixed point). In backward, the incoming gradient g is replaced
    by y solving y = J_f(z*)^T y + g, so that parameters and x receive g^T (I - J_f)^{-1} df.
    """
    z_star = z_star.detach()
    z = model.cell(z_star, injection)
    if not z.requires_grad:
        return z
    cfg = backward_solver or SolverConfig(name="broyden", max_steps=50, tol=1e-6, memory=50)
    cfg = replace(cfg, skip_fraction=0.0)  # vector-Jacobian products cannot be row-subset
    solver = resolve_solver(cfg)
    z0 = z_star.clone().requires_grad_()
    with torch.enable_grad():
        f0 = model.cell(z0, injection.detach())

    def hook(grad: Tensor) -> Tensor:
        def fn(y: Tensor, index: Tensor | None) -> Tensor:
            (vjp,) = torch.autograd.grad(f0, z0, y, retain_graph=True)
            return vjp + grad

        with torch.no_grad():
            state, _ = solver.solve(fn, torch.zeros_like(grad), record=False)
        return state.best_z

    z.register_hook(hook)
    return z


def jacobian_penalty(f_leaf: Tensor, z_leaf: Tensor, n_vectors: int = 2) -> Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / (elements of z), differentiable (create_graph).

    ``f_leaf = f(z_leaf)`` with ``z_leaf`` a grad-requiring leaf (see :func:`phantom_steps`).
    """
    total = f_leaf.new_zeros(())
    for _ in range(n_vectors):
        v = torch.randn_like(f_leaf)
        (vjp,) = torch.autograd.grad(f_leaf, z_leaf, v, create_graph=True, retain_graph=True)
        total = total + vjp.pow(2).sum()
    return total / (n_vectors * f_leaf.numel())


def sample_depth(
    max_steps: int,
    batch: int,
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Sec. 3.3 random depth k uniform in {1..max_steps}: [B] int64, one draw shared by the batch
    (the authors' choice) or one per sample."""
    n = batch if per_sample else 1
    k = torch.randint(1, max_steps + 1, (n,), generator=generator)
    return k.expand(batch).to(device) if not per_sample else k.to(device)


def select_at_depth(
    trajectory: Trajectory, depth: Tensor, mode: Literal["best", "last"] = "best"
) -> Tensor:
    """Per-sample state at depth k [B]: the lowest-residual of z[1..k] ("best", as the authors'
    solver returns) or z[k] itself ("last"). Returns [B, D]."""
    if mode == "last":
        return pick_states(trajectory, depth)
    res = trajectory.stacked_residuals()  # [T, B]
    steps = torch.arange(1, res.shape[0] + 1, device=res.device)[:, None]
    masked = torch.where(steps <= depth[None, :], res, torch.full_like(res, float("inf")))
    best = masked.argmin(dim=0) + 1
    return pick_states(trajectory, best)


@dataclass
class TrainForward:
    """A training forward: logits with a gradient, plus what regularisers need.

    logits [B, C]; z [B, D] the state fed to the head; z_leaf / f_leaf for the Jacobian penalty
    (None for ``unrolled``); depth [B] the solver depth used.
    """

    logits: Tensor
    z: Tensor
    z_leaf: Tensor | None
    f_leaf: Tensor | None
    depth: Tensor


def train_forward(
    model: MDEQClassifier,
    x: Tensor,
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    mode: GradientMode = "phantom",
    depth: Tensor | None = None,
    damped_steps: int = 5,
    lam: float = 0.5,
    backward_solver: SolverConfig | None = None,
) -> TrainForward:
    """Forward with a training graph. ``depth`` [B] (from :func:`sample_depth`) makes the solver
    stop at a random intermediate state (Sec. 3.3); default: the full N steps (best iterate)."""
    slv = resolve_solver(solver)
    n = slv.config.max_steps
    batch = x.shape[0]
    if depth is None:
        depth = torch.full((batch,), n, dtype=torch.long, device=x.device)
    injection = model.inject(x)
    if mode == "unrolled":
        states = unrolled_states(model, injection, int(depth.max()))
        stacked = torch.stack(states)
        rows = torch.arange(batch, device=x.device)
        z = stacked[depth - 1, rows]
        return TrainForward(model.head(z), z, None, None, depth)
    with torch.no_grad(), cached_weights(model):
        fn = cell_fn(model, injection.detach())
        k = int(depth.max())
        state, traj = slv.solve(fn, model.zero_state(batch, x.device, x.dtype), steps=k)
        assert traj is not None
        z_star = select_at_depth(traj, depth) if bool((depth != n).any()) else state.best_z
    if mode == "phantom":
        z, z_leaf, f_leaf = phantom_steps(
            model, z_star, injection, damped_steps=damped_steps, lam=lam
        )
        return TrainForward(model.head(z), z, z_leaf, f_leaf, depth)
    if mode == "ift":
        z = implicit_step(model, z_star, injection, backward_solver)
        return TrainForward(model.head(z), z, None, None, depth)
    raise ValueError(f"unknown gradient mode {mode!r}; choose phantom, ift or unrolled")
