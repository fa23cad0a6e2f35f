"""Training losses and the attacks that build training examples (TRADES, PGD-AT).

The attacks take a ``forward(x) -> logits`` callable so they stay independent of the DEQ
plumbing (phantom gradient, random depth): the trainer passes a closure. They return detached
adversarial images; parameters receive no gradient from them (``autograd.grad`` w.r.t. x only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Forward",
    "pgd_at_attack",
    "pgd_at_loss",
    "project",
    "trades_attack",
    "trades_kl",
    "trades_loss",
]

Forward = Callable[[Tensor], Tensor]


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip into the l_inf ball of radius eps around x, then into the image box [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def trades_kl(adv_logits: Tensor, nat_logits: Tensor) -> Tensor:
    """sum over the batch of KL(p_nat || p_adv) = kl_div(log p_adv, p_nat, 'sum').

    The authors' ``KLDivLoss(size_average=False)(log_softmax(adv), softmax(nat))``.
    """
    return F.kl_div(
        F.log_softmax(adv_logits.float(), dim=1),
        F.softmax(nat_logits.float(), dim=1),
        reduction="sum",
    )


def trades_loss(nat_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES: CE(nat) + beta * KL_sum / B. The natural logits are not detached."""
    b = y.shape[0]
    return F.cross_entropy(nat_logits.float(), y) + beta * trades_kl(adv_logits, nat_logits) / b


def pgd_at_loss(adv_logits: Tensor, y: Tensor) -> Tensor:
    """PGD-AT (Madry et al.): CE on the adversarial examples only."""
    return F.cross_entropy(adv_logits.float(), y)


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
        x_adv = project(x_adv.detach() + step_size * grad.sign(), x, eps)
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
    """PGD with a uniform random start in the eps ball (clamped to [0, 1]), CE ascent."""
    start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * start - 1) * eps).clamp(0.0, 1.0)
    return _sign_steps(
        x, x_adv, lambda xa: F.cross_entropy(forward(xa).float(), y), eps, step_size, steps
    )
