"""Dynamic batching in front of the single device worker.

Requests become :class:`Job` s in a bounded FIFO (counted in images). One asyncio task forms
batches: it waits up to ``max_delay_s`` after the oldest job arrived for the batch to fill to
``max_batch`` images, takes jobs of the same model in arrival order (different defense settings
share a batch), drops jobs whose deadline passed or whose client left, and hands the batch to a
one-thread executor, the only code that touches the device. While the device computes, the next
batch fills. When the device has just freed up and requests arrive often enough, a batch may also
wait a little for more (``fill_fraction`` of the last batch's compute time, ended early by a
pause in arrivals), so that closed-loop clients answered by the previous batch join the next one
instead of the load splitting into a small batch and a large one, or two alternating halves; on
this project's 2-core CPU a batch of 32 is about 1.15x as efficient per image as one of 16 for
both presets, and with filling 32 `paper` clients get full batches (docs/BENCHMARKS.md, service
notes). A batch that raises is split in halves and retried, so a failure (CUDA out of memory,
say) ends only the requests that cause it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from service.arbiter import DeviceArbiter
from service.errors import BatchFailed, DeadlineExceeded, NotReady, QueueFull, ServiceError

__all__ = ["Batcher", "Job", "JobResult"]

log = logging.getLogger("deqguard.service")

# (model name, images float32 [B,3,32,32], per-image params) -> (per-image outputs, model)
Runner = Callable[[str, torch.Tensor, Sequence[Any]], list[Any]]


@dataclass
class JobResult:
    """A finished job: its outputs and where its time went."""

    outputs: list[Any]
    queue_s: float
    compute_s: float
    batch_size: int
    model: Any = None


@dataclass(eq=False)
class Job:
    """One request's images waiting for the device."""

    model: str
    images: torch.Tensor  # float32 [n, 3, 32, 32] in [0, 1]
    params: list[Any]  # one per image
    deadline: float  # the batcher's clock (time.monotonic() by default) by which compute must start
    future: asyncio.Future[JobResult]
    enqueued: float = field(default_factory=time.monotonic)  # the batcher's clock
    started: bool = False
    cancelled: bool = False

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Batcher:
    """Bounded queue + batch former + one device thread.

    Args:
        runner: runs one batch on the device (called on the device thread only).
        max_batch: most images per device call.
        max_delay_s: how long the oldest job waits for company.
        queue_size: most images queued (not yet computing); beyond it, :class:`QueueFull`.
        on_batch: called on the event loop after every computed batch (metrics).
        torch_threads: torch CPU threads of each device thread (0: torch's default).
        workers: device threads that compute batches at the same time (CPU only; on CUDA one
            thread owns the device). On a small CPU, two one-thread workers beat one two-thread
            worker: no OpenMP barrier waits, and HTTP work on a core stalls one batch, not both.
        fill_fraction: right after the device frees up, when requests arrive often enough to
            expect company, let a batch fill for up to this fraction of the last batch's compute
            time, so that clients answered by the previous batch can join the next one (0: off).
        fill_gap_s: ...ending the wait early once requests that arrived after the device freed
            up pause for this long (the answered clients come back in a burst).
        clock: the time source of the whole policy (arrivals, fill waits, deadlines, queue
            times); jobs' ``enqueued`` and ``deadline`` must be on it, and the event loop's
            ``time()`` must keep the same time (it times the waits). Tests pass a virtual clock
            so that batch composition does not depend on how fast the machine is.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        max_batch: int,
        max_delay_s: float,
        queue_size: int,
        on_batch: Callable[[str, list[Job], float, list[Any]], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        on_failure: Callable[[], None] | None = None,
        torch_threads: int = 0,
        fill_fraction: float = 0.0,
        fill_gap_s: float = 0.004,
        workers: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self._clock = clock
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        # The device thread fixes its own torch thread count when it starts (torch keeps one per
        # thread once a thread has used it), so other threads' settings never change it.
        self.torch_threads = torch_threads or max(1, torch.get_num_threads() // max(1, workers))
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(
            max_workers=self.workers,
            thread_name_prefix="deqguard-device",
            initializer=torch.set_num_threads,
            initargs=(self.torch_threads,),
        )
        self._pending: deque[Job] = deque()
        self._queued_images = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_batch = on_batch
        self._on_depth = on_depth or (lambda depth: None)
        self._on_failure = on_failure or (lambda: None)
        self._per_image_s = 0.05  # running estimate of device seconds per image (Retry-After)
        self._slots: asyncio.Semaphore | None = None  # free device threads
        self._running: set[asyncio.Task[None]] = set()
        self.fill_fraction = fill_fraction
        self.fill_gap_s = fill_gap_s
        self._free_since = 0.0  # clock() when the last batch finished
        self._arrived = 0  # images submitted so far
        self._busy_rate = 0.0  # images/s that arrived while the last batch computed
        self._rate = 0.0  # smoothed arrival rate, images/s, measured between batch starts
        self._last_start = 0.0
        self._arrived_at_last_start = 0
        self._last_arrival = 0.0  # clock() of the newest submit
        self._last_compute_s = 0.0
        # shares the device with background audits: predict batches first, never concurrently
        self.arbiter = DeviceArbiter(lambda: self._queued_images)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="deqguard-batcher")

    async def stop(self) -> None:
        """Stop forming batches; queued jobs fail with 503 (the current batch finishes)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._running:  # batches already on the device finish and answer their requests
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(NotReady("the service is shutting down"))
        self._queued_images = 0
        self._on_depth(0)
        self.executor.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` on the device thread (model loading, warm-up), with predict priority."""
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._exclusive, fn, *args
        )

    def _exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.arbiter.predict():
            return fn(*args)

    # ------------------------------------------------------------------ admission
    @property
    def queued_images(self) -> int:
        return self._queued_images

    def fill_wait_s(self) -> float:
        """How long a batch may wait to fill after the device frees up: ``fill_fraction`` of
        the last batch's compute time (at most 0.25 s), so the device idles at most that
        fraction of its busy time while clients that the previous batch answered come back. The
        loop waits only when at least one arrival is expected in that time (at the larger of
        the rate images arrived while the last batch computed and the smoothed rate between
        batch starts), so sparse traffic never pays it."""
        return min(0.25, self.fill_fraction * self._last_compute_s)

    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._queued_images * self._per_image_s))

    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull (429) when it would not fit."""
        if self._task is None or self._wake is None:
            raise NotReady("the device worker is not running")
        if self._queued_images + job.n > self.queue_size:
            raise QueueFull(
                f"queue full: {self._queued_images} images waiting, limit {self.queue_size}; "
                "retry later",
                retry_after_s=self.retry_after_s(),
            )
        self._pending.append(job)
        self._queued_images += job.n
        self._arrived += job.n
        self._last_arrival = self._clock()
        self._on_depth(self._queued_images)
        self._wake.set()

    def cancel(self, job: Job) -> bool:
        """Withdraw a job that has not started; True if it was withdrawn."""
        if job.started or job.cancelled:
            return False
        job.cancelled = True
        try:
            self._pending.remove(job)
        except ValueError:
            return False
        self._queued_images -= job.n
        self._on_depth(self._queued_images)
        if not job.future.done():
            job.future.cancel()
        return True

    # ------------------------------------------------------------------ batch forming
    def _images_for(self, model: str) -> int:
        return sum(j.n for j in self._pending if j.model == model)

    def _take(self) -> tuple[str, list[Job]]:
        model = self._pending[0].model
        batch: list[Job] = []
        total = 0
        keep: deque[Job] = deque()
        now = self._clock()
        while self._pending:
            job = self._pending.popleft()
            fits = job.model == model and (not batch or total + job.n <= self.max_batch)
            if not fits:
                keep.append(job)
                continue
            self._queued_images -= job.n
            if job.future.done():  # cancelled by its handler
                continue
            if now > job.deadline:  # counted by the handler that receives the 504
                job.future.set_exception(
                    DeadlineExceeded("deadline passed while queued; dropped before compute")
                )
                continue
            job.started = True
            batch.append(job)
            total += job.n
        self._pending = keep
        self._on_depth(self._queued_images)
        return model, batch

    async def _loop(self) -> None:
        assert self._wake is not None and self._slots is not None
        while True:
            await self._slots.acquire()  # a device thread is free
            try:
                await self._form_and_dispatch()
            except BaseException:
                self._slots.release()
                raise

    async def _form_and_dispatch(self) -> None:
        """Wait for jobs, form one batch and start it on a free device thread (which the
        caller holds; the batch's task gives it back)."""
        assert self._wake is not None and self._slots is not None
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            first = self._pending[0]
            until = first.enqueued + self.max_delay_s
            fill_until = 0.0
            fill = self.fill_wait_s()
            # the device just freed up and requests arrive often enough to expect company
            # within the fill time: let the batch fill (the clients the last batch answered
            # come back after the event loop has written all their responses)
            rate = max(self._busy_rate, self._rate)
            if self._clock() - self._free_since < fill and rate * fill >= 1.0:
                fill_until = self._free_since + fill
            while self._pending and self._images_for(self._pending[0].model) < self.max_batch:
                # filling ends at its cap, or once arrivals that began after the device freed
                # up pause for fill_gap_s
                gap_end = (
                    self._last_arrival + self.fill_gap_s
                    if self._last_arrival > self._free_since
                    else fill_until
                )
                left = max(until, min(fill_until, gap_end)) - self._clock()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except TimeoutError:
                    break
            if not self._pending:
                continue
            model, batch = self._take()
            if not batch:
                continue
            started = self._clock()
            if self._last_start:
                inst = (self._arrived - self._arrived_at_last_start) / max(
                    started - self._last_start, 1e-6
                )
                self._rate = 0.7 * self._rate + 0.3 * inst
            self._last_start, self._arrived_at_last_start = started, self._arrived
            task = asyncio.get_running_loop().create_task(self._run(model, batch, started))
            self._running.add(task)
            return

    async def _run(self, model: str, batch: list[Job], started: float) -> None:
        """Compute one batch on a device thread and answer its jobs; frees the thread."""
        assert self._slots is not None
        loop = asyncio.get_running_loop()
        arrived_before = self._arrived
        try:
            try:
                results = await loop.run_in_executor(
                    self.executor, self._exclusive, self._compute, model, batch
                )
            except Exception as exc:  # the device thread itself failed: fail this batch only
                log.exception("device worker call failed")
                results = [exc] * len(batch)
            self._free_since = self._clock()
            elapsed = self._free_since - started
            self._busy_rate = (self._arrived - arrived_before) / max(elapsed, 1e-6)
            self._last_compute_s = elapsed
            n_images = sum(j.n for j in batch)
            if n_images:
                self._per_image_s = (
                    0.8 * self._per_image_s + 0.2 * elapsed / n_images / self.workers
                )
            for job, res in zip(batch, results):
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    outputs, served = res
                    job.future.set_result(
                        JobResult(
                            outputs=outputs,
                            queue_s=started - job.enqueued,
                            compute_s=elapsed,
                            batch_size=n_images,
                            model=served,
                        )
                    )
            if self._on_batch is not None:
                self._on_batch(model, batch, elapsed, results)
        finally:
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._slots.release()

    # ------------------------------------------------------------------ device thread
    def _compute(self, model: str, batch: list[Job]) -> list[Any]:
        """Run a batch; on failure split it and retry the halves (device thread)."""
        try:
            images = torch.cat([j.images for j in batch]) if len(batch) > 1 else batch[0].images
            params = [p for j in batch for p in j.params]
            outputs, served = self.runner(model, images, params)
        except ServiceError as exc:  # e.g. the model cannot be loaded: same answer for all
            return [exc] * len(batch)
        except Exception as exc:
            self._on_failure()
            if _is_oom(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(batch) == 1:
                log.warning("batch of one request failed: %r", exc)
                return [BatchFailed(f"inference failed: {type(exc).__name__}: {exc}")]
            mid = len(batch) // 2
            log.warning("batch of %d requests failed (%r); splitting", len(batch), exc)
            return self._compute(model, batch[:mid]) + self._compute(model, batch[mid:])
        out: list[Any] = []
        start = 0
        for j in batch:
            out.append((outputs[start : start + j.n], served))
            start += j.n
        return out
