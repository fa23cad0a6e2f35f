"""Attacks: PGD on any surrogate, Eq. 11 intermediate-state surrogates, AutoAttack with a
surrogate-gradient / defended-decision wrapper, adaptive attacks through the defense, APGD
on the served prediction (straight-through surrogate), and the attacks that build adversarial
training examples (TRADES, PGD-AT)."""

from deqguard.attacks.apgd import ApgdLoss, ServedSurrogate, SolverGradSurrogate, apgd_attack
from deqguard.attacks.autoattack import (
    AutoAttackConfig,
    SurrogateDecision,
    run_autoattack,
    square_attack,
)
from deqguard.attacks.pgd import AttackResult, PGDConfig, pgd_attack, project_linf, transfer_attack
from deqguard.attacks.surrogates import (
    NAMED_SUBSETS,
    Decider,
    DefendedSurrogate,
    IntermediateSpec,
    IntermediateSurrogate,
    Surrogate,
    defended_decider,
    intermediate_grid,
    intermediate_subset,
    undefended_decider,
)
from deqguard.attacks.training import pgd_at_attack, trades_attack, trades_kl

__all__ = [
    "NAMED_SUBSETS",
    "ApgdLoss",
    "AttackResult",
    "AutoAttackConfig",
    "Decider",
    "DefendedSurrogate",
    "IntermediateSpec",
    "IntermediateSurrogate",
    "PGDConfig",
    "Surrogate",
    "ServedSurrogate",
    "SolverGradSurrogate",
    "SurrogateDecision",
    "apgd_attack",
    "defended_decider",
    "intermediate_grid",
    "intermediate_subset",
    "pgd_at_attack",
    "pgd_attack",
    "project_linf",
    "run_autoattack",
    "square_attack",
    "trades_attack",
    "trades_kl",
    "transfer_attack",
    "undefended_decider",
]
