"""Projected gradient descent under l_inf on any surrogate, judged by any decider; transfer.

Batched over samples. Every iterate (the start and the point after each step, the last one
included) is judged, and the attack keeps, per sample, the first iterate the judge gets wrong:
an image fooled at any step counts as fooled, and the example returned is that fooling iterate.
Samples not fooled by any iterate of any restart keep the iterate with the highest surrogate loss.
A fooled sample stops being attacked (later steps and restarts run on the others only).

The judge is ``decider`` when given, else the surrogate's own logits at that iterate (free: they
were computed for the gradient). A straight-through surrogate whose value is the served
prediction (:class:`deqguard.attacks.ServedSurrogate`) is thus judged by the served prediction at
no extra cost. ``PGDConfig(every_iterate=False)`` judges only the last iterate of each restart
(the paper's PGD protocol).
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
    """l_inf PGD. Defaults: the paper's PGD-10 (8/255, step 2/255, uniform random start).

    ``every_iterate``: judge every iterate and keep the first fooling one (default); False judges
    the last iterate of each restart only. ``restarts``: random restarts; each runs on the samples
    no earlier restart fooled.
    """

    eps: float = 8 / 255
    steps: int = 10
    step_size: float = 2 / 255
    random_start: bool = True
    restarts: int = 1
    every_iterate: bool = True

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
    """x_adv [B, 3, H, W] (within eps of x, in [0, 1]); logits [B, C] of the judge on x_adv;
    correct [B] bool (no iterate fooled the judge); loss [B] surrogate CE at x_adv."""

    x_adv: Tensor
    logits: Tensor
    correct: Tensor
    loss: Tensor


def project_linf(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Onto the eps-ball around x, then onto [0, 1] (both boxes: the composition is exact)."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _loss(
    surrogate: Surrogate, x_adv: Tensor, y: Tensor, grad: bool = True
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-sample CE [B], its gradient to x_adv (None unless ``grad``) and the logits [B, C]."""
    if not grad:
        with torch.no_grad():
            logits = surrogate(x_adv.detach()).float()
            return F.cross_entropy(logits, y, reduction="none"), None, logits
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = surrogate(x_adv).float()
        loss = F.cross_entropy(logits, y, reduction="none")
        (g,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), g, logits.detach()


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

    x [B, 3, H, W] in [0, 1]; y [B] int64. The judge defaults to the surrogate itself.
    ``generator`` seeds the random starts (CPU generator; noise is moved to x's device). Each
    restart draws noise for the whole batch, so a sample's start does not depend on which
    others an earlier restart fooled.
    """
    cfg = config or PGDConfig()
    x = x.detach()
    batch = x.shape[0]
    best_x = x.clone()
    best_loss = torch.full((batch,), -float("inf"), device=x.device)
    best_logits: Tensor | None = None
    fooled = torch.zeros(batch, dtype=torch.bool, device=x.device)

    def judge(xs: Tensor, s_logits: Tensor) -> Tensor:
        if decider is None:
            return s_logits
        with torch.no_grad():
            return decider(xs).float()

    for _ in range(cfg.restarts):
        noise = None
        if cfg.random_start and cfg.eps > 0:
            noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        rows = (~fooled).nonzero().squeeze(1)  # the samples this restart attacks
        if rows.numel() == 0:
            break
        x0, y0 = x[rows], y[rows]
        if noise is not None:
            xa = project_linf(x0 + (2 * noise[rows] - 1) * cfg.eps, x0, cfg.eps)
        else:
            xa = x0.clone()
        live = torch.arange(rows.numel(), device=x.device)  # positions in rows still attacked
        for t in range(cfg.steps + 1):
            last = t == cfg.steps
            xs, ys = xa[live], y0[live]
            loss, g, s_logits = _loss(surrogate, xs, ys, grad=not last)
            if cfg.every_iterate or last:
                logits = judge(xs, s_logits)
                if best_logits is None:
                    best_logits = torch.zeros(batch, logits.shape[1], device=x.device)
                wrong = logits.argmax(1) != ys
                at = rows[live]
                # the first fooling iterate, or (not fooled) the highest loss so far
                take = wrong | (loss > best_loss[at])
                sel = at[take]
                best_x[sel] = xs[take]
                best_loss[sel] = loss[take]
                best_logits[sel] = logits[take]
                fooled[at[wrong]] = True
            else:
                wrong = torch.zeros_like(ys, dtype=torch.bool)
            if last:
                break
            assert g is not None
            xa = xa.clone()
            xa[live] = project_linf(xs + cfg.step_size * g.sign(), x0[live], cfg.eps)
            live = live[~wrong]
            if live.numel() == 0:
                break
    assert best_logits is not None
    return AttackResult(best_x, best_logits, ~fooled, best_loss)


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
