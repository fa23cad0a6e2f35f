"""Projected gradient descent under l_inf on any surrogate, judged by any decider; transfer.

Batched over samples; restarts keep, per sample, the first adversarial example the decider gets
wrong (or else the one with the highest surrogate loss).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from deqguard.attacks.surrogates import Decider, Surrogate

__all__ = ["AttackResult", "PGDConfig", "pgd_attack", "project_linf", "transfer_attack"]


@dataclass(frozen=True)
class PGDConfig:
    """l_inf PGD. Defaults: the paper's PGD-10 (8/255, step 2/255, uniform random start)."""

    eps: float = 8 / 255
    steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not math.isfinite(self.step_size) or self.step_size < 0:
            raise ValueError(f"step_size must be >= 0, got {self.step_size}")
        if self.restarts < 1:
            raise ValueError(f"restarts must be >= 1, got {self.restarts}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AttackResult:
    """x_adv [B, 3, H, W] (within eps of x, in [0, 1]); logits [B, C] of the decider on x_adv;
    correct [B] bool (decider still right); loss [B] surrogate CE at x_adv."""

    x_adv: Tensor
    logits: Tensor
    correct: Tensor
    loss: Tensor


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Onto the eps-ball around x, then onto [0, 1] (both boxes: the composition is exact)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _loss(surrogate: Surrogate, x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE [B] and its gradient to x_adv."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(surrogate(x_adv).float(), y, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), g


def pgd_attack(
    surrogate: Surrogate,
    x: Tensor,
    y: Tensor,
    config: PGDConfig | None = None,
    *,
    decider: Decider | None = None,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Maximise CE(surrogate(x_adv), y) over the l_inf ball; judge with ``decider``.

    x [B, 3, H, W] in [0, 1]; y [B] int64. The decider defaults to the surrogate itself.
    ``generator`` seeds the random starts (CPU generator; noise is moved to x's device).
    """
    cfg = config or PGDConfig()
    x = x.detach()
    best_x = x.clone()
    best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
    best_logits: Tensor | None = None
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(cfg.restarts):
        if cfg.random_start and cfg.eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x_adv = project_linf(x + (2 * noise - 1) * cfg.eps, x, cfg.eps)
        else:
            x_adv = x.clone()
        for _ in range(cfg.steps):
            _, g = _loss(surrogate, x_adv, y)
            x_adv = project_linf(x_adv + cfg.step_size * g.sign(), x, cfg.eps)
        with torch.no_grad():
            s_logits = surrogate(x_adv).float()
            loss = F.cross_entropy(s_logits, y, reduction="none")
            logits = s_logits if decider is None else decider(x_adv)
        wrong = logits.argmax(1) != y
        # Take this restart where it fools and nothing before did, or where none fools yet and
        # its loss is higher.
        take = (wrong & ~fooled) | (~fooled & ~wrong & (loss > best_loss))
        best_x = torch.where(take[:, None, None, None], x_adv, best_x)
        best_loss = torch.where(take, loss, best_loss)
        best_logits = (
            logits if best_logits is None else torch.where(take[:, None], logits, best_logits)
        )
        fooled = fooled | wrong
        if bool(fooled.all()):
            break
    assert best_logits is not None
    return AttackResult(best_x, best_logits, best_logits.argmax(1) == y, best_loss)


def transfer_attack(
    source: Surrogate,
    target: Decider,
    x: Tensor,
    y: Tensor,
    config: PGDConfig | None = None,
    *,
    generator: torch.Generator | None = None,
) -> AttackResult:
    """Craft on ``source`` (another model, or another defense), judge with ``target``."""
    return pgd_attack(source, x, y, config, decider=target, generator=generator)
