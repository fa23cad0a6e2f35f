"""Request and response bodies of the admin API.

Pydantic checks the shapes; the values of ``defense`` and ``options`` are checked once, when the
route builds the audit's configuration (:func:`service.admin.audits.audit_config`), which names
the field in its 422.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deqguard.defense import Preset
from service.admin.audits import OPTION_FIELDS, SUITES

__all__ = ["AuditRequest", "ModelLoadRequest"]

SuiteName = Literal[tuple(SUITES)]  # type: ignore[valid-type]


class AuditRequest(BaseModel):
    """An audit: which model, which defense, which attacks, on how many test images."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None, description="Store entry `name` or `name@version`; default: served model"
    )
    defense: str | dict[str, Any] = Field(
        default="paper",
        description=f"Preset name ({', '.join(Preset)}) or DefenseParams fields, "
        "optionally with `preset` as the base",
    )
    suite: SuiteName = Field(default="quick", description="Attack suite: " + ", ".join(SUITES))
    n_samples: int = Field(default=1000, ge=1, le=10_000, description="First n test images")
    batch_size: int = Field(default=32, ge=1, le=1024, description="Images per resumable batch")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the attacks")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Attack budget overrides (deqguard.audit.AuditConfig fields): "
        + ", ".join(OPTION_FIELDS)
        + "; non-standard budgets are listed in the report's notes",
    )

    model_config["json_schema_extra"] = {
        "examples": [
            {"model": "micro-trades-ri", "defense": "paper", "suite": "quick",
             "n_samples": 1000, "batch_size": 32, "seed": 0}
        ]
    }  # fmt: skip


class ModelLoadRequest(BaseModel):
    """Optional body of a model load."""

    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(default=None, description="Require this manifest version")
