"""Admin settings (``DEQGUARD_*`` environment variables), kept apart from the service's own.

A separate class so that the admin API can be added to, or left out of, a deployment without
touching the inference settings; validated at start like them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["AdminSettings", "default_state_dir"]


def default_state_dir() -> Path:
    """``var/`` at the repository root: jobs, reports and plots outlive the process there."""
    return Path(__file__).resolve().parents[2] / "var"


class AdminSettings(BaseSettings):
    """The admin API and its audit jobs (env prefix ``DEQGUARD_``)."""

    model_config = SettingsConfigDict(env_prefix="DEQGUARD_", extra="ignore", frozen=True)

    admin_token: SecretStr | None = None
    """Bearer token for ``/admin``; unset or empty switches the admin API off (404)."""
    state_dir: Path = Field(default_factory=default_state_dir)
    """Where the job database (by default), reports and plots live (``DEQGUARD_STATE_DIR``)."""
    database_url: str | None = None
    """``sqlite:///relative.db`` or ``sqlite:////abs/path.db``; default ``<state_dir>/jobs.db``."""
    max_concurrent_audits: int = Field(default=1, ge=1, le=64)
    """Audits that run at once; more wait queued (each one competes with online traffic)."""
    audit_yield_max_s: float = Field(default=5.0, ge=0.0, le=3600.0)
    """Longest an audit waits for the predict queue to drain before it computes anyway, so
    audits still progress under sustained load."""
    audit_torch_threads: int = Field(default=1, ge=1, le=256)
    """torch CPU threads of each audit thread. Keep 1 on CPU: a second multi-threaded OpenMP
    team in the process, even an idle one, makes libgomp throttle its spin-waiting for every team
    (more OpenMP threads than cores), which measured 3-4x slower predict batches for as long as
    the audit thread lives (docs/BENCHMARKS.md, audit-latency)."""

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is None or v == "":
            return None
        if not v.startswith("sqlite:///"):
            raise ValueError(f"only sqlite:///path URLs are supported, got {v!r}")
        if len(v) == len("sqlite:///"):
            raise ValueError("sqlite URL has no path")
        return v

    @property
    def token(self) -> str | None:
        """The token, or None when the admin API is off."""
        if self.admin_token is None:
            return None
        value = self.admin_token.get_secret_value()
        return value or None

    @property
    def database_path(self) -> Path:
        """The SQLite file the job store opens."""
        if self.database_url is None:
            return self.state_dir / "jobs.db"
        return Path(self.database_url[len("sqlite:///") :])
