"""Audit configuration and suites, validated once at the edge.

A suite is a list of :class:`AttackPlan` items. Everything an attack needs is in its plan or
the config, so a batch's result depends only on (config, batch index) and resuming reproduces
it. Every attack's output is judged by the prediction the service returns: the defended
prediction when the defense is on (R > 0), else the plain early-state prediction z[state]
(default z[N]). "Undefended" below means that served prediction with the defense's input
updates switched off (R = 0, same state). Plans differ in where their gradient comes from
(``grad``) and in which prediction picks their examples while they run (``select``):

- ``eq11``: an Eq. 11 surrogate on the undefended dynamics (``spec``);
- ``undefended``: the straight-through surrogate of the undefended served prediction (value: the
  exact logits at z[state]; gradient: ``adaptive_ka`` damped steps (lambda 0.5) from z[state]);
- ``solver``: the same value, its gradient by backpropagation through all N solver steps from
  z = 0 (the served prediction's own gradient, which the short unrolling only approximates near
  a fixed point). ``undefended_grad = "solver"`` gives every attack below that says
  ``undefended`` this gradient instead (the sanity checks' white-box PGD too when the defense
  is off);
- ``bpda`` / ``exact``: the same through the defense (value: the defended logits; the input
  updates are the identity in backward, or differentiated exactly); ``defended_grad = "solver"``
  differentiates every step of the defended dynamics instead of Ka steps from its state;
- ``none``: score-based (Square); ``source-model``: another store entry's Eq. 11 surrogate.

Suites and budgets (defaults; eps 8/255 l_inf; "APGD" is pyautoattack 0.2.0's reference code):

- ``quick`` (the admin default):
  ``pgd-undefended`` PGD-``pgd_steps`` (10 steps of 2/255, ``pgd_restarts`` restarts, best iterate
  by the undefended prediction); ``apgd-ce`` APGD-CE ``apgd_iters`` = 100 iterations, 1 restart;
  ``apgd-t`` APGD-T 100 iterations on each of the top ``apgd_targets`` = 3 target classes; all
  three on the undefended served prediction (their examples chosen by it at every iterate), so
  with a defense on they are transfer attacks, judged by the defended prediction. With the
  defense on, also ``bpda-apgd-t``: APGD-T through the defense (BPDA), 100 iterations on each of
  the top ``bpda_targets`` = 3 targets, every iterate judged by the defended prediction.
- ``paper``: PGD-``pgd_steps`` on the Eq. 11 grid (``grid``, default the full 144 attacks), every
  iterate judged by the defended prediction unless ``pgd_every_iterate`` is False (the paper's
  last-iterate protocol, non-standard); then the standard AutoAttack (APGD-CE, APGD-T 9 targets,
  FAB-T, Square 5000 queries) with the gradient of the batch's strongest grid surrogate and the
  defended decision. Without AutoAttack (``autoattack=False``) the report is labelled
  non-standard.
- ``adaptive``: the undefended ``apgd-ce`` (``adaptive_restarts`` = 3 restarts) and ``apgd-t``
  (top ``apgd_targets`` targets) as transfer attacks; with the defense on, APGD-CE (3 restarts)
  and APGD-T (top 3 targets, one random start each) through the defense with BPDA and with the
  exact derivative, and ``bpda-pgd`` / ``exact-pgd``: PGD-``adaptive_pgd_steps`` = 50 (2/255)
  with ``adaptive_pgd_restarts`` = 5 restarts through the defense (0 steps: not run), every
  iterate of each judged by the defended prediction; ``square-defended``: Square
  on the served pipeline end to end, ``square_queries`` = 5000 queries; and a PGD transfer
  attack from another store entry when ``transfer_from`` is set.

Every report also carries sanity checks (``sanity_images``: the attacked images among the first
32 of the audit; see :mod:`deqguard.audit.engine`): white-box PGD through the served pipeline
(BPDA when the defense is on) at eps 32/255 (2k steps of 2.5 eps / 2k, k = ``pgd_steps``), at
eps with k steps, with 4k steps of half the step size, and with 3 restarts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Literal

from deqguard.attacks import IntermediateSpec, intermediate_subset
from deqguard.configs import DEFAULT_SOLVER_STEPS
from deqguard.defense import DefenseParamError, DefenseParams, get_preset

__all__ = [
    "SUITES",
    "GRAD_PATHS",
    "MODEL_FORMS",
    "AttackKind",
    "AttackPlan",
    "AuditConfig",
    "Suite",
    "attack_family",
    "build_suite",
    "full_suite",
]


class Suite(StrEnum):
    """The attack suites (see the module docstring)."""

    QUICK = "quick"
    PAPER = "paper"
    ADAPTIVE = "adaptive"


SUITES: tuple[str, ...] = tuple(s.value for s in Suite)
GRAD_PATHS: tuple[str, ...] = ("unrolled", "solver")
"""How an attack differentiates the served prediction: a few unrolled steps from the served
state, or every solver step (``undefended_grad``, ``defended_grad``)."""
MODEL_FORMS: tuple[str, ...] = ("served", "training")
"""Which copy of the model an audit runs (``model_form``): the service's eval-only copy
(``prepare_for_inference``: BatchNorm folded, weight norm baked in) or the module as trained."""


class AttackKind(StrEnum):
    """The algorithm. ``bpda`` / ``exact`` (PGD through the defense) and ``transfer`` (PGD on
    another model) are the kinds of schema-1 reports; new suites say ``pgd`` with ``grad``."""

    PGD = "pgd"
    APGD_CE = "apgd-ce"
    APGD_T = "apgd-t"
    AUTOATTACK = "autoattack"
    SQUARE = "square"
    TRANSFER = "transfer"
    BPDA = "bpda"
    EXACT = "exact"


AttackKindName = Literal[tuple(k.value for k in AttackKind)]  # type: ignore[valid-type]
GradSource = Literal["eq11", "undefended", "solver", "bpda", "exact", "none", "source-model"]
SelectBy = Literal["undefended", "defended", "source-model"]

_SELECT: dict[str, str] = {
    "eq11": "defended",
    "undefended": "undefended",
    "solver": "undefended",
    "bpda": "defended",
    "exact": "defended",
    "none": "defended",
    "source-model": "source-model",
}


def attack_family(kind: str, grad: str) -> str:
    """The family of an attack, the attacks a cascade chains (``AuditConfig.cascade``) and the
    ablation table's columns: ``adaptive`` (through the defense, score-based, or from another
    model), ``autoattack`` (APGD-CE, APGD-T, AutoAttack), ``intermediate`` (the Eq. 11 grid),
    ``pgd`` (PGD on the undefended served prediction)."""
    if grad in ("bpda", "exact", "none", "source-model"):
        return "adaptive"
    if kind in ("autoattack", "apgd-ce", "apgd-t"):
        return "autoattack"
    return "intermediate" if grad == "eq11" else "pgd"


@dataclass(frozen=True)
class AttackPlan:
    """One attack of a suite.

    Attributes:
        name: unique in the suite.
        kind: the algorithm (``pgd``, ``apgd-ce``, ``apgd-t``, ``autoattack``, ``square``).
        spec: the Eq. 11 surrogate of ``grad == "eq11"`` plans (None for AutoAttack: the batch's
            strongest grid surrogate is used) and of the ``source-model`` transfer.
        grad: where the gradient comes from (see the module docstring).
        iters: PGD steps / APGD iterations / Square queries (0: the config's or the library's).
        restarts: random restarts (APGD-T: per target class).
        targets: APGD-T target classes (the top ``targets`` wrong classes).
    """

    name: str
    kind: AttackKindName
    spec: IntermediateSpec | None = None
    grad: GradSource = "eq11"
    iters: int = 0
    restarts: int = 1
    targets: int = 0

    @property
    def select(self) -> str:
        """The prediction that picks this attack's examples while it runs (its final output is
        always judged by the served prediction, defended when the defense is on)."""
        return _SELECT[self.grad]

    @property
    def budget(self) -> str:
        if self.kind == "pgd":
            return f"PGD-{self.iters}, {self.restarts} restart(s), best iterate per sample"
        if self.kind == "apgd-ce":
            return f"APGD-CE {self.iters} iterations, {self.restarts} restart(s)"
        if self.kind == "apgd-t":
            return (
                f"APGD-T {self.iters} iterations x top-{self.targets} target classes,"
                f" {self.restarts} restart(s) each"
            )
        if self.kind == "square":
            return f"Square {self.iters} queries"
        if self.kind == "autoattack":
            return "AutoAttack (see config: aa_version, aa_apgd_iters, square_queries)"
        return ""

    @property
    def family(self) -> str:
        """The attacks a cascade chains (:func:`attack_family`)."""
        return attack_family(self.kind, self.grad)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "spec": None if self.spec is None else self.spec.name,
            "grad": self.grad,
            "select": self.select,
            "budget": self.budget,
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
        pgd_every_iterate: judge every PGD iterate and keep the first fooling one (default);
            False: the last iterate of each restart only (the paper's protocol; non-standard).
        apgd_iters, apgd_targets: APGD budget (100 iterations; APGD-T on the top 3 targets).
        bpda_targets: APGD-T target classes of ``quick``'s BPDA attack through the defense.
        adaptive_restarts: APGD-CE restarts in ``adaptive``.
        adaptive_pgd_steps, adaptive_pgd_restarts: the PGD through the defense (BPDA and exact)
            in ``adaptive`` (50 steps of ``pgd_step_size``, 5 restarts; 0 steps: not run).
        sanity_images: the sanity checks run on the attacked images among the first
            ``sanity_images`` of the audit (0: not run, and the report says so).
        sanity_eps: the large radius whose accuracy must be near 0 (32/255).
        grid: Eq. 11 subset for the ``paper`` suite (``full`` = 144 attacks; smaller subsets make
            the audit cheaper and are reported as such).
        autoattack: run AutoAttack in ``paper``; aa_version ``standard`` or ``custom`` with
            ``aa_attacks``; ``aa_apgd_iters`` / ``square_queries`` override budgets (non-standard).
        adaptive_ka: unroll length of the straight-through and adaptive surrogates (Ka).
        transfer_from: another store entry to craft transfer attacks on (``adaptive``).
        attack_misclassified: also attack images the defended model already gets wrong. Off by
            default (as AutoAttack and RobustBench do): such an image is non-robust under every
            attack whatever the attack does, so skipping it changes no accuracy and saves about
            (1 - clean accuracy) of the audit's compute. P, Delta H and the curves are then over
            the attacked (clean-correct) images.
        attacks: run only these attacks of the suite, by name (empty: all of them). Each keeps
            the seed it has in the whole suite, so the outcomes equal the whole suite's; the
            report says which were left out (non-standard on its own: combine such audits per
            sample with ``deqguard audit-table``).
        device: torch device string.
        undefended_grad: the gradient of the attacks on the undefended served prediction:
            ``unrolled`` (``adaptive_ka`` damped steps from the served state; the default, so
            that audits begun before the option resume: their fingerprint lacks it) or
            ``solver`` (backpropagation through the N solver steps: the served prediction's
            own gradient, the one to use when the dynamics do not converge).
        defended_grad: the same for the attacks through the defense (``bpda``, ``exact``, and
            the sanity checks' white-box PGD when the defense is on): ``unrolled`` (Ka steps
            from the defended served state; default, for the same reason) or ``solver`` (every
            step of the defended dynamics differentiated, the input updates by ``bpda`` /
            ``exact``).
        cascade: run each attack only on the images that every earlier attack of its
            ``AttackPlan.family`` left correct, as AutoAttack runs its attacks (fewer images
            per attack: docs/TRAINING.md). Each family's first attack still sees
            every attacked image; the later ones' figures are then cumulative (robust to this
            attack and every earlier one of its family), so a family's last row is its
            per-sample worst case. The per-sample worst case over all attacks is unchanged.
        model_form: the copy of the model that is attacked and judged: ``served`` (default:
            ``prepare_for_inference``'s eval-only copy, the very function ``/v1/predict``
            computes) or ``training`` (the module as trained, what audits ran before the
            option: their fingerprint lacks it, so it is dropped at that value and
            ``from_dict`` reads its absence so). The two agree to float rounding undefended;
            through the defense the sign steps of Algorithm 1 carry rounding differences
            further (up to 0.014 in a logit on 64 images), so only ``served`` is judged by
            the service's own prediction. ``served`` is also 5-15% faster (no BatchNorm pass).
    """

    model: str
    defense: str | DefenseParams = "paper"
    suite: str = "quick"
    n: int = 1000
    batch_size: int = 64
    seed: int = 0
    steps: int = DEFAULT_SOLVER_STEPS
    eps: float = 8 / 255
    pgd_steps: int = 10
    pgd_step_size: float = 2 / 255
    pgd_restarts: int = 1
    pgd_every_iterate: bool = True
    apgd_iters: int = 100
    apgd_targets: int = 3
    bpda_targets: int = 3
    adaptive_restarts: int = 3
    adaptive_pgd_steps: int = 50
    adaptive_pgd_restarts: int = 5
    sanity_images: int = 32
    sanity_eps: float = 32 / 255
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
    attacks: tuple[str, ...] = ()
    device: str = "cpu"
    cascade: bool = False
    undefended_grad: str = "unrolled"
    defended_grad: str = "unrolled"
    model_form: str = "served"
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
        for name in (
            "n",
            "batch_size",
            "steps",
            "pgd_restarts",
            "adaptive_ka",
            "square_queries",
            "apgd_iters",
            "apgd_targets",
            "bpda_targets",
            "adaptive_restarts",
            "adaptive_pgd_restarts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pgd_steps", "sanity_images", "adaptive_pgd_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("eps", "pgd_step_size", "sanity_eps"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        for option in ("undefended_grad", "defended_grad"):
            if getattr(self, option) not in GRAD_PATHS:
                raise ValueError(
                    f"{option} must be one of {GRAD_PATHS}, got {getattr(self, option)!r}"
                )
        if self.model_form not in MODEL_FORMS:
            raise ValueError(f"model_form must be one of {MODEL_FORMS}, got {self.model_form!r}")
        intermediate_subset(self.grid, self.steps)  # raises naming the subsets
        if self.aa_apgd_iters is not None and self.aa_apgd_iters < 1:
            raise ValueError(f"aa_apgd_iters must be >= 1, got {self.aa_apgd_iters}")
        if self.attacks:
            build_suite(self)  # raises naming the suite's attacks
        if self.defense_params.state is not None and self.defense_params.state > self.steps:
            raise DefenseParamError(
                f"defense state {self.defense_params.state} exceeds steps {self.steps}", "state"
            )

    @property
    def defense_params(self) -> DefenseParams:
        return get_preset(self.defense) if isinstance(self.defense, str) else self.defense

    @property
    def served_copy(self) -> bool:
        """Whether the audit attacks the service's eval-only copy (``model_form`` served)."""
        return self.model_form == "served"

    @property
    def defense_name(self) -> str:
        return self.defense if isinstance(self.defense, str) else "custom"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["defense"] = self.defense_name
        d["defense_params"] = self.defense_params.to_dict()
        d["aa_attacks"] = list(self.aa_attacks)
        d["attacks"] = list(self.attacks)
        # at their defaults, the identity (fingerprint) of audits begun before these options
        if not self.cascade:
            del d["cascade"]
        for option in ("undefended_grad", "defended_grad"):
            if d[option] == "unrolled":
                del d[option]
        if d["model_form"] == "training":
            del d["model_form"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditConfig:
        d = dict(d)
        d.setdefault("model_form", "training")  # written before the option: the trained module
        params = d.pop("defense_params", None)
        if d.get("defense") == "custom" and params is not None:
            d["defense"] = DefenseParams.from_dict(params)
        d["aa_attacks"] = tuple(d.get("aa_attacks", ()))
        d["attacks"] = tuple(d.get("attacks", ()))
        return cls(**d)


def build_suite(cfg: AuditConfig) -> list[AttackPlan]:
    """The attacks of ``cfg.suite`` in a fixed order, only ``cfg.attacks`` when it names some.

    Raises ValueError naming the suite's attacks when ``cfg.attacks`` names another.
    """
    plans = full_suite(cfg)
    if not cfg.attacks:
        return plans
    names = [p.name for p in plans]
    unknown = [a for a in cfg.attacks if a not in names]
    if unknown:
        raise ValueError(
            f"attacks {unknown} are not in this {cfg.suite} suite; its attacks: {', '.join(names)}"
        )
    return [p for p in plans if p.name in cfg.attacks]


def full_suite(cfg: AuditConfig) -> list[AttackPlan]:
    """All the attacks of ``cfg.suite`` in a fixed order (the order seeds each attack)."""
    n = cfg.steps
    active = cfg.defense_params.active
    it, tg = cfg.apgd_iters, cfg.apgd_targets
    ug: GradSource = "solver" if cfg.undefended_grad == "solver" else "undefended"
    if cfg.suite == "quick":
        plans = [
            AttackPlan("pgd-undefended", "pgd", None, ug, cfg.pgd_steps, cfg.pgd_restarts),
            AttackPlan("apgd-ce", "apgd-ce", None, ug, it, 1),
            AttackPlan("apgd-t", "apgd-t", None, ug, it, 1, tg),
        ]
        if active:
            plans.append(AttackPlan("bpda-apgd-t", "apgd-t", None, "bpda", it, 1, cfg.bpda_targets))
        return plans
    if cfg.suite == "paper":
        plans = [
            AttackPlan(f"pgd-{s.name}", "pgd", s, "eq11", cfg.pgd_steps, cfg.pgd_restarts)
            for s in intermediate_subset(cfg.grid, n)
        ]
        if cfg.autoattack:
            plans.append(AttackPlan("autoattack", "autoattack", None, "eq11"))
        return plans
    r = cfg.adaptive_restarts
    plans = [
        AttackPlan("apgd-ce", "apgd-ce", None, ug, it, r),
        AttackPlan("apgd-t", "apgd-t", None, ug, it, 1, tg),
    ]
    if active:
        for grad in ("bpda", "exact"):
            plans += [
                AttackPlan(f"{grad}-apgd-ce", "apgd-ce", None, grad, it, r),  # type: ignore[arg-type]
                AttackPlan(f"{grad}-apgd-t", "apgd-t", None, grad, it, 1, tg),  # type: ignore[arg-type]
            ]
        if cfg.adaptive_pgd_steps:
            plans += [
                AttackPlan(
                    f"{grad}-pgd",
                    "pgd",
                    None,
                    grad,  # type: ignore[arg-type]
                    cfg.adaptive_pgd_steps,
                    cfg.adaptive_pgd_restarts,
                )
                for grad in ("bpda", "exact")
            ]
    plans.append(AttackPlan("square-defended", "square", None, "none", cfg.square_queries))
    if cfg.transfer_from:
        spec = IntermediateSpec(n, cfg.adaptive_ka, 0.5)
        plans.append(
            AttackPlan(
                f"transfer-{cfg.transfer_from}",
                "pgd",
                spec,
                "source-model",
                cfg.pgd_steps,
                cfg.pgd_restarts,
            )
        )
    return plans
