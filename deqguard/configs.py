"""Model and solver configurations as data.

Variants are values, not subclasses: a new model size is one new entry in ``MODEL_CONFIGS``.
Everything is validated once here, at construction, so the modules can trust their inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

__all__ = [
    "DEFAULT_SOLVER_STEPS",
    "MODEL_CONFIGS",
    "ModelConfig",
    "SolverConfig",
    "get_model_config",
    "list_model_configs",
    "solver_steps",
]

DEFAULT_SOLVER_STEPS = 8
"""N, the solver steps of a forward when neither the caller nor the model's manifest says."""


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of an MDEQ classifier (multiscale deep equilibrium model).

    Attributes:
        name: registry name of the configuration.
        branch_channels: channels of each resolution branch, finest first; branch i runs at
            ``stem resolution / 2**i``.
        head_channels: bottleneck widths of the classification head, one per branch
            (each bottleneck outputs ``4 * head_channels[i]`` channels).
        final_channels: width of the 1x1 conv before global pooling.
        block_expansion: the branch block widens C -> expansion * C inside its residual path.
        stem_stride: 1 keeps 32x32 inside f; 2 runs f at 16x16 (4x cheaper, CPU-trainable).
        num_groups: GroupNorm groups inside f (post-fuse uses half of it, without affine).
        dropout: variational dropout rate in the branch blocks (one mask per forward).
        num_classes: classifier outputs.
        image_size: input height and width.
    """

    name: str
    branch_channels: tuple[int, ...]
    head_channels: tuple[int, ...]
    final_channels: int
    block_expansion: int = 5
    stem_stride: int = 1
    num_groups: int = 8
    dropout: float = 0.0
    num_classes: int = 10
    image_size: int = 32

    def __post_init__(self) -> None:
        nb = len(self.branch_channels)
        if nb < 1:
            raise ValueError("branch_channels must name at least one branch")
        if len(self.head_channels) != nb:
            raise ValueError(
                f"head_channels has {len(self.head_channels)} entries, expected {nb} (one per branch)"
            )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {self.stem_stride}")
        for c in self.branch_channels:
            if c % self.num_groups or c % max(self.num_groups // 2, 1):
                raise ValueError(
                    f"branch width {c} is not divisible by num_groups={self.num_groups}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        res = self.image_size // self.stem_stride
        if res % (2 ** (nb - 1)):
            raise ValueError(f"{nb} branches need a resolution divisible by {2 ** (nb - 1)}")

    @property
    def num_branches(self) -> int:
        return len(self.branch_channels)

    @property
    def branch_resolutions(self) -> tuple[int, ...]:
        """Height (= width) of each branch's feature map."""
        res = self.image_size // self.stem_stride
        return tuple(res // 2**i for i in range(self.num_branches))

    @property
    def state_size(self) -> int:
        """Number of elements of the flattened equilibrium state of one sample."""
        return sum(
            c * r * r for c, r in zip(self.branch_channels, self.branch_resolutions, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["branch_channels"] = list(self.branch_channels)
        d["head_channels"] = list(self.head_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["branch_channels"] = tuple(d["branch_channels"])
        d["head_channels"] = tuple(d["head_channels"])
        return cls(**d)

    def with_overrides(self, **kwargs: Any) -> ModelConfig:
        return replace(self, **kwargs)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # CPU-trainable: f runs at 16x16 with a narrow block.
    "micro": ModelConfig(
        name="micro",
        branch_channels=(32, 64),
        head_channels=(16, 32),
        final_channels=384,
        block_expansion=2,
        stem_stride=2,
    ),
    # MDEQ-Tiny (Bai et al. 2020): 2 branches of 24 channels.
    "tiny": ModelConfig(
        name="tiny",
        branch_channels=(24, 24),
        head_channels=(8, 16),
        final_channels=200,
    ),
    # The paper's DEQ-Large (about ResNet-18's parameter count).
    "large": ModelConfig(
        name="large",
        branch_channels=(32, 64, 128, 256),
        head_channels=(14, 28, 56, 112),
        final_channels=1680,
    ),
    # DEQ-XL of Yang et al. (NeurIPS 2022).
    "xl": ModelConfig(
        name="xl",
        branch_channels=(72, 144, 288, 576),
        head_channels=(20, 40, 80, 160),
        final_channels=1800,
    ),
}


def list_model_configs() -> list[str]:
    return sorted(MODEL_CONFIGS)


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Look up a named configuration, optionally overriding fields (validated again)."""
    try:
        cfg = MODEL_CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown model config {name!r}; choose one of {list_model_configs()}"
        ) from None
    return cfg.with_overrides(**overrides) if overrides else cfg


SolverName = Literal["broyden", "anderson", "picard"]


@dataclass(frozen=True)
class SolverConfig:
    """How the forward fixed point is solved.

    Attributes:
        name: ``broyden`` (the paper's), ``anderson`` or ``picard`` (plain/damped iteration).
        max_steps: N, the number of solver steps (each costs one f-evaluation, plus one to start).
        tol: per-sample relative residual ||f(z) - z|| / ||f(z)|| below which a sample is frozen.
        memory: Broyden secant pairs kept (circular), Anderson history size.
        damping: Picard step z <- (1 - damping) z + damping f(z); Anderson mixing beta.
        anderson_lam: Tikhonov regulariser of Anderson's least squares.
        divergence_factor: a sample whose residual exceeds this multiple of its first residual
            is frozen at its best iterate and flagged.
        freeze_converged: stop updating samples under ``tol`` (they keep their state).
        skip_fraction: evaluate f only on unconverged samples when they are at most this
            fraction of the batch (subset gathers cost memory traffic; skipping pays when few
            samples remain).
    """

    name: SolverName = "broyden"
    max_steps: int = DEFAULT_SOLVER_STEPS
    tol: float = 1e-3
    memory: int = 8
    damping: float = 1.0
    anderson_lam: float = 1e-4
    divergence_factor: float = 1e3
    freeze_converged: bool = True
    skip_fraction: float = 0.75
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in ("broyden", "anderson", "picard"):
            raise ValueError(f"unknown solver {self.name!r}; choose broyden, anderson or picard")
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.memory < 1:
            raise ValueError(f"memory must be >= 1, got {self.memory}")
        if not 0.0 < self.damping <= 1.0:
            raise ValueError(f"damping must lie in (0, 1], got {self.damping}")


def solver_steps(solver: SolverConfig, override: int | None = None) -> int:
    """The steps N a forward runs: ``override``, else the solver's ``max_steps``, else the
    default (a manifest may store 0: "unset")."""
    return override or solver.max_steps or DEFAULT_SOLVER_STEPS
