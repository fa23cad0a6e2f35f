"""Training losses (TRADES, PGD-AT). The attacks that build their adversarial examples are the
core's (:mod:`deqguard.attacks.training`)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from deqguard.attacks.training import trades_kl

__all__ = ["pgd_at_loss", "trades_loss"]


def trades_loss(nat_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES: CE(nat) + beta * KL_sum / B. The natural logits are not detached."""
    b = y.shape[0]
    return F.cross_entropy(nat_logits.float(), y) + beta * trades_kl(adv_logits, nat_logits) / b


def pgd_at_loss(adv_logits: Tensor, y: Tensor) -> Tensor:
    """PGD-AT (Madry et al.): CE on the adversarial examples only."""
    return F.cross_entropy(adv_logits.float(), y)
