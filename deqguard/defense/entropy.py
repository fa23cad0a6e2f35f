"""Test-time input entropy reduction along the neural dynamics (Sec. 3.2, Algorithm 1).

The solver runs N steps from z = 0 on the input x. After every Tf-th step t (t < N) a sample
with R > 0 gets R sign-gradient steps on its input,

    x <- clip[0,1](clip[x0 - eps, x0 + eps](x - beta * sign(grad_x H(head(f(z[t]; x)))))),

with z[t] held fixed and x0 the input as received; then the solver continues from its state with
the new input (``solver.retarget``: f is re-evaluated at z[t] for the changed samples and their
secant memory is reset, since it described the old f). Everything is batched: per-sample
parameters become [B] tensors and per-step masks, never a Python loop over samples.

Work the authors' loop does that is skipped here: the R updates after the last chunk (nothing reads
them), the second head call per entropy step, the unrolled tail at inference, and batch-level
stopping. Samples with R = 0 never enter a gradient computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deqguard.configs import SolverConfig
from deqguard.defense.params import DefenseParams
from deqguard.dynamics import (
    cached_weights,
    cell_fn,
    head_on_states,
    prediction_entropy,
    resolve_solver,
)
from deqguard.models.mdeq import Injection, MDEQClassifier
from deqguard.solvers import CellFn, FixedPointSolver, Trajectory

__all__ = ["BatchParams", "DefenseResult", "DefenseTrace", "defended_forward", "entropy_descent"]


@dataclass
class BatchParams:
    """Per-sample defense parameters as tensors (all [B]): the batched form of DefenseParams."""

    beta: Tensor  # float
    R: Tensor  # int64
    Tf: Tensor  # int64
    eps: Tensor  # float
    state: Tensor  # int64, 1..N

    @classmethod
    def build(
        cls,
        params: DefenseParams | Sequence[DefenseParams],
        batch: int,
        steps: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> BatchParams:
        if isinstance(params, DefenseParams):
            plist: Sequence[DefenseParams] = [params] * batch
        else:
            plist = list(params)
            if len(plist) != batch:
                raise ValueError(f"got {len(plist)} DefenseParams for a batch of {batch}")
            if not all(isinstance(p, DefenseParams) for p in plist):
                raise TypeError("params must be DefenseParams or a sequence of them")
        states = [steps if p.state is None else p.state for p in plist]
        if max(states, default=1) > steps:
            raise ValueError(f"state must lie in 1..{steps} (the solver steps), got {max(states)}")

        def col(values: list, dt: torch.dtype) -> Tensor:
            return torch.tensor(values, dtype=dt, device=device)

        return cls(
            beta=col([p.beta for p in plist], dtype),
            R=col([p.R for p in plist], torch.long),
            Tf=col([p.Tf for p in plist], torch.long),
            eps=col([p.eps for p in plist], dtype),
            state=col(states, torch.long),
        )

    def schedule(self, steps: int) -> Tensor:
        """[N, B] bool: sample b updates its input after solver step t (row t - 1)."""
        t = torch.arange(1, steps + 1, device=self.R.device)[:, None]
        return (t % self.Tf[None, :] == 0) & (self.R[None, :] > 0) & (t < steps)


@dataclass
class DefenseTrace:
    """The defended dynamics in full, for adaptive attacks and audits (``trace=True``).

    ``states`` [N, B, D]: the raw iterates z[1..N]; ``inputs[t]`` [B, 3, H, W]: the input in
    effect after step t + 1 (after that step's update, if any), so ``inputs[N - 1]`` = x_final;
    ``jac[t]``: elementwise d inputs[t] / d x (0 or 1, see :func:`entropy_descent`).
    """

    states: Tensor
    inputs: list[Tensor]
    jac: list[Tensor]


@dataclass
class DefenseResult:
    """What one defended forward produced (shapes: B samples, N solver steps, C classes).

    Attributes:
        logits: [B, C] from each sample's chosen state.
        state_index: [B] int64, the chosen state (1..N).
        step_entropy: [N, B] Eq. 6 entropy of head(z[t]) at each raw iterate z[1..N].
        acted: [N, B] bool: the defense updated the input after step t.
        post_entropy: [N, B] H(head(f(z[t]; x_new))), the objective right after the update, at
            acted steps (NaN elsewhere).
        final_residual: [B] relative residual of the last iterate.
        nfe: [B] int64 f-evaluations (solver steps, restarts after input changes; not the ones
            inside the gradient steps, which ``grad_steps`` counts).
        grad_steps: [B] int64 input-gradient steps spent.
        x_final: [B, 3, H, W] the updated input (within eps of x, in [0, 1]).
        step_logits: [N, B, C] logits at every raw iterate (for audits and plots).
    """

    logits: Tensor
    state_index: Tensor
    step_entropy: Tensor
    acted: Tensor
    post_entropy: Tensor
    final_residual: Tensor
    nfe: Tensor
    grad_steps: Tensor
    x_final: Tensor
    step_logits: Tensor | None = None
    trace: DefenseTrace | None = None

    @property
    def prediction(self) -> Tensor:
        """[B] int64 predicted class."""
        return self.logits.argmax(dim=1)

    @property
    def entropy(self) -> Tensor:
        """[B] entropy of the reported prediction."""
        return prediction_entropy(self.logits)


def _features(model: MDEQClassifier, x: Tensor) -> Tensor:
    return model.inject(x).features


def entropy_descent(
    model: MDEQClassifier,
    z: Tensor,
    x: Tensor,
    x0: Tensor,
    beta: Tensor,
    eps: Tensor,
    R: Tensor,
    masks: list[Tensor] | None = None,
    jac: Tensor | None = None,
    inner: list[Tensor] | None = None,
) -> Tensor:
    """R[b] steps of Eq. 8 for each sample b with z held; returns the new x [b, 3, H, W].

    z [b, D] (detached); x, x0 [b, 3, H, W]; beta, eps [b]; R [b] int64 (>= 1). Samples stop
    after their own R; the later steps run on the shrinking subset still going (rows gathered,
    not masked, so finished samples cost nothing). The entropy is summed, not averaged: the
    sign of each sample's gradient is what moves it and a mean would tie it to the batch size.

    ``jac`` (same shape as x, updated in place) tracks d x / d x0 elementwise: the sign of a
    gradient has derivative 0, so the exact derivative of the updates is 1 or 0 per pixel (0 where
    the [0, 1] clip, not the eps-ball, bound it last). Adaptive attacks use it (``exact`` mode).

    z is held, so the z-only part of f (``model.cell_inner(z)``, the branch blocks' convs: most
    of f's MACs) is computed once here (or passed as ``inner``) and reused by all R steps; each
    step pays only the stem, the injection/fusion part of f and the head, forward and backward.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    lo = (x0 - eps.view(shape)).clamp(min=0.0)
    hi = (x0 + eps.view(shape)).clamp(max=1.0)
    step = beta.view(shape)
    x = x.detach().clone()
    rows = torch.arange(x.shape[0], device=x.device)
    if inner is None:
        with torch.no_grad():
            inner = model.cell_inner(z)
    for r in range(1, int(R.max()) + 1):
        live = R >= r
        idx = rows if bool(live.all()) else rows[live]
        full = idx.shape[0] == x.shape[0]
        xi = (x if full else x[idx]).detach().requires_grad_(True)
        zi = z if full else z[idx]
        m = None if masks is None else [mk if full else mk[idx] for mk in masks]
        hi_ = inner if full else [h[idx] for h in inner]
        with torch.enable_grad():
            inj = Injection(_features(model, xi), m)
            ent = prediction_entropy(model.head(model.cell_outer(zi, hi_, inj))).sum()
            (g,) = torch.autograd.grad(ent, xi)
        with torch.no_grad():
            if full:
                upd = x - step * g.sign()
                if jac is not None:
                    _track_jacobian(jac, upd, lo, hi, x0, eps.view(shape))
                x = torch.minimum(torch.maximum(upd, lo), hi)
            else:
                upd = xi.detach() - step[idx] * g.sign()
                if jac is not None:
                    j = jac[idx]
                    _track_jacobian(j, upd, lo[idx], hi[idx], x0[idx], eps.view(shape)[idx])
                    jac[idx] = j
                x[idx] = torch.minimum(torch.maximum(upd, lo[idx]), hi[idx])
    return x


def _track_jacobian(
    jac: Tensor, upd: Tensor, lo: Tensor, hi: Tensor, x0: Tensor, eps: Tensor
) -> None:
    """In place: d clip(upd)/d x0 given d upd/d x0 = jac (the sign step adds nothing)."""
    below, above = upd < lo, upd > hi
    ball_lo = (x0 - eps > 0).to(jac.dtype)  # the lower bound is the ball's (moves with x0)
    ball_hi = (x0 + eps < 1).to(jac.dtype)
    jac.copy_(torch.where(below, ball_lo, torch.where(above, ball_hi, jac)))


def _restart_fn(
    model: MDEQClassifier, injection: Injection, idx: Tensor, inner: list[Tensor]
) -> CellFn:
    """f for the restart after an update: the iterate of rows ``idx`` is unchanged, so their
    z-only part ``inner`` is reused; any other call falls back to the plain f."""
    full = cell_fn(model, injection)

    def fn(z: Tensor, index: Tensor | None) -> Tensor:
        rows = torch.arange(z.shape[0], device=z.device) if index is None else index
        if rows.shape == idx.shape and bool((rows == idx).all()):
            inj = injection if index is None else injection.select(index)
            return model.cell_outer(z, inner, inj)
        return full(z, index)

    return fn


@torch.no_grad()
def defended_forward(
    model: MDEQClassifier,
    x: Tensor,
    params: DefenseParams | Sequence[DefenseParams],
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    steps: int = 8,
    trace: bool = False,
) -> DefenseResult:
    """Algorithm 1 with per-sample parameters, then the early-state prediction.

    Args:
        model: the MDEQ classifier, in eval mode (train-mode BatchNorm would couple samples).
        x: [B, 3, H, W] images in [0, 1], the input as received.
        params: one DefenseParams for the batch, or one per sample.
        solver: forward solver (default Broyden, tol 1e-3); ``steps`` overrides its max_steps.
        steps: N, the solver steps.
        trace: also return the iterates, the input in effect at every step and its derivative
            (:class:`DefenseTrace`).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, 3, H, W], got shape {tuple(x.shape)}")
    if steps < 1:
        raise ValueError(f"need at least one solver step, got {steps}")
    slv = resolve_solver(solver)
    batch, dev = x.shape[0], x.device
    p = BatchParams.build(params, batch, steps, dev, x.dtype)
    plan = p.schedule(steps)  # [N, B]
    act_steps = plan.any(dim=1).nonzero().squeeze(1).add(1).tolist()

    x0 = x.detach()
    x_cur = x0
    post = torch.full((steps, batch), float("nan"), device=dev)
    grad_steps = torch.zeros(batch, dtype=torch.long, device=dev)
    trajectory = Trajectory()
    with cached_weights(model):
        injection = model.inject(x0)
        fn = cell_fn(model, injection)
        state = slv.init(fn, model.zero_state(batch, dev, x.dtype))
        done = 0
        jac = torch.ones_like(x0) if trace else None
        inputs: list[Tensor] = []
        jacs: list[Tensor] = []
        for t in act_steps:
            state = slv.advance(fn, state, t - done, trajectory)
            inputs += [x_cur] * (t - 1 - done)
            if jac is not None:
                jacs += [jac] * (t - 1 - done)
                jac = jac.clone()
            done = t
            who = plan[t - 1]
            idx = who.nonzero().squeeze(1)
            sub_masks = None if injection.masks is None else [m[idx] for m in injection.masks]
            jac_rows = None if jac is None else jac[idx]
            z_rows = state.z[idx]
            inner = model.cell_inner(z_rows)  # reused by the R updates and the restart below
            x_new = entropy_descent(
                model,
                z_rows,
                x_cur[idx],
                x0[idx],
                p.beta[idx],
                p.eps[idx],
                p.R[idx],
                sub_masks,
                jac_rows,
                inner,
            )
            grad_steps[idx] += p.R[idx]
            x_cur = x_cur.clone()
            x_cur[idx] = x_new
            if jac is not None:
                jac[idx] = jac_rows
                jacs.append(jac)
            inputs.append(x_cur)
            feats = injection.features.clone()
            feats[idx] = _features(model, x_new)
            injection = Injection(feats, injection.masks)
            fn = cell_fn(model, injection)
            state = slv.retarget(_restart_fn(model, injection, idx, inner), state, which=who)
            post[t - 1, idx] = prediction_entropy(model.head(state.fz[idx]))
        state = slv.advance(fn, state, steps - done, trajectory)
        inputs += [x_cur] * (steps - done)
        if jac is not None:
            jacs += [jac] * (steps - done)
        step_logits = head_on_states(model, trajectory.stacked_states())  # [N, B, C]
    rows = torch.arange(batch, device=dev)
    return DefenseResult(
        logits=step_logits[p.state - 1, rows],
        state_index=p.state,
        step_entropy=prediction_entropy(step_logits),
        acted=plan,
        post_entropy=post,
        final_residual=state.residual,
        nfe=state.nfe,
        grad_steps=grad_steps,
        x_final=x_cur,
        step_logits=step_logits,
        trace=DefenseTrace(trajectory.stacked_states(), inputs, jacs) if trace else None,
    )
