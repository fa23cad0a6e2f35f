"""The app in process: ``create_app``'s ASGI app on an event loop in a background thread, its
lifespan run (model loaded and warmed, device worker started), reached through a plain sync
``httpx.Client``. For tests of the HTTP contract that need no real socket; signals, disconnects
and the Triton client use a live server (:mod:`tests._live`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

__all__ = ["InProcessApp"]

T = TypeVar("T")


class _LoopTransport(httpx.BaseTransport):
    """A sync transport that runs each request through httpx's ASGI transport on the app's
    loop (requests from several threads run concurrently there, so they can share batches)."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def send() -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(
                response.status_code, headers=response.headers, content=content, request=request
            )

        return asyncio.run_coroutine_threadsafe(send(), self.loop).result()


class InProcessApp:
    """``with InProcessApp(create_app(settings)) as client: client.get("/readyz")``."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._lifespan: Any = None
        self.client: httpx.Client | None = None

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        self._lifespan = self.app.router.lifespan_context(self.app)
        self._run(self._lifespan.__aenter__())
        self.client = httpx.Client(
            transport=_LoopTransport(self.app, self.loop), base_url="http://testserver", timeout=600
        )
        return self.client

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client is not None:
            self.client.close()
        self._run(self._lifespan.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=60)
        self.loop.close()
