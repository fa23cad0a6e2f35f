"""Test-time input entropy reduction along the neural dynamics (Sec. 3.2, Algorithm 1).

Algorithm 1, for each sample: z[0] = 0, x[0] = x (the input as received); for t = 1..N,

    z~[t] = one solver step from z[<t] under x[t-1]                       (line 4)
    if t mod Tf = 0 (t = N too when Tf divides N) and R > 0:
        R steps of Eq. 8 at z~[t] held:                                     (lines 8-12)
            x <- clip[0,1](clip[x0 - eps, x0 + eps](x - beta * sign(grad_x H(head(f(z~[t]; x))))))
        x[t] = the result; z[t] = one solver step from z[<t] under x[t]      (line 13)
    else: x[t] = x[t-1], z[t] = z~[t]

and the prediction is read from z[state] (default z[N]). "One solver step from z[<t]" is the
solver's own step from its state after step t - 1 (iterate, secant memory, step count, best
iterate), so before step t on every intervention step the intervening rows' solver state is
snapshotted (``solver.select_rows``); line 13 re-evaluates f at z[t-1] under x[t] (the inputs
changed, so a converged sample is un-frozen) and takes the step from that snapshot, and the
result replaces those rows (``solver.merge_rows``). That costs two f-evaluations per
intervention on top of the tentative step. Everything is batched: per-sample parameters become
[B] tensors and a [N, B] schedule, never a Python loop over samples.

Work the authors' loop does that is skipped here: the second head call per entropy step, the
unrolled tail at inference, and batch-level stopping. Samples with R = 0 never enter a gradient
computation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from deqguard.configs import DEFAULT_SOLVER_STEPS, SolverConfig
from deqguard.defense.params import DefenseParams
from deqguard.dynamics import (
    cached_weights,
    cell_fn,
    deq_forward,
    head_on_states,
    prediction_entropy,
    resolve_solver,
)
from deqguard.models.mdeq import Injection, MDEQClassifier
from deqguard.solvers import CellFn, FixedPointSolver, Trajectory

__all__ = [
    "BatchParams",
    "DefenseResult",
    "DefenseStopped",
    "DefenseTrace",
    "defended_forward",
    "entropy_descent",
]

StopCheck = Callable[[], bool]
"""``should_stop()``: True once the caller wants the forward abandoned (a server shutting down)."""


class DefenseStopped(RuntimeError):
    """``should_stop()`` turned true: the forward was abandoned before an f-evaluation or an
    input-gradient step, and there is no result."""


def _check(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise DefenseStopped("stopped: should_stop() turned true")


def _stoppable(fn: CellFn, should_stop: StopCheck | None) -> CellFn:
    """``fn`` checking ``should_stop`` before every f-evaluation (the same values otherwise)."""
    if should_stop is None:
        return fn

    def checked(z: Tensor, index: Tensor | None) -> Tensor:
        _check(should_stop)
        return fn(z, index)

    return checked


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
        """[N, B] bool: sample b updates its input after solver step t (row t - 1), i.e. at
        every t in 1..N with t mod Tf = 0 (Algorithm 1's (t + 1) mod Tf = 0 for t = 0..N-1,
        t = N too when Tf divides N) when R > 0."""
        t = torch.arange(1, steps + 1, device=self.R.device)[:, None]
        return (t % self.Tf[None, :] == 0) & (self.R[None, :] > 0)


@dataclass
class DefenseTrace:
    """The defended dynamics in full, for adaptive attacks and audits (``trace=True``).

    ``states`` [N, B, D]: z[1..N] of Algorithm 1 (at an intervention step the state redone
    under the updated input, not the tentative one); ``inputs[t]`` [B, 3, H, W]: x[t + 1], the
    input in effect after step t + 1 (after that step's update, if any), which is the input
    ``states[t]`` was solved under; ``inputs[N - 1]`` = x_final. ``jac[t]``: elementwise
    d inputs[t] / d x (0 or 1, see :func:`entropy_descent`).
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
        step_entropy: [N, B] Eq. 6 entropy of head(z[t]) at each state z[1..N] of Algorithm 1
            (at an acted step: the state redone under the updated input).
        acted: [N, B] bool: the defense updated the input after step t (then z[t] was redone).
        post_entropy: [N, B] H(head(f(z~[t]; x[t]))), Eq. 8's objective after the R updates
            (z~[t]: the tentative state solved under the previous input), at acted steps (NaN
            elsewhere).
        final_residual: [B] relative residual of z[N] under x_final.
        nfe: [B] int64 f-evaluations: 1 to start, 1 per solver step and 2 more per intervention
            (f at z[t-1] under x[t] and the redone step); not the ones inside the gradient
            steps, which ``grad_steps`` counts. Frozen samples pay no step.
        grad_steps: [B] int64 input-gradient steps spent (R per intervention).
        x_final: [B, 3, H, W] x[N], the updated input (within eps of x, in [0, 1]).
        step_logits: [N, B, C] logits at every state z[1..N] (for audits and plots).
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


def _outer_logits(model: MDEQClassifier, z: Tensor, inner: list[Tensor], inj: Injection) -> Tensor:
    """head(cell_outer(z, inner, inj)), through ``model.outer_head`` where the model has one
    (MDEQClassifier: the same logits without the flat state in between, fewer copies)."""
    fused = getattr(model, "outer_head", None)
    return (
        fused(z, inner, inj) if fused is not None else model.head(model.cell_outer(z, inner, inj))
    )


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
    should_stop: StopCheck | None = None,
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

    ``should_stop`` (if given) is called before every step; when it returns True the descent
    raises :class:`DefenseStopped`.
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
        _check(should_stop)
        live = R >= r
        idx = rows if bool(live.all()) else rows[live]
        full = idx.shape[0] == x.shape[0]
        xi = (x if full else x[idx]).detach().requires_grad_(True)
        zi = z if full else z[idx]
        m = None if masks is None else [mk if full else mk[idx] for mk in masks]
        hi_ = inner if full else [h[idx] for h in inner]
        with torch.enable_grad():
            inj = Injection(_features(model, xi), m)
            ent = prediction_entropy(_outer_logits(model, zi, hi_, inj)).sum()
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


def defended_forward(
    model: MDEQClassifier,
    x: Tensor,
    params: DefenseParams | Sequence[DefenseParams],
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    steps: int = DEFAULT_SOLVER_STEPS,
    trace: bool = False,
    should_stop: StopCheck | None = None,
    differentiable: Literal["bpda", "exact"] | None = None,
) -> DefenseResult:
    """Algorithm 1 with per-sample parameters, then the early-state prediction.

    Interventions after every step t with t mod Tf = 0 up to and including t = N, each
    followed by z[t] redone from the solver's state before step t under the new input (see the module
    docstring); the prediction comes from z[state] of that trajectory.

    Args:
        model: the MDEQ classifier, in eval mode (train-mode BatchNorm would couple samples).
        x: [B, 3, H, W] images in [0, 1], the input as received.
        params: one DefenseParams for the batch, or one per sample.
        solver: forward solver (default Broyden, tol 1e-3); ``steps`` overrides its max_steps.
        steps: N, the solver steps.
        trace: also return the iterates, the input in effect at every step and its derivative
            (:class:`DefenseTrace`).
        should_stop: called before every f-evaluation (so every solver step) and every
            input-gradient step; once it returns True the forward raises
            :class:`DefenseStopped` instead of finishing (a server stops a long batch at
            shutdown with it). It changes no value: a forward it never stops is the same.
        differentiable: None (the default: no graph) or ``bpda`` / ``exact``: the logits and
            states carry a graph to ``x`` through every solver step (an attack's gradient;
            ``solver`` must then be able to differentiate its steps:
            :class:`deqguard.solvers.broyden.DifferentiableBroydenSolver`). Each input in
            effect x[t] enters f as ``x[t] + J * (x - x.detach())``: J = 1 (``bpda``, the
            defense's updates are the identity in backward) or their exact elementwise
            derivative (``exact``, ``DefenseTrace.jac``). The added term is 0, so every value
            is the same as without a graph.
    """
    if differentiable not in (None, "bpda", "exact"):
        raise ValueError(f"differentiable must be None, 'bpda' or 'exact', got {differentiable!r}")
    with torch.set_grad_enabled(differentiable is not None):
        return _defended_forward(
            model, x, params, solver, steps, trace, should_stop, differentiable
        )


def served_logits(
    model: MDEQClassifier,
    x: Tensor,
    params: DefenseParams,
    solver: SolverConfig | FixedPointSolver | None = None,
    *,
    steps: int = DEFAULT_SOLVER_STEPS,
) -> Tensor:
    """``defended_forward(model, x, params, solver, steps=steps).logits`` [B, C], and nothing
    else: the judge an attack queries for the served prediction (Square, every PGD iterate).

    Without the defense (R = 0) that is one solve and one head at the served state
    (``deq_forward`` without a record), without the head at every state that ``defended_forward``
    runs for the per-step entropy (about 20% of an undefended forward of ``micro`` at batch
    128: ``benchmarks/ab_served_logits.py``). The same iterates; the logits agree to float rounding only, because the head runs on
    the served states alone instead of stacked with the other steps' (as the service's own
    logits for an image vary with the batch it shares). The audits' verdict on each attack's
    output is still ``defended_forward``'s. With the defense on, ``defended_forward`` itself.
    """
    if params.active:
        return defended_forward(model, x, params, solver, steps=steps).logits
    return deq_forward(model, x, solver, steps=steps, state_index=params.state, record=False).logits


def _defended_forward(
    model: MDEQClassifier,
    x: Tensor,
    params: DefenseParams | Sequence[DefenseParams],
    solver: SolverConfig | FixedPointSolver | None,
    steps: int,
    trace: bool,
    should_stop: StopCheck | None,
    differentiable: Literal["bpda", "exact"] | None,
) -> DefenseResult:
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
    # the graph to x (differentiable): a zero that carries it, added to every input in effect
    link = x - x0 if differentiable is not None else None
    track = trace or differentiable == "exact"  # the derivative of the inputs
    post = torch.full((steps, batch), float("nan"), device=dev)
    grad_steps = torch.zeros(batch, dtype=torch.long, device=dev)
    trajectory = Trajectory()
    with cached_weights(model):
        injection = model.inject(x0 if link is None else x0 + link)
        fn = _stoppable(cell_fn(model, injection), should_stop)
        state = slv.init(fn, model.zero_state(batch, dev, x.dtype))
        done = 0
        jac = torch.ones_like(x0) if track else None
        inputs: list[Tensor] = []
        jacs: list[Tensor] = []
        for t in act_steps:
            # Steps done + 1 .. t - 1: nobody intervenes after them.
            state = slv.advance(fn, state, t - 1 - done, trajectory)
            inputs += [x_cur] * (t - 1 - done)
            if jac is not None:
                jacs += [jac] * (t - 1 - done)
                jac = jac.clone()
            idx = plan[t - 1].nonzero().squeeze(1)  # [b] the samples intervening after step t
            sub_masks = None if injection.masks is None else [m[idx] for m in injection.masks]
            # Line 4: z~[t] from z[<t] under x[t-1]; keep the memory before it for line 13.
            before = slv.select_rows(state, idx)
            state = slv.advance(fn, state, 1)
            # Lines 8-12: R steps of Eq. 8 at z~[t] (held), giving x[t].
            z_tent = state.z[idx].detach()  # the updates carry no graph (BPDA or their jac)
            with torch.no_grad():
                inner = model.cell_inner(z_tent)  # reused by the R updates and post_entropy
            jac_rows = None if jac is None else jac[idx]
            x_new = entropy_descent(
                model,
                z_tent,
                x_cur[idx],
                x0[idx],
                p.beta[idx],
                p.eps[idx],
                p.R[idx],
                sub_masks,
                jac_rows,
                inner,
                should_stop,
            )
            grad_steps[idx] += p.R[idx]
            x_cur = x_cur.clone()
            x_cur[idx] = x_new
            if jac is not None:
                jac[idx] = jac_rows
            with torch.no_grad():
                plain = Injection(_features(model, x_new), sub_masks)
                post[t - 1, idx] = prediction_entropy(_outer_logits(model, z_tent, inner, plain))
            if link is None:
                new_inj = plain
            else:
                d = link[idx] if differentiable == "bpda" else jac_rows * link[idx]
                new_inj = Injection(_features(model, x_new + d), sub_masks)
            feats = injection.features.clone()
            feats[idx] = new_inj.features
            injection = Injection(feats, injection.masks)
            fn = _stoppable(cell_fn(model, injection), should_stop)
            # Line 13: z[t] = one solver step from z[<t] (the memory as it was) under x[t]:
            # f at z[t-1] under the new input (un-freezing rows that had converged under the
            # old one), then the step; z~[t] is discarded (its f-evaluation still counts).
            sub_fn = _stoppable(cell_fn(model, new_inj), should_stop)
            nfe_before = before.nfe
            redo = slv.retarget(sub_fn, before, reset_memory=False)
            redo = slv.advance(sub_fn, redo, 1)
            redo.nfe = state.nfe[idx] + (redo.nfe - nfe_before)
            state = slv.merge_rows(state, idx, redo)
            trajectory.append(state.z, state.residual)
            inputs.append(x_cur)
            if jac is not None:
                jacs.append(jac)
            done = t
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
        trace=(
            DefenseTrace(trajectory.stacked_states().detach(), inputs, [j.detach() for j in jacs])
            if trace
            else None
        ),
    )
