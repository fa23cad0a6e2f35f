"""Service settings, read from ``DEQGUARD_*`` environment variables and validated at start.

One declared class so that a typo or an impossible value stops the server with a clear message
before it binds a port, instead of surfacing later as a confusing runtime error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from deqguard.store import default_store_root
from service.schemas import PresetName

__all__ = ["ServiceSettings", "format_settings_error", "load_settings"]


class ServiceSettings(BaseSettings):
    """Everything the service can be told at start (env prefix ``DEQGUARD_``)."""

    model_config = SettingsConfigDict(env_prefix="DEQGUARD_", extra="ignore", frozen=True)

    model: str = "micro-trades-ri"
    """Default model reference (``name`` or ``name@version``), loaded and warmed up at start."""
    model_store: Path = Field(default_factory=default_store_root)
    """Root of the model store (``DEQGUARD_MODEL_STORE``; default ``model_store/``)."""
    data_dir: Path | None = None
    """CIFAR-10 root (read by deqguard.data; the service itself only needs it for benchmarks)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    torch_threads: int = Field(default=1, ge=0, le=256)
    """CPU threads for torch in each device worker (0: torch's default, one per core, divided
    among the workers). Default 1, by measurement (``benchmarks/bench_threads.py``,
    docs/BENCHMARKS.md): on a 2-core machine a second thread made single ``paper`` images only
    13% faster and batches of 32 1.7x faster while the machine was idle, but with one other busy
    process the two-thread team's images took 3.6x (p50) to 9x (p90) longer than one thread's,
    because each parallel region waits for the thread whose core the other process holds; one
    thread slowed by at most 1.4x (p50). A machine the service has to itself: set 0."""
    cpu_retain_memory: bool = True
    """Keep freed memory in the process instead of returning it to the OS (glibc only; see
    ``deqguard.cpu_memory``): a forward's tensors then reuse pages instead of page-faulting
    fresh ones (10-20% of the CPU time of a defended forward on ``tiny``). The resident size
    stays at its peak. Off: ``DEQGUARD_CPU_RETAIN_MEMORY=false``."""
    device_workers: int = Field(default=1, ge=1, le=64)
    """Device threads that compute batches at the same time, on CPU only (CUDA always uses one).
    A throughput setting for saturated CPUs: on a 2-core CPU, two one-thread workers computed
    16-23% more images per second than one two-thread worker, but each batch runs on one core:
    with 8 clients (one batch at a time) the service served 20-30% fewer images per second, with
    one client about the same (docs/BENCHMARKS.md, service notes)."""

    max_batch_size: int = Field(default=32, ge=1, le=4096)
    """Most images one device batch holds."""
    max_batch_delay_ms: float = Field(default=5.0, ge=0.0, le=10_000.0)
    """How long the first queued request waits for others to join its batch."""
    batch_fill_fraction: float = Field(default=0.2, ge=0.0, le=1.0)
    """When the device has just finished a batch and requests arrive often enough to expect
    company, the next batch may wait up to this fraction of the last batch's compute time
    (capped at 0.25 s) for more requests, so that the clients the last batch answered join it
    instead of the load splitting into small and half batches (0 turns it off). Sparse traffic
    never waits: the arrival rate must predict at least one request within that time."""
    batch_fill_gap_ms: float = Field(default=4.0, ge=0.0, le=1_000.0)
    """A filling batch stops waiting once requests that arrived after the device freed up
    pause for this long: the answered clients come back in a burst."""
    queue_size: int = Field(default=512, ge=1, le=1_000_000)
    """Most images waiting for the device; more gets 429."""
    default_deadline_ms: float = Field(default=30_000.0, gt=0.0, le=3_600_000.0)
    """Deadline of a request that names none; passed while queued gives 504."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    """Largest request body; more gets 413."""
    max_image_pixels: int = Field(default=4096 * 4096, ge=1024)
    """Largest decoded image (width x height); more gets 413 (Pillow's bomb guard is set to it)."""
    max_images_per_request: int = Field(default=64, ge=1, le=4096)
    """Most images in one request; more gets 413."""

    default_preset: PresetName = "paper"
    """Defense preset of a request that names none."""
    max_defense_steps: int = Field(default=50, ge=0, le=10_000)
    """Upper bound on a request's ``R`` (gradient steps per defense round), to bound its cost."""
    max_request_grad_steps: int = Field(default=4096, ge=0, le=100_000_000)
    """Most input-gradient steps one request may ask for (images x gradient steps per image;
    64 images at ``paper`` with N = 8 are 2,560), so one request cannot hold the device for
    longer than everyone's deadline behind it; more gets 413 naming the limit. 0: no bound."""
    solver_steps: int | None = Field(default=None, ge=1, le=256)
    """Solver steps N per forward (default: the model's manifest, else 8)."""

    max_loaded_models: int = Field(default=4, ge=1, le=64)
    """Models kept in memory at once (the default model is never evicted)."""
    warmup_batch_sizes: tuple[int, ...] = (1,)
    """Batch sizes run once at start before /readyz turns ready."""

    device_hold_file: Path | None = None
    """While this file exists, no predict batch or audit segment starts on the device (the one
    that is computing finishes): for maintenance drills and for tests, which decide exactly when
    compute may proceed. Unset (the default): never held."""

    drain_grace_s: float = Field(default=30.0, ge=0.0, le=3600.0)
    """After SIGTERM: how long in-flight work may take to finish."""
    drain_delay_s: float = Field(default=0.0, ge=0.0, le=600.0)
    """After SIGTERM: keep answering (503 on /readyz and new work) at least this long."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=8001, ge=0, le=65535)
    """Port of the KServe v2 gRPC endpoint (``tritonclient.grpc``), served beside HTTP on the
    same host by the same process, batcher, limits and errors; 0 turns it off."""
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        v = v.strip().lower()
        ok = v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        from deqguard.store import StoreError, parse_ref

        try:
            parse_ref(v)
        except StoreError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _check_ports(self) -> ServiceSettings:
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(
                f"grpc_port: {self.grpc_port} is also the HTTP port; choose another (0: no gRPC)"
            )
        return self

    @model_validator(mode="after")
    def _check_warmup(self) -> ServiceSettings:
        for b in self.warmup_batch_sizes:
            if not 1 <= b <= self.max_batch_size:
                raise ValueError(
                    f"warmup_batch_sizes: {b} is outside 1..max_batch_size ({self.max_batch_size})"
                )
        return self


def format_settings_error(exc: ValidationError) -> str:
    """One line per bad variable, named as the operator wrote it (DEQGUARD_...)."""
    lines = ["invalid service settings:"]
    for err in exc.errors():
        loc = "_".join(str(p) for p in err["loc"]) if err["loc"] else "(settings)"
        name = f"DEQGUARD_{loc.upper()}" if err["loc"] else loc
        lines.append(f"  {name}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_settings(**overrides: object) -> ServiceSettings:
    """Settings from the environment (overrides win); raises SystemExit with a clear message."""
    try:
        return ServiceSettings(**overrides)
    except ValidationError as exc:
        raise SystemExit(format_settings_error(exc)) from None
