"""Attacks: PGD on any surrogate, Eq. 11 intermediate-state surrogates, AutoAttack with a
surrogate-gradient / defended-decision wrapper, and adaptive attacks through the defense."""

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

__all__ = [
    "NAMED_SUBSETS",
    "AttackResult",
    "AutoAttackConfig",
    "Decider",
    "DefendedSurrogate",
    "IntermediateSpec",
    "IntermediateSurrogate",
    "PGDConfig",
    "Surrogate",
    "SurrogateDecision",
    "defended_decider",
    "intermediate_grid",
    "intermediate_subset",
    "pgd_attack",
    "project_linf",
    "run_autoattack",
    "square_attack",
    "transfer_attack",
    "undefended_decider",
]
