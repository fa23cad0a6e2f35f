"""The ``/admin`` API: audit jobs and model management, behind a bearer token.

Built per app by :func:`build_admin_router`, which returns None when no token is configured,
so that the admin API does not exist at all (404) unless an operator asked for it. The routes
raise service errors (:mod:`service.errors`); the app's one handler answers them.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, Body, Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from deqguard.store import StoreError, parse_ref, validate_name
from service.admin.audits import audit_config
from service.admin.auth import require_token
from service.admin.jobs import AuditJob, JobStore
from service.admin.metrics import AdminMetrics
from service.admin.scheduler import AuditScheduler, progress_of
from service.admin.schemas import AuditRequest, ModelLoadRequest
from service.admin.settings import AdminSettings
from service.api.common import JSONBodyRoute
from service.context import ServiceContext
from service.errors import (
    LOAD_ERRORS,
    CheckpointRefused,
    Conflict,
    InvalidParameter,
    ModelNotFound,
    NotFound,
    as_service_error,
)

__all__ = ["AdminState", "build_admin_router"]

log = logging.getLogger("deqguard.admin")

_JOB_ID = re.compile(r"^[0-9a-f]{16}$")
_PLOT = re.compile(r"^[a-z0-9_]{1,64}$")
_IDEMPOTENCY = re.compile(r"^[\x21-\x7e]{1,200}$")


class AdminState:
    """Per-app admin state: job store, scheduler, metrics, the model-load lock."""

    def __init__(self, settings: AdminSettings, ctx: ServiceContext) -> None:
        self.settings = settings
        self.ctx = ctx
        self.store = JobStore(settings.database_path)
        self.metrics = AdminMetrics(ctx.metrics.registry, self.store.counts)
        self.scheduler = AuditScheduler(self.store, settings, ctx, self.metrics)
        self.load_lock = asyncio.Lock()


async def _admin(request: Request) -> AdminState:
    """FastAPI dependency: this app's admin state."""
    return request.app.state.admin


def _job_or_404(admin: AdminState, job_id: str) -> AuditJob:
    job = admin.store.get(job_id) if _JOB_ID.match(job_id) else None
    if job is None:
        raise NotFound(f"no audit job {job_id!r}", field="id")
    return job


def _job_view(admin: AdminState, job: AuditJob) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job.id,
        "state": job.state,
        "spec": job.spec,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "progress": progress_of(job, admin.scheduler.live(job.id)),
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


# ---------------------------------------------------------------------- audits
audits = APIRouter(route_class=JSONBodyRoute)


@audits.post("/audits", status_code=202, summary="Start an audit job")
async def create_audit(
    body: AuditRequest,
    idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
    admin: AdminState = Depends(_admin),
) -> JSONResponse:
    if idempotency_key is not None and not _IDEMPOTENCY.match(idempotency_key):
        raise InvalidParameter(
            "Idempotency-Key: 1-200 printable ASCII characters", field="Idempotency-Key"
        )
    resolver = admin.ctx.resolver
    manifest = resolver.manifest(body.model)  # store errors: the app's error table
    spec = body.model_dump()
    spec["model"] = manifest.ref  # pin the version audited
    config = audit_config(
        spec,
        resolver.steps_of(manifest),
        str(admin.ctx.device),
        max_R=admin.ctx.settings.max_defense_steps,
        model_store=admin.ctx.settings.model_store,
    )
    job, created = admin.store.create(spec, body.n_samples, idempotency_key, config.to_dict())
    if created:
        admin.scheduler.schedule(job.id)
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


@audits.get("/audits", summary="List audit jobs, newest first")
async def list_audits(
    state: str | None = Query(
        default=None, pattern="^(queued|running|succeeded|failed|cancelled)$"
    ),
    limit: int = Query(default=100, ge=1, le=1000),
    admin: AdminState = Depends(_admin),
) -> dict[str, Any]:
    jobs = admin.store.list(state, limit)
    return {"jobs": [_job_view(admin, j) for j in jobs], "counts": admin.store.counts()}


@audits.get("/audits/{job_id}", summary="State and progress of an audit job")
async def get_audit(job_id: str, admin: AdminState = Depends(_admin)) -> dict[str, Any]:
    return _job_view(admin, _job_or_404(admin, job_id))


@audits.get("/audits/{job_id}/report", summary="The JSON report of a finished audit")
async def get_report(job_id: str, admin: AdminState = Depends(_admin)) -> dict[str, Any]:
    job = _job_or_404(admin, job_id)
    if job.state != "succeeded" or job.report is None:
        raise Conflict(f"audit {job_id} is {job.state}: no report yet", field="id")
    return job.report


@audits.get(
    "/audits/{job_id}/plots/{name}.png",
    summary="A plot of a finished audit (PNG)",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}},
)
async def get_plot(job_id: str, name: str, admin: AdminState = Depends(_admin)) -> FileResponse:
    job = _job_or_404(admin, job_id)
    names = (job.report or {}).get("plots", [])
    if not _PLOT.match(name) or name not in names:
        raise NotFound(f"audit {job_id} has no plot {name!r} (has: {names})", field="name")
    path = admin.scheduler.plots_dir(job_id) / f"{name}.png"
    if not path.is_file():
        raise NotFound(f"plot file of {name!r} is missing on this server", field="name")
    return FileResponse(path, media_type="image/png")


@audits.delete("/audits/{job_id}", status_code=202, summary="Cancel an audit job")
async def cancel_audit(job_id: str, admin: AdminState = Depends(_admin)) -> JSONResponse:
    job = _job_or_404(admin, job_id)
    if job.state not in ("queued", "running"):
        raise Conflict(f"audit {job_id} is already {job.state}", field="id")
    job = admin.scheduler.cancel(job_id) or job
    return JSONResponse(_job_view(admin, job), status_code=202)


# ---------------------------------------------------------------------- models
models = APIRouter(route_class=JSONBodyRoute)


@models.get("/models", summary="Models loaded in the serving pool")
async def loaded_models(admin: AdminState = Depends(_admin)) -> dict[str, Any]:
    ctx = admin.ctx
    return {
        "default": ctx.resolver.default_ref,
        "loaded": [
            {"name": s.name, "version": s.version, "sha256": s.sha256, "loaded_at": s.loaded_at}
            for s in ctx.loaded_models()
        ],
    }


def _load_ref(admin: AdminState, name: str, body: ModelLoadRequest | None) -> str:
    """The reference a load names (422 naming ``name`` when malformed)."""
    try:
        validate_name(name)
        ref = name if body is None or body.version is None else f"{name}@{body.version}"
        parse_ref(ref)
    except StoreError as exc:
        admin.metrics.model_loads.labels(result="refused").inc()
        raise as_service_error(exc, field="name") from None
    return ref


_LOAD_RESULT = {ModelNotFound: "not_found", CheckpointRefused: "refused"}


async def _load(admin: AdminState, ref: str) -> tuple[Any, float, float]:
    """Verify, load and warm up off the device thread; what cannot be served is refused (the
    current model keeps serving) and counted by outcome."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, admin.ctx.load_model, ref)
    except StoreError as exc:
        err = as_service_error(exc, LOAD_ERRORS, field="name")
        admin.metrics.model_loads.labels(result=_LOAD_RESULT[type(err)]).inc()
        if isinstance(err, CheckpointRefused):
            log.warning("refused to load %s: %s", ref, exc)
        raise err from None
    except Exception as exc:  # verified, but the warm-up forward failed
        admin.metrics.model_loads.labels(result="failed").inc()
        raise CheckpointRefused(
            f"warm-up of {ref} failed ({type(exc).__name__}: {exc}); "
            "the current model keeps serving",
            field="name",
        ) from None


@models.post(
    "/models/{name}/load",
    summary="Verify, load, warm up and atomically swap in a model",
    responses={422: {"description": "bad name, or the checkpoint fails verification"}},
)
async def load_model(
    name: str,
    body: ModelLoadRequest | None = Body(default=None),
    admin: AdminState = Depends(_admin),
) -> dict[str, Any]:
    ctx = admin.ctx
    ref = _load_ref(admin, name, body)
    async with admin.load_lock:
        served, load_s, warm_s = await _load(admin, ref)
        old = ctx.install_model(served)  # in one step: running batches keep the old one
        previous = None if old is None else {"version": old.version, "sha256": old.sha256}
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


# ---------------------------------------------------------------------- the router
def build_admin_router(settings: AdminSettings | None = None) -> APIRouter | None:
    """The admin router, or None when ``DEQGUARD_ADMIN_TOKEN`` is unset (admin API off)."""
    settings = settings or AdminSettings()
    token = settings.token
    if token is None:
        return None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        admin = AdminState(settings, app.state.ctx)
        app.state.admin = admin
        await admin.scheduler.start()
        try:
            yield
        finally:
            await admin.scheduler.stop()
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
    router.include_router(audits)
    router.include_router(models)
    return router
