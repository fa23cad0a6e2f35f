"""``/docs`` (Swagger UI) and ``/redoc`` that work offline.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they are blank without
internet. These pages load them from the ``fastapi-offline`` package's assets (Swagger UI 5,
ReDoc 2), served under ``/docs/assets``; ``/docs/examples/`` serves the files that the OpenAPI
examples of the binary input forms point to (:mod:`service.api.examples`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from service.api.examples import EXAMPLES_URL, example_file
from service.errors import NotFound

__all__ = ["ASSETS_URL", "assets_dir", "install_docs", "router"]

ASSETS_URL = "/docs/assets"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"

router = APIRouter(include_in_schema=False)


def assets_dir() -> Path:
    """The directory of the kept package's Swagger UI and ReDoc files."""
    return Path(str(files("fastapi_offline") / "static"))


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    app = request.app
    return get_swagger_ui_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        # no online validator badge (it would send the schema's URL to validator.swagger.io)
        swagger_ui_parameters={**(app.swagger_ui_parameters or {}), "validatorUrl": None},
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    app = request.app
    return get_redoc_html(
        openapi_url=root + app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


@router.get(EXAMPLES_URL + "/{name}")
async def example(name: str) -> Response:
    """A file an OpenAPI example points to (an image, a binary v2 request)."""
    try:
        content, media = example_file(name)
    except KeyError:
        raise NotFound(f"no example file {name!r}") from None
    return Response(content, media_type=media)


def install_docs(app: FastAPI) -> None:
    """Serve the offline ``/docs`` and ``/redoc`` on ``app`` (created with ``docs_url=None``
    and ``redoc_url=None``)."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    app.include_router(router)
