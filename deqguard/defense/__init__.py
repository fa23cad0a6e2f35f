"""Test-time defense: input entropy reduction along the neural dynamics and early-state prediction.

>>> from deqguard.defense import defended_forward, get_preset
>>> out = defended_forward(model, x, get_preset("paper"))        # doctest: +SKIP
>>> out.logits.argmax(1), out.grad_steps, out.nfe                 # doctest: +SKIP
"""

from deqguard.defense.entropy import (
    BatchParams,
    DefenseResult,
    DefenseStopped,
    DefenseTrace,
    defended_forward,
    entropy_descent,
    served_logits,
)
from deqguard.defense.params import (
    DEFENSE_FIELDS,
    PRESETS,
    DefenseLimits,
    DefenseParamError,
    DefenseParams,
    Preset,
    defense_from_spec,
    get_preset,
    list_presets,
    resolve_defense,
)

__all__ = [
    "DEFENSE_FIELDS",
    "PRESETS",
    "BatchParams",
    "DefenseLimits",
    "DefenseParamError",
    "DefenseParams",
    "Preset",
    "DefenseResult",
    "DefenseStopped",
    "DefenseTrace",
    "defended_forward",
    "defense_from_spec",
    "entropy_descent",
    "get_preset",
    "list_presets",
    "resolve_defense",
    "served_logits",
]
