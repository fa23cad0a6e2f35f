"""Bearer-token auth for ``/admin``: constant-time comparison, 401 without, 403 when wrong."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Forbidden, Unauthorized

__all__ = ["require_token"]


def require_token(token: str) -> object:
    """A FastAPI dependency that admits only ``Authorization: Bearer <token>``."""
    expected = token.encode()

    async def check(request: Request) -> None:
        header = request.headers.get("authorization")
        if not header:
            raise Unauthorized("admin API: missing 'Authorization: Bearer <token>' header")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise Unauthorized("admin API: the Authorization header must be 'Bearer <token>'")
        if not hmac.compare_digest(given.strip().encode(), expected):
            raise Forbidden("admin API: wrong token")

    return check
