"""The attacks that build adversarial training examples (TRADES, PGD-AT) and select models.

Unlike :func:`deqguard.attacks.pgd_attack` (an evaluation: every iterate judged, the first
fooling one kept), these return the last iterate of a fixed number of sign steps, as the
training recipes prescribe. They take a ``forward(x) -> logits`` callable so they stay
independent of the DEQ plumbing (phantom gradient, random depth): the trainer passes a closure.
They return detached adversarial images; parameters receive no gradient from them
(``autograd.grad`` w.r.t. x only). Their numerics are those of the training campaign's
committed state: change them and a resumed run diverges from its first half.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.attacks.pgd import project_linf

__all__ = ["Forward", "pgd_at_attack", "trades_attack", "trades_kl"]

Forward = Callable[[Tensor], Tensor]
"""x [B, 3, H, W] -> logits [B, C] with a graph to x."""


def trades_kl(adv_logits: Tensor, nat_logits: Tensor) -> Tensor:
    """sum over the batch of KL(p_nat || p_adv) = kl_div(log p_adv, p_nat, 'sum').

    The authors' ``KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat))``.
    """
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.softmax(nat_logits.float(), dim=1),
        reduction="sum",
    )


def _sign_steps(
    x: Tensor,
    x_adv: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    eps: float,
    step_size: float,
    steps: int,
) -> Tensor:
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_()
        with torch.enable_grad():
            loss = loss_fn(x_adv)
            (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project_linf(x_adv.detach() + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def trades_attack(
    forward: Forward,
    x: Tensor,
    nat_logits: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES inner maximisation: start at x + 0.001 N(0, 1), sign-gradient ascent on the summed
    KL to the (detached) natural prediction, projected to the eps ball and [0, 1]."""
    nat = nat_logits.detach()
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + 0.001 * noise).detach()
    return _sign_steps(x, x_adv, lambda xa: trades_kl(forward(xa), nat), eps, step_size, steps)


def pgd_at_attack(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PGD with a uniform random start in the eps ball (clamped to [0, 1]), ascent on the
    batch-mean CE; the last iterate."""
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * start - 1) * eps).clamp(0.0, 1.0)
    return _sign_steps(
        x, x_adv, lambda xa: F.cross_entropy(forward(xa).float(), y), eps, step_size, steps
    )
