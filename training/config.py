"""Training configuration: one validated dataclass, loadable from JSON/TOML and CLI flags.

Defaults follow the paper and the authors' code (docs/TRAINING.md lists each one and every
departure the shipped CPU recipes make). Validation happens once, here, so the loop trusts it.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from deqguard.configs import DEFAULT_SOLVER_STEPS

__all__ = ["Method", "RandomIntermediate", "TrainConfig", "load_config_file"]

Method = Literal["clean", "pgd-at", "trades"]
RandomIntermediate = Literal["off", "batch", "sample"]
Device = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (and so is written into the manifest).

    Schedule: ``pretrain_steps`` optimizer steps of clean cross-entropy through the weight-tied
    unrolled network (N applications of f from z = 0), then ``method`` until ``total_steps``
    (or ``epochs``) is reached. The cosine learning-rate schedule spans all steps.
    """

    name: str = "run"
    model: str = "micro"
    dropout: float | None = None  # None: the model config's value
    method: Method = "trades"
    random_intermediate: RandomIntermediate = "off"
    # solver (forward) and the phantom gradient
    solver: Literal["broyden", "anderson", "picard"] = "broyden"
    solver_steps: int = DEFAULT_SOLVER_STEPS
    phantom_k: int = 5
    phantom_lambda: float = 0.5
    # training attack (builds the adversarial examples; runs in eval mode)
    eps: float = 8 / 255
    attack_steps: int = 10
    attack_step_size: float = 2 / 255
    attack_solver_steps: int | None = None  # None: solver_steps
    attack_phantom_k: int | None = None  # None: phantom_k
    trades_beta: float = 6.0
    # Jacobian regulariser (Hutchinson estimate of ||J_f||_F^2 per element)
    jac_weight: float = 0.4
    jac_prob: float = 0.02
    jac_stop_epoch: float = 90.0
    # optimisation
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 0.0
    batch_size: int = 96  # per process
    epochs: float | None = 210.0
    total_steps: int | None = None  # overrides epochs when set
    pretrain_steps: int = 16000
    time_budget_min: float | None = None  # stop (and finalise) after this much training time
    # "steps": the cosine and the pretraining phase run over steps; "time": over the fraction of
    # time_budget_min spent (for shared machines whose speed varies; not bit-reproducible)
    schedule: Literal["steps", "time"] = "steps"
    pretrain_fraction: float = 0.3  # "time" schedule: share of the budget spent pretraining
    seed: int = 0
    device: Device = "auto"
    bf16: bool = True  # autocast on CUDA only
    threads: int | None = None  # torch.set_num_threads on CPU
    # data and model selection
    data_root: str | None = None
    n_val: int = 5000
    val_samples: int = 500  # first n of the validation split, for PGD-10 selection
    val_every: int = 1000  # steps; 0 disables periodic validation (the final one still runs)
    val_pgd_steps: int = 10
    # bookkeeping
    out_dir: str = "runs"
    checkpoint_every_min: float = 5.0
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.method in ("clean", "pgd-at", "trades"), f"unknown method {self.method!r}"),
            (
                self.random_intermediate in ("off", "batch", "sample"),
                f"random_intermediate must be off|batch|sample, got {self.random_intermediate!r}",
            ),
            (self.device in ("auto", "cuda", "cpu"), f"unknown device {self.device!r}"),
            (self.solver_steps >= 1, "solver_steps must be >= 1"),
            (self.phantom_k >= 0, "phantom_k must be >= 0"),
            (0.0 < self.phantom_lambda <= 1.0, "phantom_lambda must lie in (0, 1]"),
            (0.0 <= self.eps <= 1.0, "eps must lie in [0, 1]"),
            (self.attack_steps >= 1, "attack_steps must be >= 1"),
            (self.attack_step_size > 0, "attack_step_size must be > 0"),
            (
                self.attack_solver_steps is None or self.attack_solver_steps >= 1,
                "attack_solver_steps must be >= 1",
            ),
            (
                self.attack_phantom_k is None or self.attack_phantom_k >= 0,
                "attack_phantom_k must be >= 0",
            ),
            (self.trades_beta >= 0, "trades_beta must be >= 0"),
            (self.jac_weight >= 0 and 0 <= self.jac_prob <= 1, "bad Jacobian penalty settings"),
            (self.lr > 0 and 0 <= self.lr_min <= self.lr, "need 0 <= lr_min <= lr, lr > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs is None or self.epochs > 0, "epochs must be > 0"),
            (self.total_steps is None or self.total_steps >= 1, "total_steps must be >= 1"),
            (
                self.epochs is not None or self.total_steps is not None,
                "set epochs or total_steps",
            ),
            (self.pretrain_steps >= 0, "pretrain_steps must be >= 0"),
            (
                self.time_budget_min is None or self.time_budget_min > 0,
                "time_budget_min must be > 0",
            ),
            (self.schedule in ("steps", "time"), f"unknown schedule {self.schedule!r}"),
            (
                self.schedule == "steps" or self.time_budget_min is not None,
                "schedule 'time' needs time_budget_min",
            ),
            (0.0 <= self.pretrain_fraction <= 1.0, "pretrain_fraction must lie in [0, 1]"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (1 <= self.n_val < 50000, "n_val must lie in 1..49999"),
            (0 <= self.val_samples <= self.n_val, "val_samples must lie in 0..n_val"),
            (self.val_every >= 0 and self.val_pgd_steps >= 0, "bad validation settings"),
            (self.checkpoint_every_min > 0, "checkpoint_every_min must be > 0"),
            (self.log_every >= 1, "log_every must be >= 1"),
            (self.dropout is None or 0 <= self.dropout < 1, "dropout must lie in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are an error (typos must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**{k.replace("-", "_"): v for k, v in d.items()})


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML file of options (keys as in :class:`TrainConfig`)."""
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".toml":
        data = tomllib.loads(text)
    elif p.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file must end in .json or .toml, got '{p}'")
    if not isinstance(data, dict):
        raise ValueError(f"config file '{p}' must hold a table/object of options")
    return {k.replace("-", "_"): v for k, v in data.items()}
