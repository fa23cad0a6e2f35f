"""The ``/admin`` API: audit jobs and model management, behind a bearer token.

Built per app by :func:`build_admin_router`, which returns None when no token is configured,
so that the admin API does not exist at all (404) unless an operator asked for it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from deqguard.store import (
    StoreError,
    StoreIntegrityError,
    StoreNotFoundError,
    load_entry,
    parse_ref,
    read_manifest,
    validate_name,
)
from service.admin.auth import require_token
from service.admin.engine import audit_config
from service.admin.jobs import Job, JobStore
from service.admin.metrics import AdminMetrics
from service.admin.runner import AuditRunner, progress_of
from service.admin.schemas import AuditRequest, ModelLoadRequest
from service.admin.settings import AdminSettings
from service.context import ServiceContext
from service.errors import InvalidParameter, ModelNotFound, ServiceError

__all__ = ["AdminState", "build_admin_router"]

log = logging.getLogger("deqguard.admin")

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_PLOT = re.compile(r"^[a-z0-9_]{1,64}$")
_IDEMPOTENCY = re.compile(r"^[\x21-\x7e]{1,200}$")


class Conflict(ServiceError):
    status_code = 409
    reason = "conflict"


class NotFound(ServiceError):
    status_code = 404
    reason = "not_found"


class CheckpointRefused(ServiceError):
    """The store entry exists but fails verification: it is not served."""

    status_code = 422
    reason = "checkpoint_refused"


class AdminState:
    """Per-app admin state: job store, runner, metrics, the model-load lock."""

    def __init__(self, settings: AdminSettings, ctx: ServiceContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.store = JobStore(settings.database_path)
        self.metrics = AdminMetrics(ctx.metrics.registry, self.store.counts)
        self.runner = AuditRunner(self.store, settings, ctx, self.metrics)
        self.load_lock = asyncio.Lock()


def _state(request: Request) -> AdminState:
    return request.app.state.admin


def _job_or_404(admin: AdminState, job_id: str) -> Job:
    job = admin.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise NotFound(f"no audit job {job_id!r}", field="id")
    return job


def _job_view(admin: AdminState, job: Job) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "spec": job.spec,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "progress": progress_of(job, admin.runner.live(job.id)),
        "resumes": job.resumes,
        "cancel_requested": job.cancel_requested,
        "links": {"self": f"/admin/audits/{job.id}"},
    }
    if job.error:
        out["error"] = job.error
    if job.state == "succeeded":
        out["links"]["report"] = f"/admin/audits/{job.id}/report"
        names = (job.report or {}).get("plots", [])
        out["links"]["plots"] = [f"/admin/audits/{job.id}/plots/{n}.png" for n in names]
    return out


def build_admin_router(settings: AdminSettings | None = None) -> APIRouter | None:
    """The admin router, or None when ``DEQGUARD_ADMIN_TOKEN`` is unset (admin API off)."""
    settings = settings or AdminSettings()
    token = settings.token
    if token is None:
        return None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: ServiceContext = app.state.ctx
        admin = AdminState(settings, ctx)
        app.state.admin = admin
        await admin.runner.start()
        try:
            yield
        finally:
            await admin.runner.stop()
            admin.store.close()

    router = APIRouter(
        prefix="/admin",
        tags=["admin"],
        dependencies=[Depends(require_token(token))],
        lifespan=lifespan,
        responses={
            401: {"description": "missing or malformed bearer token"},
            403: {"description": "wrong token"},
        },
    )

    # ------------------------------------------------------------------ audits
    @router.post("/audits", status_code=202, summary="Start an audit job")
    async def create_audit(
        request: Request,
        body: AuditRequest,
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
    ) -> JSONResponse:
        admin = _state(request)
        if idempotency_key is not None and not _IDEMPOTENCY.match(idempotency_key):
            raise InvalidParameter(
                "Idempotency-Key: 1-200 printable ASCII characters", field="Idempotency-Key"
            )
        ref = body.model or admin.ctx.pool.default_ref
        try:
            manifest = read_manifest(admin.ctx.settings.model_store, ref)
        except StoreNotFoundError as exc:
            raise ModelNotFound(str(exc), field="model") from None
        except StoreError as exc:
            raise InvalidParameter(str(exc), field="model") from None
        spec = body.model_dump()
        spec["model"] = manifest.ref  # pin the version audited
        steps = admin.ctx.settings.solver_steps or manifest.solver.max_steps or 8
        try:
            audit_config(spec, steps)
        except (ValueError, TypeError) as exc:
            msg = str(exc)
            first = msg.split(" ", 1)[0]
            field = first if first in spec else "options" if spec["options"] else "defense"
            raise InvalidParameter(msg, field=field) from None
        job, created = admin.store.create(spec, body.n_samples, idempotency_key)
        if created:
            admin.runner.schedule(job.id)
        elif job.spec != spec:
            raise Conflict(
                "Idempotency-Key was already used for a different audit request",
                field="Idempotency-Key",
            )
        return JSONResponse(
            _job_view(admin, job),
            status_code=202 if created else 200,
            headers={"Location": f"/admin/audits/{job.id}"},
        )

    @router.get("/audits", summary="List audit jobs, newest first")
    async def list_audits(
        request: Request,
        state: str | None = Query(
            default=None, pattern="^(queued|running|succeeded|failed|cancelled)$"
        ),
        limit: int = Query(default=100, ge=1, le=1000),
    ) -> dict[str, Any]:
        admin = _state(request)
        jobs = admin.store.list(state, limit)
        return {"jobs": [_job_view(admin, j) for j in jobs], "counts": admin.store.counts()}

    @router.get("/audits/{job_id}", summary="State and progress of an audit job")
    async def get_audit(request: Request, job_id: str) -> dict[str, Any]:
        admin = _state(request)
        return _job_view(admin, _job_or_404(admin, job_id))

    @router.get("/audits/{job_id}/report", summary="The JSON report of a finished audit")
    async def get_report(request: Request, job_id: str) -> dict[str, Any]:
        admin = _state(request)
        job = _job_or_404(admin, job_id)
        if job.state != "succeeded" or job.report is None:
            raise Conflict(f"audit {job_id} is {job.state}: no report yet", field="id")
        return job.report

    @router.get(
        "/audits/{job_id}/plots/{name}.png",
        summary="A plot of a finished audit (PNG)",
        response_class=FileResponse,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def get_plot(request: Request, job_id: str, name: str) -> FileResponse:
        admin = _state(request)
        job = _job_or_404(admin, job_id)
        names = (job.report or {}).get("plots", [])
        if not _PLOT.match(name) or name not in names:
            raise NotFound(f"audit {job_id} has no plot {name!r} (has: {names})", field="name")
        path = admin.runner.plots_dir(job_id) / f"{name}.png"
        if not path.is_file():
            raise NotFound(f"plot file of {name!r} is missing on this server", field="name")
        return FileResponse(path, media_type="image/png")

    @router.delete("/audits/{job_id}", status_code=202, summary="Cancel an audit job")
    async def cancel_audit(request: Request, job_id: str) -> JSONResponse:
        admin = _state(request)
        job = _job_or_404(admin, job_id)
        if job.state not in ("queued", "running"):
            raise Conflict(f"audit {job_id} is already {job.state}", field="id")
        job = admin.runner.cancel(job_id) or job
        return JSONResponse(_job_view(admin, job), status_code=202)

    # ------------------------------------------------------------------ models
    @router.get("/models", summary="Models loaded in the serving pool")
    async def loaded_models(request: Request) -> dict[str, Any]:
        ctx = _state(request).ctx
        return {
            "default": ctx.pool.default_ref,
            "loaded": [
                {"name": s.name, "version": s.version, "sha256": s.sha256, "loaded_at": s.loaded_at}
                for s in ctx.pool.loaded()
            ],
        }

    @router.post(
        "/models/{name}/load",
        summary="Verify, load, warm up and atomically swap in a model",
        responses={422: {"description": "bad name, or the checkpoint fails verification"}},
    )
    async def load_model(
        request: Request, name: str, body: ModelLoadRequest | None = Body(default=None)
    ) -> dict[str, Any]:
        admin = _state(request)
        ctx = admin.ctx
        try:
            validate_name(name)
            ref = name if body is None or body.version is None else f"{name}@{body.version}"
            parse_ref(ref)
        except StoreError as exc:
            admin.metrics.model_loads.labels(result="refused").inc()
            raise InvalidParameter(str(exc), field="name") from None
        async with admin.load_lock:
            loop = asyncio.get_running_loop()
            try:
                served, load_s, warm_s = await loop.run_in_executor(None, _load_and_warm, ctx, ref)
            except StoreNotFoundError as exc:
                admin.metrics.model_loads.labels(result="not_found").inc()
                raise ModelNotFound(str(exc), field="name") from None
            except (StoreIntegrityError, StoreError) as exc:
                admin.metrics.model_loads.labels(result="refused").inc()
                log.warning("refused to load %s: %s", ref, exc)
                raise CheckpointRefused(
                    f"refused: {exc}; the current model keeps serving", field="name"
                ) from None
            except Exception as exc:
                admin.metrics.model_loads.labels(result="failed").inc()
                raise CheckpointRefused(
                    f"warm-up of {ref} failed ({type(exc).__name__}: {exc}); "
                    "the current model keeps serving",
                    field="name",
                ) from None
            old = _swap(ctx, served)
            ctx._update_model_info()
            previous = (
                None if old is None else {"version": old.version, "sha256": old.sha256}
            )  # fmt: skip
            del old
            gc.collect()
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            admin.metrics.model_loads.labels(result="loaded").inc()
            log.info("loaded %s@%s (sha256 %s)", served.name, served.version, served.sha256[:12])
            return {
                "name": served.name,
                "version": served.version,
                "sha256": served.sha256,
                "previous": previous,
                "load_s": load_s,
                "warmup_s": warm_s,
            }

    return router


def _load_and_warm(ctx: ServiceContext, ref: str) -> tuple[Any, float, float]:
    """Off the device thread: verify and load the entry, then run one warm-up batch with it,
    so that predict traffic keeps flowing on the current model meanwhile."""
    from deqguard.defense import get_preset
    from service.runtime import ServedModel, _steps_for, run_batch

    t0 = time.perf_counter()
    entry = load_entry(ctx.settings.model_store, ref, device=ctx.device, inference=True)
    solver, steps = _steps_for(entry.manifest, ctx.settings.solver_steps)
    served = ServedModel(entry, solver, steps, time.time())
    t1 = time.perf_counter()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(False):
        run_batch(served, x, [get_preset("paper")], chunk=1)
    return served, t1 - t0, time.perf_counter() - t1


def _swap(ctx: ServiceContext, served: Any) -> Any:
    """Replace the pool's entry for this name in one step (under the pool's lock): batches
    already running keep their reference to the old model, later ones get the new one."""
    pool = ctx.pool
    install = getattr(pool, "install", None)
    if callable(install):
        return install(served)
    with pool._lock:  # noqa: SLF001  (no public install() on ModelPool yet)
        old = pool._models.get(served.name)
        pool._models[served.name] = served
        pool._models.move_to_end(served.name)
    return old
