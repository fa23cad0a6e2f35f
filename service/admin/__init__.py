"""The admin API (``/admin``): persistent, resumable audit jobs and model management.

>>> from service.admin import build_admin_router            # doctest: +SKIP
>>> create_app(settings, extra_routers=[r] if (r := build_admin_router()) else [])
"""

from service.admin.router import build_admin_router
from service.admin.settings import AdminSettings

__all__ = ["AdminSettings", "build_admin_router", "create_full_app"]


def create_full_app() -> object:
    """The service app with the admin router when ``DEQGUARD_ADMIN_TOKEN`` is set (a uvicorn
    ``--factory`` target)."""
    from service.app import create_app
    from service.settings import load_settings

    router = build_admin_router()
    return create_app(load_settings(), extra_routers=[router] if router else [])
