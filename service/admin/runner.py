"""Runs audit jobs: at most ``max_concurrent_audits`` at once, each on its own thread, each
persisting its partial result after every batch so that a restart resumes it.

Yielding to online traffic: every f-evaluation of an audit's model first passes the gate, the
device arbiter's (:mod:`service.arbiter`): it waits while predict requests are queued or a
predict batch is computing (for queued ones up to ``audit_yield_max_s``, so audits still progress
under sustained load), and a predict batch waits for the audit's current f-evaluation to end.
The audit thus computes only in the gaps between predict batches and never at the same time as
one, and a predict request that arrives while an audit computes waits for at most one
f-evaluation (forward or backward) of one audit batch. (With ``max_concurrent_audits`` > 1 the
audits share one segment flag: they may overlap each other's segments.)
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from deqguard.audit import wilson_interval
from service.admin.engine import AuditStopped, AuditTask
from service.admin.jobs import Job, JobStore
from service.admin.metrics import AdminMetrics
from service.admin.settings import AdminSettings
from service.context import ServiceContext
from service.hold import wait_while_held

__all__ = ["AuditRunner"]

log = logging.getLogger("deqguard.admin")


class AuditRunner:
    """Schedules, runs, cancels and resumes audit jobs for one service instance."""

    def __init__(
        self,
        store: JobStore,
        settings: AdminSettings,
        ctx: ServiceContext,
        metrics: AdminMetrics,
    ) -> None:
        self.store = store
        self.settings = settings
        self.ctx = ctx
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrent_audits,
            thread_name_prefix="deqguard-audit",
            initializer=torch.set_num_threads,  # before the thread's first torch op
            initargs=(settings.audit_torch_threads,),
        )
        self._sem: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._shutdown = threading.Event()
        self._live: dict[str, dict[str, Any]] = {}  # job id -> {"rate": samples/s, ...}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Resume what was running or queued when the server last stopped."""
        self._sem = asyncio.Semaphore(self.settings.max_concurrent_audits)
        for job in self.store.active():
            if job.state == "running":
                log.info("resuming audit %s at %d/%d samples", job.id, job.samples_done,
                         job.samples_total)  # fmt: skip
            self.schedule(job.id)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop running audits at their next f-evaluation; they stay 'running' and resume on
        the next start."""
        self._shutdown.set()
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)

    def schedule(self, job_id: str) -> None:
        if job_id in self._tasks:
            return
        self._cancel[job_id] = threading.Event()
        task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"audit-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    def cancel(self, job_id: str) -> Job | None:
        job = self.store.request_cancel(job_id)
        ev = self._cancel.get(job_id)
        if ev is not None:
            ev.set()
        return job

    def live(self, job_id: str) -> dict[str, Any]:
        return dict(self._live.get(job_id, {}))

    # ------------------------------------------------------------------ running
    async def _run(self, job_id: str) -> None:
        assert self._sem is not None
        async with self._sem:
            job = self.store.get(job_id)
            if job is None or job.state not in ("queued", "running") or self._shutdown.is_set():
                return
            if job.cancel_requested:
                self.store.finish(job_id, "cancelled")
                return
            self.store.mark_running(job_id)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(self.executor, self._execute, job_id)
            except Exception:  # never let one job take the runner down
                log.exception("audit %s crashed", job_id)
            finally:
                self._cancel.pop(job_id, None)
                self._live.pop(job_id, None)

    def _gate_for(self, job_id: str) -> Any:
        cancel = self._cancel[job_id]
        arbiter = self.ctx.batcher.arbiter
        max_wait = self.settings.audit_yield_max_s
        yielded = self.metrics.yield_seconds

        def stop() -> bool:
            return cancel.is_set() or self._shutdown.is_set()

        def gate() -> None:
            if stop():
                raise AuditStopped()
            t0 = time.monotonic()
            held = wait_while_held(self.ctx.settings.device_hold_file, stop)
            waited = arbiter.background_gate(max_wait, stop) or held
            if stop():  # the gate returned without starting a segment
                raise AuditStopped()
            if waited:
                yielded.inc(time.monotonic() - t0)

        return gate

    def plots_dir(self, job_id: str) -> Path:
        return self.settings.state_dir / "audits" / job_id / "plots"

    def _execute(self, job_id: str) -> None:
        """Audit thread: run the remaining batches, persisting after each, then the report."""
        job = self.store.get(job_id)
        assert job is not None
        gate = self._gate_for(job_id)
        try:
            task = AuditTask(
                job.spec,
                model_store=self.ctx.settings.model_store,
                data_root=self.ctx.settings.data_dir,
                device=self.ctx.device,
                gate=gate,
                steps=self.ctx.settings.solver_steps,
            )
        except AuditStopped:
            self._stopped(job_id)
            return
        except Exception as exc:
            log.warning("audit %s cannot start: %s", job_id, exc)
            self.store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        partial = job.partial or {"batches": []}
        batches: list[dict[str, Any]] = partial["batches"]
        done = {b["index"] for b in batches}
        samples = sum(len(b["labels"]) for b in batches)
        clean = robust = 0
        for b in batches:
            _, c, r = task.batch_counts(b)
            clean += c
            robust += r
        compute_s = job.compute_s
        session_t0 = time.monotonic()
        session_samples = 0
        try:
            for index in range(task.n_batches):
                if index in done:
                    continue
                gate()
                t0 = time.monotonic()
                res = task.run_batch(index)
                self.ctx.batcher.arbiter.background_done()  # no device work until the next gate
                dt = time.monotonic() - t0
                n, c, r = task.batch_counts(res)
                batches.append(res)
                samples += n
                clean += c
                robust += r
                compute_s += dt
                session_samples += n
                self.store.save_progress(
                    job_id,
                    {"batches": batches},
                    samples_done=samples,
                    robust_correct=robust,
                    clean_correct=clean,
                    compute_s=compute_s,
                )
                self.metrics.samples.inc(n)
                wall = time.monotonic() - session_t0
                self._live[job_id] = {"samples_per_s": session_samples / wall if wall else None}
            report = task.finalize(batches, self.plots_dir(job_id), elapsed_s=compute_s)
        except AuditStopped:
            self._stopped(job_id)
            return
        except Exception as exc:
            log.warning("audit %s failed: %s", job_id, traceback.format_exc())
            self.store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        finally:
            self.ctx.batcher.arbiter.background_done()  # whatever happened, free the device
        report["job"] = {"id": job_id, "compute_s": compute_s, "resumes": job.resumes}
        self.store.finish(job_id, "succeeded", report=report)
        log.info("audit %s finished: robust %d/%d", job_id, robust, samples)

    def _stopped(self, job_id: str) -> None:
        if self._cancel[job_id].is_set() or (
            (job := self.store.get(job_id)) is not None and job.cancel_requested
        ):
            self.store.finish(job_id, "cancelled")
            shutil.rmtree(self.plots_dir(job_id), ignore_errors=True)
            log.info("audit %s cancelled", job_id)
        else:
            log.info("audit %s paused for shutdown; it resumes on the next start", job_id)


def progress_of(job: Job, live: dict[str, Any]) -> dict[str, Any]:
    """The progress block of a job's status: samples, running accuracy with interval, ETA."""
    n = job.samples_done
    lo, hi = wilson_interval(job.robust_correct, n)
    rate = live.get("samples_per_s") or (n / job.compute_s if job.compute_s > 0 else None)
    left = job.samples_total - n
    eta = left / rate if rate and job.state in ("queued", "running") else None
    return {
        "samples_done": n,
        "samples_total": job.samples_total,
        "fraction": n / job.samples_total if job.samples_total else 0.0,
        "clean_acc": job.clean_correct / n if n else None,
        "robust_acc": job.robust_correct / n if n else None,
        "robust_acc_ci95": [lo, hi] if n else None,
        "eta_s": eta if job.state != "succeeded" else 0.0,
    }
