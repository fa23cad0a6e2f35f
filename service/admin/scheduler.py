"""Schedules audit jobs: at most ``max_concurrent_audits`` at once, each on its own thread,
running the core's audit loop (``deqguard.audit.AuditRunner.run``) with the job table as its
record store, so that a restart resumes from the last finished batch.

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
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deqguard.audit import AuditCancelled, AuditConfig, wilson_interval
from deqguard.store import read_manifest
from service.admin.audits import ArbiterGate, JobRecords, audit_config, finish_report, open_audit
from service.admin.jobs import AuditJob, JobStore
from service.admin.metrics import AdminMetrics
from service.admin.settings import AdminSettings
from service.context import ServiceContext

__all__ = ["AuditScheduler", "progress_of"]

log = logging.getLogger("deqguard.admin")


class AuditScheduler:
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

    def cancel(self, job_id: str) -> AuditJob | None:
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

    def _gate_for(self, job_id: str) -> ArbiterGate:
        cancel = self._cancel[job_id]
        return ArbiterGate(
            self.ctx.batcher.arbiter,
            self.ctx.settings.device_hold_file,
            self.settings.audit_yield_max_s,
            lambda: cancel.is_set() or self._shutdown.is_set(),
            self.metrics.yield_seconds,
        )

    def plots_dir(self, job_id: str) -> Path:
        return self.settings.state_dir / "audits" / job_id / "plots"

    def _config(self, job: AuditJob) -> AuditConfig:
        """The configuration validated when the job was created (jobs created before configs
        were stored: built from the spec, as it was then)."""
        if job.config is not None:  # on the device this server has now
            return replace(AuditConfig.from_dict(job.config), device=str(self.ctx.device))
        manifest = read_manifest(self.ctx.settings.model_store, job.spec["model"])
        steps = self.ctx.resolver.steps_of(manifest)
        return audit_config(job.spec, steps, str(self.ctx.device))

    def _progress(self, job_id: str) -> Any:
        """Per batch: the samples counter and this session's rate (for the ETA)."""
        session = {"samples": 0}

        def progress(p: dict[str, Any]) -> None:
            session["samples"] += p["batch_size"]
            self.metrics.samples.inc(p["batch_size"])
            wall = p["elapsed_s"]
            self._live[job_id] = {"samples_per_s": session["samples"] / wall if wall else None}

        return progress

    def _execute(self, job_id: str) -> None:
        """Audit thread: the core audit loop on this job's records, then the report."""
        job = self.store.get(job_id)
        assert job is not None
        settings = self.ctx.settings
        try:
            audit = open_audit(
                job.spec,
                self._config(job),
                model_store=settings.model_store,
                data_root=settings.data_dir,
                device=self.ctx.device,
                gate=self._gate_for(job_id),
            )
        except Exception as exc:
            log.warning("audit %s cannot start: %s", job_id, exc)
            self.store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        records = JobRecords(self.store, job)
        try:
            report = audit.run(store=records, progress=self._progress(job_id))
            report = finish_report(report, job.spec, self.plots_dir(job_id))
        except AuditCancelled:
            self._stopped(job_id)
            return
        except Exception as exc:
            log.warning("audit %s failed: %s", job_id, traceback.format_exc())
            self.store.finish(job_id, "failed", error=f"{type(exc).__name__}: {exc}")
            return
        report["job"] = {"id": job_id, "compute_s": report["elapsed_s"], "resumes": job.resumes}
        self.store.finish(job_id, "succeeded", report=report)
        done = self.store.get(job_id)
        robust, samples = (done.robust_correct, done.samples_done) if done else (0, 0)
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


def progress_of(job: AuditJob, live: dict[str, Any]) -> dict[str, Any]:
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
