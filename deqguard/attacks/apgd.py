"""APGD (pyautoattack 0.2.0, Croce & Hein's reference) on the prediction the service returns,
and the straight-through surrogate that makes any attack judge by that prediction for free.

:class:`ServedSurrogate` runs the served pipeline once per call (Algorithm 1 when the defense is
on, the plain early-state prediction when R = 0) and returns ``u + (d - u).detach()``: the value
d is the served logits, the gradient is that of u, a Ka-step damped unrolling of f from the
served state z[state] on the input in effect there, with the defense's input updates taken as
the identity in backward (``bpda``) or differentiated exactly (``exact``; see
:class:`deqguard.attacks.DefendedSurrogate`, which this mirrors). An attack that judges by the
surrogate's output (APGD at every iterate, :func:`pgd_attack` without a decider) is then judged
by the served prediction at every iterate, at the cost of one served forward per iterate.

:func:`apgd_attack` is the reference APGD-CE / APGD-DLR / APGD-T: per sample it keeps an
iterate that fooled the model (the last fooling one of the first run that fooled it), restarts
and target classes run on the samples still robust, and unfooled samples are returned unchanged
(pyautoattack's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from deqguard.attacks.surrogates import DefendedSurrogate, DefenseGrad, IntermediateSpec
from deqguard.configs import DEFAULT_SOLVER_STEPS, SolverConfig
from deqguard.defense import DefenseParams, defended_forward
from deqguard.dynamics import resolve_solver, solve_and_classify
from deqguard.models.mdeq import MDEQClassifier
from deqguard.solvers import FixedPointSolver
from deqguard.solvers.broyden import DifferentiableBroydenSolver

__all__ = ["ApgdLoss", "ServedSurrogate", "SolverGradSurrogate", "apgd_attack"]

ApgdLoss = Literal["ce", "dlr", "targeted"]


class ServedSurrogate(torch.nn.Module):
    """Value: the served logits under ``params`` (defended when R > 0); gradient: Ka damped steps
    (``lam``) from the served state of the defended dynamics, through the defense by ``grad``.

    With ``params.R == 0`` the gradient is the undefended one at z[state] (both modes agree).
    """

    def __init__(
        self,
        model: MDEQClassifier,
        params: DefenseParams,
        solver: SolverConfig | FixedPointSolver | None = None,
        *,
        steps: int = DEFAULT_SOLVER_STEPS,
        grad: DefenseGrad = "bpda",
        ka: int = 5,
        lam: float = 0.5,
    ) -> None:
        super().__init__()
        state = steps if params.state is None else params.state
        if not 1 <= state <= steps:
            raise ValueError(f"the served state must lie in 1..{steps}, got {state}")
        self.model, self.params = model, params
        self.surrogate = DefendedSurrogate(
            model, params, IntermediateSpec(state, ka, lam), solver, steps=steps, grad=grad
        )
        self.spec, self.grad = self.surrogate.spec, grad

    @property
    def name(self) -> str:
        kind = "undefended" if not self.params.active else self.grad
        return f"served-{kind}-{self.spec.name}"

    def forward(self, x: Tensor) -> Tensor:
        res, u = self.surrogate.run(x)
        u = u.float()
        return u + (res.logits.float() - u).detach()


class SolverGradSurrogate(torch.nn.Module):
    """Value: the served logits (undefended at z[state] when ``params`` is None or R = 0, else
    the defended ones); gradient: autograd through the served computation itself, every solver
    step from z = 0 (backpropagation through the solver), instead of a few damped steps from
    the served state. Through the defense (R > 0) the input updates are the identity in
    backward (``bpda``) or their exact elementwise derivative (``exact``), as in
    :class:`ServedSurrogate`, but the states between them are differentiated step by step.

    Why: the Ka-step unrolling of :class:`ServedSurrogate` is the gradient of the served
    prediction only near a fixed point; a model whose 8 Broyden steps do not converge (plain
    TRADES late in the campaign, ``docs/TRAINING.md``) depends on its input through every step,
    which only this gradient sees. Through the defense it is one ``defended_forward(...,
    differentiable=grad)`` (the served values bit for bit); undefended, one
    :func:`~deqguard.dynamics.solve_and_classify` with the head at the served state only (the
    served iterates; the logits equal to float rounding, the head running on fewer rows than
    ``defended_forward``'s per-step heads; about 18% less time per step than through
    ``defended_forward`` at R = 0: ``benchmarks/ab_served_logits.py --grad``). Broyden runs as
    :class:`DifferentiableBroydenSolver` (same iterates, out-of-place memory; Picard has no
    memory to copy); it costs that forward with graph and its backward.
    """

    def __init__(
        self,
        model: MDEQClassifier,
        solver: SolverConfig | FixedPointSolver | None = None,
        *,
        steps: int = DEFAULT_SOLVER_STEPS,
        state: int | None = None,
        params: DefenseParams | None = None,
        grad: DefenseGrad = "bpda",
    ) -> None:
        super().__init__()
        served = resolve_solver(solver)
        config = served.config
        if config.name not in ("broyden", "picard"):
            raise ValueError(f"no differentiable form of the {config.name!r} solver")
        if grad not in ("bpda", "exact"):
            raise ValueError(f"grad must be 'bpda' or 'exact', got {grad!r}")
        if params is not None and params.state is not None:
            state = params.state
        state = steps if state is None else state
        if not 1 <= state <= steps:
            raise ValueError(f"the served state must lie in 1..{steps}, got {state}")
        self.model, self.steps, self.state, self.grad = model, steps, state, grad
        self.params = params if params is not None and params.active else None
        self.solver = DifferentiableBroydenSolver(config) if config.name == "broyden" else served

    @property
    def name(self) -> str:
        kind = "undefended" if self.params is None else self.grad
        return f"served-{kind}-solver-grad-z{self.state}"

    def forward(self, x: Tensor) -> Tensor:
        if self.params is None:  # one solve with its graph, one head at the served state
            return solve_and_classify(
                self.model, x, self.solver, steps=self.steps, state_index=self.state, record=False
            ).logits.float()
        return defended_forward(
            self.model, x, self.params, self.solver, steps=self.steps, differentiable=self.grad
        ).logits.float()


def apgd_attack(
    model: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    *,
    loss: ApgdLoss = "ce",
    eps: float = 8 / 255,
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int = 3,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """pyautoattack's APGD on ``model`` (e.g. a :class:`ServedSurrogate`), l_inf.

    ``loss``: ``ce`` (APGD-CE), ``dlr`` (APGD-DLR) or ``targeted`` (APGD-T, targeted DLR on the
    ``n_target_classes`` highest-scoring wrong classes, capped at classes - 1). Returns
    (x_adv [B, 3, H, W], correct [B] bool under ``model``). The global torch RNG that
    pyautoattack reseeds is restored afterwards.
    """
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    if loss not in ("ce", "dlr", "targeted"):
        raise ValueError(f"loss must be ce, dlr or targeted, got {loss!r}")
    x = x.detach()
    devices = [x.device] if x.device.type == "cuda" else []
    common = dict(n_iter=n_iter, norm="Linf", n_restarts=n_restarts, eps=eps, seed=seed)
    with torch.random.fork_rng(devices=devices):
        if loss == "targeted":
            with torch.no_grad():
                classes = model(x[:1]).shape[1]
            targets = max(1, min(n_target_classes, classes - 1))
            atk = APGDAttack_targeted(model, n_target_classes=targets, device=x.device, **common)
        else:
            atk = APGDAttack(model, loss=loss, device=x.device, **common)
        x_adv = atk.perturb(x, y).detach()
    with torch.no_grad():
        correct = model(x_adv).argmax(1) == y
    return x_adv, correct
