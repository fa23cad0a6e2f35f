"""``deqguard serve``: validate settings and the default model, then run uvicorn.

SIGTERM drains instead of stopping at once: readiness turns false and new work gets 503, the
requests in flight finish (up to ``DEQGUARD_DRAIN_GRACE_S``), then the server exits with 0.
Requests still in flight when the grace runs out are answered 503 (``shutting_down``, the usual
JSON error body) and the device stops their batch at its next solver or input-gradient step, so
the process exits within the grace plus a few seconds (:data:`SHUTDOWN_MARGIN_S`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from service.settings import ServiceSettings, load_settings

__all__ = ["DrainingServer", "main"]

log = logging.getLogger("deqguard.service")

SHUTDOWN_MARGIN_S = 5.0
"""After the drain: how long requests that were just answered (and any that do not use the
device) get to finish their responses before uvicorn cancels them (its
``timeout_graceful_shutdown``); also the most the drain waits for the handlers of requests it
answered 503 to write them."""


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM starts a drain; a second signal (or SIGINT) exits."""

    def __init__(self, config: uvicorn.Config, ctx: object) -> None:
        super().__init__(config)
        self.ctx = ctx
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = getattr(self.ctx, "loop", None)
        if sig != signal.SIGTERM or self._draining or loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        self.ctx.begin_drain()  # type: ignore[attr-defined]
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

    async def _drain(self) -> None:
        settings: ServiceSettings = self.ctx.settings  # type: ignore[attr-defined]
        started = asyncio.get_running_loop().time()
        idle = await self.ctx.wait_idle(settings.drain_grace_s)  # type: ignore[attr-defined]
        if not idle:
            # answer what is left with a JSON 503 ourselves, before uvicorn would cancel the
            # handlers (a plain-text 500), and stop the device work at its next step
            n = self.ctx.abort_in_flight()  # type: ignore[attr-defined]
            log.warning(
                "drain grace period (%.1fs) over with work in flight: %d requests answered 503, "
                "their computation stopped",
                settings.drain_grace_s,
                n,
            )
            await self.ctx.wait_idle(SHUTDOWN_MARGIN_S)  # type: ignore[attr-defined]
        left = settings.drain_delay_s - (asyncio.get_running_loop().time() - started)
        if left > 0:
            await asyncio.sleep(left)
        self.should_exit = True


def _check_model(settings: ServiceSettings) -> str | None:
    """A clear message when the default model cannot be found, else None."""
    from deqguard.store import StoreError, list_entries, read_manifest

    try:
        read_manifest(settings.model_store, settings.model)
    except StoreError as exc:
        names = [m.ref for m in list_entries(settings.model_store)]
        return (
            f"cannot serve: {exc}\n"
            f"  model store: {settings.model_store} (DEQGUARD_MODEL_STORE)\n"
            f"  available: {', '.join(names) or 'none'}\n"
            f"  choose one with DEQGUARD_MODEL=name[@version], or train/ship "
            f"{settings.model!r} first"
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the service; options override the DEQGUARD_* environment variables."""
    parser = argparse.ArgumentParser(
        prog="deqguard serve",
        description="Start the HTTP inference service (settings: DEQGUARD_* environment variables).",
    )
    parser.add_argument("--host", help="bind address (DEQGUARD_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (DEQGUARD_PORT, default 8000)")
    parser.add_argument("--model", help="default model name[@version] (DEQGUARD_MODEL)")
    parser.add_argument("--model-store", help="model store root (DEQGUARD_MODEL_STORE)")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N (DEQGUARD_DEVICE)")
    parser.add_argument("--max-batch-size", type=int, help="DEQGUARD_MAX_BATCH_SIZE")
    parser.add_argument("--max-batch-delay-ms", type=float, help="DEQGUARD_MAX_BATCH_DELAY_MS")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = load_settings(**overrides)
    problem = _check_model(settings)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    from service.admin import admin_routers
    from service.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings, extra_routers=admin_routers())
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # the drain (SIGTERM) has already waited the grace and answered what was left by then
        timeout_graceful_shutdown=int(SHUTDOWN_MARGIN_S),
        access_log=False,
    )
    server = DrainingServer(config, app.state.ctx)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
