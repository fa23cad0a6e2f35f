"""The admin API (``/admin``): persistent, resumable audit jobs and model management.

``deqguard serve`` includes it through :func:`admin_routers` (empty unless
``DEQGUARD_ADMIN_TOKEN`` is set, so the admin API is off by default).
"""

from __future__ import annotations

from typing import Any

from service.admin.router import build_admin_router
from service.admin.settings import AdminSettings

__all__ = ["AdminSettings", "admin_routers", "build_admin_router", "create_full_app"]


def admin_routers() -> list[Any]:
    """``[admin router]`` when a token is configured, else ``[]``; bad DEQGUARD_* admin
    settings stop the start with one clear message per variable."""
    from pydantic import ValidationError

    from service.settings import format_settings_error

    try:
        settings = AdminSettings()
    except ValidationError as exc:
        raise SystemExit(format_settings_error(exc)) from None
    router = build_admin_router(settings)
    return [router] if router is not None else []


def create_full_app() -> Any:
    """The service app with the admin router when ``DEQGUARD_ADMIN_TOKEN`` is set (a uvicorn
    ``--factory`` target)."""
    from service.app import create_app
    from service.settings import load_settings

    return create_app(load_settings(), extra_routers=admin_routers())
