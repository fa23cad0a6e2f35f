"""Defense parameters and presets, and the one resolution of settings into parameters.

Every caller (the v1 and v2 routes, admin audits, the ``deqguard audit`` CLI) turns "a preset
plus overrides, under some limits" into :class:`DefenseParams` through :func:`resolve_defense`, so
the rules and the error messages (each naming its field) exist once. A batch may mix parameters,
so every field is per sample and nothing here assumes a batch-wide value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "DEFENSE_FIELDS",
    "PRESETS",
    "DefenseLimits",
    "DefenseParamError",
    "DefenseParams",
    "Preset",
    "defense_from_spec",
    "get_preset",
    "list_presets",
    "resolve_defense",
]

DEFENSE_FIELDS: tuple[str, ...] = ("beta", "R", "Tf", "eps", "state")
"""The per-sample fields of :class:`DefenseParams`, in declaration order."""


class Preset(StrEnum):
    """The named defense settings (values of :data:`PRESETS`)."""

    OFF = "off"
    PAPER = "paper"
    FAST = "fast"
    STRONG = "strong"


class DefenseParamError(ValueError):
    """A defense setting is invalid; ``field`` names it (``preset``, ``R``, ...)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class DefenseParams:
    """Test-time input entropy reduction (the paper's Sec. 3.2, Algorithm 1) and early state.

    Attributes:
        beta: sign-gradient step size on the input (l_inf units, images in [0, 1]).
        R: input-update steps per intervention; 0 switches the entropy reduction off.
        Tf: intervene after every solver step t with t mod Tf = 0 up to and including t = N (then z[t]
            is solved again under the updated input: Algorithm 1, line 13).
        eps: l_inf radius around the input *as received* within which the input may move.
        state: the early state the prediction is read from, 1..N; None = N (the last raw iterate).
    """

    beta: float = 2 / 255
    R: int = 0
    Tf: int = 2
    eps: float = 8 / 255
    state: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.beta, int | float) or not math.isfinite(self.beta) or self.beta < 0:
            raise DefenseParamError(f"beta must be a finite number >= 0, got {self.beta!r}", "beta")
        if not isinstance(self.R, int) or isinstance(self.R, bool) or self.R < 0:
            raise DefenseParamError(f"R must be an integer >= 0, got {self.R!r}", "R")
        if not isinstance(self.Tf, int) or isinstance(self.Tf, bool) or self.Tf < 1:
            raise DefenseParamError(f"Tf must be an integer >= 1, got {self.Tf!r}", "Tf")
        if not isinstance(self.eps, int | float) or not math.isfinite(self.eps) or self.eps < 0:
            raise DefenseParamError(f"eps must be a finite number >= 0, got {self.eps!r}", "eps")
        if self.state is not None and (
            not isinstance(self.state, int) or isinstance(self.state, bool) or self.state < 1
        ):
            raise DefenseParamError(
                f"state must be None or an integer >= 1, got {self.state!r}", "state"
            )

    @property
    def active(self) -> bool:
        """Whether the entropy reduction does any work (R > 0 and a non-zero step)."""
        return self.R > 0

    def grad_steps(self, steps: int) -> int:
        """Input-gradient steps one image costs over ``steps`` solver steps: R at every
        t in 1..N with t mod Tf = 0 (``BatchParams.schedule``); the work a request asks for."""
        return self.R * (steps // self.Tf)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DefenseParams:
        """Strict: unknown keys are an error (a misspelt field must not pass silently)."""
        unknown = sorted(set(d) - set(DEFENSE_FIELDS))
        if unknown:
            raise DefenseParamError(f"unknown defense parameter(s): {unknown}", unknown[0])
        return cls(**d)


PRESETS: dict[str, DefenseParams] = {
    # Early state only (z[N]); no input updates: the undefended cost.
    Preset.OFF: DefenseParams(R=0),
    # The paper's defaults (Sec. 4 / appendix / authors' code): Tf 2, R 10, beta 2/255, eps 8/255.
    Preset.PAPER: DefenseParams(beta=2 / 255, R=10, Tf=2, eps=8 / 255),
    # Cheaper: one intervention every 4 steps with 5 updates (Table 5: 54.80 vs 55.18 at paper).
    Preset.FAST: DefenseParams(beta=2 / 255, R=5, Tf=4, eps=8 / 255),
    # Most frequent and longest (Table 5's Tf 1, R 20 corner).
    Preset.STRONG: DefenseParams(beta=2 / 255, R=20, Tf=1, eps=8 / 255),
}


def list_presets() -> list[str]:
    return [str(p) for p in PRESETS]


def get_preset(name: str) -> DefenseParams:
    """The named preset; ValueError naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DefenseParamError(
            f"unknown defense preset {name!r}; choose one of {list_presets()}", "preset"
        ) from None


@dataclass(frozen=True)
class DefenseLimits:
    """Bounds a caller puts on resolved parameters (None: unbounded).

    ``steps`` is the model's solver steps N (``state`` and ``Tf`` must not exceed it);
    ``max_R`` bounds the cost of one request; ``unit_box`` keeps ``beta`` and ``eps`` in [0, 1]
    (the images' range: a larger step or radius is a client's mistake, not a setting).
    """

    steps: int | None = None
    max_R: int | None = None
    unit_box: bool = False


def resolve_defense(
    preset: str,
    overrides: Mapping[str, Any] | None = None,
    limits: DefenseLimits | None = None,
) -> DefenseParams:
    """Preset plus overrides under ``limits`` -> validated DefenseParams.

    ``overrides`` holds DefenseParams fields (each given value wins over the preset's; an
    unknown key is an error). Raises :class:`DefenseParamError` naming the offending field.
    """
    fields = get_preset(preset).to_dict()
    given = dict(overrides or {})
    unknown = sorted(set(given) - set(DEFENSE_FIELDS))
    if unknown:
        raise DefenseParamError(f"unknown defense parameter(s): {unknown}", unknown[0])
    fields.update(given)
    params = DefenseParams(**fields)
    lim = limits or DefenseLimits()
    if lim.max_R is not None and params.R > lim.max_R:
        raise DefenseParamError(f"R must be <= {lim.max_R} on this server, got {params.R}", "R")
    if lim.steps is not None:
        n = lim.steps
        if params.state is not None and params.state > n:
            raise DefenseParamError(
                f"state must lie in 1..{n} (the model's solver steps), got {params.state}",
                "state",
            )
        if params.Tf > n:
            raise DefenseParamError(
                f"Tf must lie in 1..{n} (the model's solver steps), got {params.Tf}", "Tf"
            )
    if lim.unit_box:
        for key in ("beta", "eps"):
            value = getattr(params, key)
            if not math.isfinite(value) or value > 1.0:
                raise DefenseParamError(f"{key} must lie in [0, 1], got {value}", key)
    return params


def defense_from_spec(
    spec: str | Mapping[str, Any], limits: DefenseLimits | None = None
) -> str | DefenseParams:
    """An audit's defense as written (admin API, ``deqguard audit --defense``): a preset name
    as it is (checked when the audit's config is built, and named in its report), or a mapping
    of DefenseParams fields with an optional ``preset`` base (default ``off``), resolved.
    With ``limits`` (the admin API: the server's serving limits), a preset is checked under
    them too."""
    if isinstance(spec, str):
        if limits is not None:
            resolve_defense(spec, None, limits)
        return spec
    fields = dict(spec)
    return resolve_defense(str(fields.pop("preset", Preset.OFF)), fields, limits)
