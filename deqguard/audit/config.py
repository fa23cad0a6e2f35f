"""Audit configuration and suites, validated once at the edge.

A suite is a list of :class:`AttackPlan` items. Everything an attack needs is in its plan, so a
batch's result depends only on (config, batch index) and resuming reproduces it.

- ``quick``: PGD-10 on a few Eq. 11 surrogates (the ``quick`` subset), judged by the defended model.
- ``paper``: PGD-10 on the full 144-attack Eq. 11 grid, then AutoAttack (standard) with the
  batch's strongest surrogate's gradient and the defended decision. The paper's protocol.
- ``adaptive``: attacks through the defense: BPDA PGD at a middle and the last state, the exact
  derivative variant, and Square (score-based) on the full defended pipeline; plus a transfer
  attack from another store entry when ``transfer_from`` is set.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from deqguard.attacks import IntermediateSpec, intermediate_subset
from deqguard.defense import DefenseParams, get_preset

__all__ = ["SUITES", "AttackPlan", "AuditConfig", "build_suite"]

SUITES = ("quick", "paper", "adaptive")
AttackKind = Literal["pgd", "autoattack", "bpda", "exact", "square", "transfer"]


@dataclass(frozen=True)
class AttackPlan:
    """One attack of a suite. ``spec`` is the Eq. 11 surrogate (None: chosen per batch or unused)."""

    name: str
    kind: AttackKind
    spec: IntermediateSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": None if self.spec is None else self.spec.name,
        }


@dataclass(frozen=True)
class AuditConfig:
    """What to audit and how.

    Attributes:
        model: a store reference ``name[@version]`` (or a label when the model is passed in).
        store_root: model store directory (None: the default).
        defense: preset name, or the parameters themselves.
        suite: ``quick``, ``paper`` or ``adaptive``.
        n: the first n test images, official order.
        batch_size, seed: batching and the root of every attack's randomness.
        steps: solver steps N.
        eps: l_inf radius of every attack.
        pgd_steps, pgd_step_size, pgd_restarts: PGD budget (default PGD-10, 2/255, 1).
        grid: Eq. 11 subset for the ``paper`` suite (``full`` = 144 attacks; smaller subsets make
            the audit cheaper and are reported as such).
        autoattack: run AutoAttack in ``paper``; aa_version ``standard`` or ``custom`` with
            ``aa_attacks``; ``aa_apgd_iters`` / ``square_queries`` override budgets (non-standard).
        adaptive_ka: unroll length of the adaptive surrogates.
        transfer_from: another store entry to craft transfer attacks on (``adaptive``).
        attack_misclassified: also attack images the defended model already gets wrong. Off by
            default (as AutoAttack and RobustBench do): such an image is non-robust under every
            attack whatever the attack does, so skipping it changes no accuracy and saves about
            (1 - clean accuracy) of the audit's compute. P, Delta H and the curves are then over
            the attacked (clean-correct) images.
        device: torch device string.
    """

    model: str
    defense: str | DefenseParams = "paper"
    suite: str = "quick"
    n: int = 1000
    batch_size: int = 64
    seed: int = 0
    steps: int = 8
    eps: float = 8 / 255
    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    pgd_restarts: int = 1
    grid: str = "full"
    autoattack: bool = True
    aa_version: str = "standard"
    aa_attacks: tuple[str, ...] = ()
    aa_apgd_iters: int | None = None
    square_queries: int = 5000
    adaptive_ka: int = 5
    transfer_from: str | None = None
    attack_misclassified: bool = False
    store_root: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite must be one of {SUITES}, got {self.suite!r}")
        if isinstance(self.defense, str):
            get_preset(self.defense)  # raises naming the presets
        elif not isinstance(self.defense, DefenseParams):
            raise ValueError(
                f"defense must be a preset name or DefenseParams, got {self.defense!r}"
            )
        for name in ("n", "batch_size", "steps", "pgd_restarts", "adaptive_ka", "square_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pgd_steps < 0:
            raise ValueError(f"pgd_steps must be >= 0, got {self.pgd_steps}")
        for name in ("eps", "pgd_step_size"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        intermediate_subset(self.grid, self.steps)  # raises naming the subsets
        if self.aa_apgd_iters is not None and self.aa_apgd_iters < 1:
            raise ValueError(f"aa_apgd_iters must be >= 1, got {self.aa_apgd_iters}")
        if self.defense_params.state is not None and self.defense_params.state > self.steps:
            raise ValueError(
                f"defense state {self.defense_params.state} exceeds steps {self.steps}"
            )

    @property
    def defense_params(self) -> DefenseParams:
        return get_preset(self.defense) if isinstance(self.defense, str) else self.defense

    @property
    def defense_name(self) -> str:
        return self.defense if isinstance(self.defense, str) else "custom"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["defense"] = self.defense_name
        d["defense_params"] = self.defense_params.to_dict()
        d["aa_attacks"] = list(self.aa_attacks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditConfig:
        d = dict(d)
        params = d.pop("defense_params", None)
        if d.get("defense") == "custom" and params is not None:
            d["defense"] = DefenseParams.from_dict(params)
        d["aa_attacks"] = tuple(d.get("aa_attacks", ()))
        return cls(**d)


def build_suite(cfg: AuditConfig) -> list[AttackPlan]:
    """The attacks of ``cfg.suite`` in a fixed order (the order seeds each attack)."""
    n = cfg.steps
    if cfg.suite == "quick":
        return [AttackPlan(f"pgd-{s.name}", "pgd", s) for s in intermediate_subset("quick", n)]
    if cfg.suite == "paper":
        plans = [AttackPlan(f"pgd-{s.name}", "pgd", s) for s in intermediate_subset(cfg.grid, n)]
        if cfg.autoattack:
            plans.append(AttackPlan("autoattack", "autoattack", None))
        return plans
    ka = cfg.adaptive_ka
    mid = max(1, n // 2)
    plans = [
        AttackPlan(
            f"bpda-{IntermediateSpec(mid, ka, 0.5).name}", "bpda", IntermediateSpec(mid, ka, 0.5)
        ),
        AttackPlan(
            f"bpda-{IntermediateSpec(n, ka, 0.5).name}", "bpda", IntermediateSpec(n, ka, 0.5)
        ),
        AttackPlan(
            f"exact-{IntermediateSpec(mid, ka, 0.5).name}", "exact", IntermediateSpec(mid, ka, 0.5)
        ),
        AttackPlan("square-defended", "square", None),
    ]
    if cfg.transfer_from:
        plans.append(
            AttackPlan(f"transfer-{cfg.transfer_from}", "transfer", IntermediateSpec(mid, ka, 0.5))
        )
    return plans
