"""Builds the FastAPI app: routers, one error handler, the request middleware, the lifespan.

``create_app(settings, extra_routers=[...])`` is the only place where the pieces are wired; an
extra router (the admin/audit API, say) reaches the running service through
``service.context.get_ctx``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deqguard.defense import DefenseParamError
from deqguard.store import StoreError
from service.api import health, v1, v2
from service.api.common import field_from_loc, strict_query
from service.api.docs import install_docs
from service.context import ClientGone, ServiceContext
from service.errors import InvalidParameter, PayloadTooLarge, ServiceError, as_service_error
from service.grpc_server import grpc_endpoint
from service.schemas import InferRequest
from service.settings import ServiceSettings

__all__ = ["create_app"]

log = logging.getLogger("deqguard.service")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def is_v2(path: str) -> bool:
    """A KServe v2 path: its errors follow the protocol."""
    return path == "/v2" or path.startswith("/v2/")


def error_body(details: dict[str, object], path: str) -> dict[str, object]:
    """``{"error": {code, reason, message, ...}}``; on ``/v2/...`` the KServe v2 protocol's
    ``{"error": "<message>"}`` (what tritonclient reads) with the same object as ``details``."""
    if is_v2(path):
        return {"error": str(details["message"]), "details": details}
    return {"error": details}


def _error_json(exc: ServiceError, path: str) -> JSONResponse:
    return JSONResponse(
        error_body(exc.to_dict(), path), status_code=exc.status_code, headers=exc.headers
    )


class RequestMiddleware:
    """Request id, body-size limit, Server-Timing, and the request metrics (pure ASGI, so it
    does not buffer bodies or hide client disconnects from the routes)."""

    def __init__(self, app: ASGIApp, ctx: ServiceContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        state["t0"] = t0
        status = {"code": 500}
        limit = self.ctx.settings.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                timing = state.get("server_timing", {})
                parts = [f"{k};dur={v:.2f}" for k, v in timing.items()]
                parts.append(f"total;dur={(time.perf_counter() - t0) * 1000.0:.2f}")
                extra = [
                    (b"x-request-id", rid.encode()),
                    (b"server-timing", ", ".join(parts).encode()),
                ]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        received = {"n": 0}

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                received["n"] += len(message.get("body", b""))
                if received["n"] > limit:
                    raise PayloadTooLarge(f"body: more than {limit} bytes", part="body")
            return message

        try:
            declared = headers.get("content-length")
            if (
                scope["method"] in _BODY_METHODS
                and declared
                and declared.isdigit()
                and int(declared) > limit
            ):
                exc = PayloadTooLarge(
                    f"body: {declared} bytes, over the limit of {limit}", part="body"
                )
                self.ctx.reject(exc.reason)
                await _error_json(exc, scope["path"])(scope, receive, send_wrapper)
                return
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            m = self.ctx.metrics
            m.requests.labels(route=path, method=scope["method"], code=str(status["code"])).inc()
            m.request_duration.labels(route=path).observe(time.perf_counter() - t0)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: ServiceContext = app.state.ctx
    await ctx.startup()
    try:
        async with grpc_endpoint(ctx):  # KServe v2 gRPC on the same loop and context
            yield
    finally:
        await ctx.shutdown()


def create_app(
    settings: ServiceSettings | None = None,
    *,
    extra_routers: Sequence[APIRouter] = (),
    ctx: ServiceContext | None = None,
) -> FastAPI:
    """The service app. ``extra_routers`` are included after ours (same error handling,
    metrics and middleware); they find the running service through ``get_ctx``."""
    settings = settings or ServiceSettings()
    ctx = ctx or ServiceContext(settings)
    app = FastAPI(
        title="deqguard",
        version="0.1.0",
        summary="Robust CIFAR-10 classification with deep equilibrium models",
        description=(
            "Test-time input entropy reduction along the DEQ dynamics (Yang et al., ICML 2023), "
            "served with dynamic batching. v1 is deqguard's API; v2 is the KServe Open Inference "
            "Protocol."
        ),
        lifespan=_lifespan,
        dependencies=[Depends(strict_query)],
        docs_url=None,  # /docs and /redoc come from install_docs: offline, no CDN
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.settings = settings

    async def _service_error(request: Request, exc: Exception) -> JSONResponse:
        """The one place errors become HTTP answers (service.errors holds the table)."""
        err = as_service_error(exc)
        ctx.reject(err.reason)
        if err.status_code >= 500 and err.status_code not in (503, 504):
            log.warning("%d on %s: %s", err.status_code, request.url.path, err.message)
        return _error_json(err, request.url.path)

    for domain in (ServiceError, DefenseParamError, StoreError):
        app.add_exception_handler(domain, _service_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        name = field_from_loc(err.get("loc", ()))
        return await _service_error(
            request, InvalidParameter(f"{name}: {err.get('msg', 'invalid')}", field=name)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        details = {"code": exc.status_code, "reason": reason, "message": str(exc.detail)}
        body = error_body(details, request.url.path)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(v2.router)
    install_docs(app)
    for router in extra_routers:
        app.include_router(router)
    app.add_middleware(RequestMiddleware, ctx=ctx)
    _add_schemas(app, [InferRequest])
    return app


def _add_schemas(app: FastAPI, models: Sequence[type[BaseModel]]) -> None:
    """Put request models that routes read by hand (``openapi_extra`` bodies) into
    ``components.schemas``, so their ``$ref`` resolves for /docs and schemathesis."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, sub in defs.get("$defs", {}).items():
                comps.setdefault(name, sub)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
