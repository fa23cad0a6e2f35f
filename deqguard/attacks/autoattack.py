"""AutoAttack (pyautoattack 0.2.0, Croce & Hein's reference) with surrogate gradients and the
defended model's decision; Square (score-based, no gradients) against the full defended pipeline.

The wrapper's output is ``s(x) + (d(x).detach() - s(x)).detach()``: its value is the decider's
logits d(x), so AutoAttack judges success (and keeps or drops samples) on the defended decision,
while its gradient is the surrogate's. With no surrogate the module is the decider alone, which
suits the gradient-free Square attack.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from deqguard.attacks.surrogates import Decider, Surrogate

__all__ = ["AutoAttackConfig", "SurrogateDecision", "run_autoattack", "square_attack"]

_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class SurrogateDecision(nn.Module):
    """Value of ``decider``, gradient of ``surrogate`` (either may be None: not both)."""

    def __init__(self, decider: Decider | None, surrogate: Surrogate | None = None) -> None:
        super().__init__()
        if decider is None and surrogate is None:
            raise ValueError("need a decider, a surrogate, or both")
        self.decider, self.surrogate = decider, surrogate

    def forward(self, x: Tensor) -> Tensor:
        if self.surrogate is None:
            assert self.decider is not None
            with torch.no_grad():
                return self.decider(x).float()
        s = self.surrogate(x).float()
        if self.decider is None:
            return s
        with torch.no_grad():
            d = self.decider(x).float()
        return s + (d.detach() - s).detach()


@dataclass(frozen=True)
class AutoAttackConfig:
    """``version='standard'`` is the reference suite (APGD-CE, APGD-T, FAB-T, Square 5000
    queries); ``custom`` runs ``attacks``. Budgets other than the defaults make it non-standard
    (the report says so)."""

    eps: float = 8 / 255
    version: str = "standard"
    attacks: tuple[str, ...] = ()
    seed: int = 0
    apgd_iters: int | None = None
    square_queries: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.version not in ("standard", "custom", "plus"):
            raise ValueError(f"version must be standard, plus or custom, got {self.version!r}")
        if self.version == "custom" and not self.attacks:
            raise ValueError("attacks: version 'custom' needs at least one attack")
        if self.version != "custom" and self.attacks:
            raise ValueError("attacks: only version 'custom' takes a list of attacks")
        bad = set(self.attacks) - set(_ATTACKS)
        if bad:
            raise ValueError(f"attacks: unknown {sorted(bad)}; choose from {list(_ATTACKS)}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")

    @property
    def is_standard(self) -> bool:
        return (
            self.version == "standard" and self.apgd_iters is None and self.square_queries is None
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["attacks"] = list(self.attacks)
        return d


def run_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: AutoAttackConfig | None = None,
    *,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Run pyautoattack on ``model`` (e.g. a :class:`SurrogateDecision`).

    Returns (x_adv [B, 3, H, W], correct [B] bool under ``model``'s decision).
    """
    from pyautoattack import AutoAttack

    cfg = config or AutoAttackConfig()
    attacks: Sequence[str] | None = list(cfg.attacks) if cfg.version == "custom" else None
    aa = AutoAttack(
        model,
        attacks=attacks,
        device=x.device,
        eps=cfg.eps,
        norm="Linf",
        seed=cfg.seed,
        version=cfg.version,
    )
    if cfg.apgd_iters is not None:
        aa.apgd.n_iter = cfg.apgd_iters
        aa.apgd_targeted.n_iter = cfg.apgd_iters
    if cfg.square_queries is not None:
        aa.square.n_queries = cfg.square_queries
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    x_adv, y_adv = aa.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return x_adv, y_adv == y


def square_attack(
    decider: Decider,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    queries: int = 5000,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Square (score-based) against ``decider``, e.g. the full defended pipeline."""
    cfg = AutoAttackConfig(
        eps=eps, version="custom", attacks=("square",), seed=seed, square_queries=queries
    )
    return run_autoattack(SurrogateDecision(decider), x, y, cfg, batch_size=batch_size)
