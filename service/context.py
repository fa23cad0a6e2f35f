"""The running service's state, shared by every route: settings, resolver, batcher, metrics.

Routers (ours and the admin router a later module adds) reach it as ``request.app.state.ctx``
or through the :func:`get_ctx` dependency. They resolve a request with :attr:`resolver` (request
side) and send work to the device only through :meth:`ServiceContext.infer`, so admission,
deadlines, cancellation and metrics live in one place; the batcher hands batches to the device
worker (:mod:`service.worker`), which the routes never import.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import Request

from deqguard.cpu_memory import retain_freed_memory
from deqguard.defense import DefenseParams
from deqguard.device import resolve_device
from service.batcher import Batcher, Job, JobResult
from service.errors import DeadlineExceeded, NotReady, ShuttingDown
from service.metrics import ServiceMetrics
from service.resolver import RequestResolver
from service.settings import ServiceSettings
from service.stats import StatsRegistry
from service.worker import DeviceWorker

__all__ = ["ClientGone", "ServiceContext", "get_ctx"]

log = logging.getLogger("deqguard.service")


class ClientGone(Exception):
    """The client disconnected while its request was queued; nobody is left to answer."""


class ServiceContext:
    """Owns the worker and the models for one app; created by :func:`service.app.create_app`."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        try:
            self.device = resolve_device(settings.device)
        except ValueError as exc:
            raise SystemExit(f"DEQGUARD_DEVICE={settings.device}: {exc}") from None
        if settings.cpu_retain_memory:
            retain_freed_memory()
        self.metrics = ServiceMetrics(self.device)
        self.stats = StatsRegistry()  # Triton's statistics extension, per model version
        self.resolver = RequestResolver(settings)
        self.worker = DeviceWorker(settings, self.device, self.metrics)
        self.batcher = Batcher(
            self.worker.run,
            max_batch=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            queue_size=settings.queue_size,
            on_batch=self._on_batch,
            on_depth=self.metrics.queue_depth.set,
            on_failure=self.metrics.batch_failures.inc,
            torch_threads=settings.torch_threads,
            workers=settings.device_workers if self.device.type == "cpu" else 1,
            fill_fraction=settings.batch_fill_fraction,
            fill_gap_s=settings.batch_fill_gap_ms / 1000.0,
        )
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deqguard-decode")
        self.loaded = False
        self.warmed = False
        self.draining = False
        self.started_at = time.time()
        self.in_flight = 0
        self._jobs: set[Job] = set()  # the jobs of the requests in flight
        self._idle: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def ready(self) -> bool:
        return self.loaded and self.warmed and not self.draining

    async def startup(self) -> None:
        """Load the default model and warm it up on the device thread, then turn ready."""
        self.loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        self.batcher.start()
        served = await self.batcher.call(self.worker.load_default)
        self.loaded = True
        for b in self.settings.warmup_batch_sizes:
            x = torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            await self.batcher.call(self.worker.warm, served, x)
        self.warmed = True
        self.metrics.ready.set(1)
        log.info(
            "ready: model %s@%s (sha256 %s) on %s",
            served.name,
            served.version,
            served.sha256[:12],
            self.device,
        )

    async def shutdown(self) -> None:
        self.draining = True
        self.metrics.ready.set(0)
        # whatever still computes now has outlived the drain (or the server was told to exit):
        # stop it at its next step instead of waiting for the batch
        self.worker.stop_compute()
        await self.batcher.stop()
        self.decoder.shutdown(wait=False, cancel_futures=True)

    def begin_drain(self) -> None:
        """Readiness goes false and no new work is admitted; in-flight work continues."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.in_flight)
        self.draining = True
        self.metrics.ready.set(0)

    def abort_in_flight(self) -> int:
        """Past the drain grace: every request still waiting for the device is answered 503
        (``shutting_down``) now, and the device stops the batches it computes at their next
        solver or input-gradient step. Returns how many requests were answered."""
        self.worker.stop_compute()
        n = 0
        for job in list(self._jobs):
            if not job.future.done():
                job.future.set_exception(
                    ShuttingDown(
                        f"the server is shutting down: the drain grace of "
                        f"{self.settings.drain_grace_s:g} s ran out before this request "
                        "finished, and its computation was stopped; retry elsewhere"
                    )
                )
                n += 1
        return n

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True) or ``timeout`` seconds pass (False)."""
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ helpers for routes
    def reject(self, reason: str) -> None:
        self.metrics.rejections.labels(reason=reason).inc()

    def check_admission(self) -> None:
        if self.draining:
            raise NotReady(
                "the service is draining (shutting down); retry elsewhere", draining=True
            )
        if not (self.loaded and self.warmed):
            raise NotReady("the service is starting: the model is not loaded and warmed up yet")

    async def offload(self, fn: Any, *args: Any) -> Any:
        """Run CPU-bound request work (decoding, validation) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, fn, *args)

    def is_loaded(self, name: str, version: str) -> bool:
        """Whether that version of the model is in the device's pool now."""
        return self.worker.is_loaded(name, version)

    def loaded_models(self) -> list[Any]:
        """The models in the device's pool (name, version, sha256, loaded_at)."""
        return self.worker.loaded()

    def load_model(self, ref: str) -> tuple[Any, float, float]:
        """Off the event loop and the device thread: verify, load and warm up ``ref`` for a
        hot swap (store errors propagate). Returns (model, load s, warm-up s)."""
        return self.worker.load(ref)

    def install_model(self, served: Any) -> Any:
        """Swap a loaded model into the pool in one step; returns the one it replaced."""
        return self.worker.install(served)

    # ------------------------------------------------------------------ device path
    def _on_batch(self, model: str, jobs: list[Job], elapsed: float, results: list[Any]) -> None:
        m = self.metrics
        n = sum(j.n for j in jobs)
        m.batch_size.observe(n)
        m.inference_duration.labels(model=model).observe(elapsed)
        served = next((r[1] for r in results if not isinstance(r, BaseException)), None)
        if served is not None:
            self.stats.execution(served.name, served.version, n, elapsed)
        for job, res in zip(jobs, results):
            fut = job.future
            if isinstance(res, BaseException) or fut.cancelled() or fut.exception() is not None:
                continue  # failed, or answered otherwise (503 by abort_in_flight) meanwhile
            m.queue_duration.observe(max(0.0, fut.result().queue_s))
            outputs, _served = res
            m.images.labels(model=model).inc(len(outputs))
            for out in outputs:
                m.grad_steps.observe(out.grad_steps)
                m.entropy.observe(out.entropy)

    async def infer(
        self,
        model: str,
        images: torch.Tensor,
        params: Sequence[DefenseParams],
        deadline_ms: float | None,
        request: Request | None = None,
    ) -> JobResult:
        """Queue images for the device and wait: 429 when full, 504 past the deadline, and
        withdrawal when the client disconnects first (or the handler is cancelled: a gRPC
        client's cancel or deadline). Every outcome counts in :attr:`stats`."""
        t0 = time.monotonic()
        try:
            result = await self._infer(model, images, params, deadline_ms, request)
        except BaseException:
            name, _, version = model.partition("@")
            self.stats.failure(name, version or self._version_of(name), time.monotonic() - t0)
            raise
        served = result.model
        if served is not None:
            self.stats.success(
                served.name,
                served.version,
                len(result.outputs),
                time.monotonic() - t0,
                result.queue_s,
                result.compute_s,
            )
        return result

    def _version_of(self, name: str) -> str:
        """The version a request naming ``name`` alone meant (for the statistics of a failure)."""
        version = self.worker.current_version(name)
        if version is None:
            try:
                version = self.resolver.manifest(name).version
            except Exception:  # noqa: BLE001 - statistics must not change the error
                version = ""
        return version

    async def _infer(
        self,
        model: str,
        images: torch.Tensor,
        params: Sequence[DefenseParams],
        deadline_ms: float | None,
        request: Request | None,
    ) -> JobResult:
        self.check_admission()
        assert self._idle is not None
        loop = asyncio.get_running_loop()
        budget = (deadline_ms or self.settings.default_deadline_ms) / 1000.0
        job = Job(
            model=model,
            images=images,
            params=list(params),
            deadline=time.monotonic() + budget,
            future=loop.create_future(),
        )
        self.batcher.submit(job)
        self._jobs.add(job)
        self.in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.set(self.in_flight)
        watcher = loop.create_task(_wait_disconnect(request)) if request is not None else None
        try:
            waiters: set[asyncio.Future[Any]] = {job.future}
            if watcher is not None:
                waiters.add(watcher)
            done, _ = await asyncio.wait(
                waiters, timeout=max(0.0, job.deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            if job.future in done:
                return job.future.result()
            if watcher is not None and watcher in done:
                if self.batcher.cancel(job):
                    self.reject("client_disconnected")
                    raise ClientGone()
                return await job.future  # already computing: finish, the answer is dropped
            if self.batcher.cancel(job):  # counted by the error handler
                raise DeadlineExceeded(
                    f"deadline of {budget * 1000:.0f} ms passed while queued; dropped before compute",
                    field="deadline_ms",
                )
            return await job.future
        except asyncio.CancelledError:  # the handler was cancelled (a gRPC cancel or deadline)
            self.batcher.cancel(job)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            self._jobs.discard(job)
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)
            if self.in_flight == 0:
                self._idle.set()


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read: only disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def get_ctx(request: Request) -> ServiceContext:
    """FastAPI dependency: the service context of the app serving this request (``async`` so
    that it runs on the event loop: a sync dependency costs a thread-pool hop per request)."""
    return request.app.state.ctx
