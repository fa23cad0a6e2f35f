"""One device, two kinds of work: predict batches (priority) and background audits.

Without arbitration an audit thread and the device worker compute at the same time: on a CPU
their intra-op thread teams oversubscribe the cores (each spins on its own OpenMP team), so a
predict batch slows down many-fold even while the audit "yields". The arbiter makes device
compute mutually exclusive at a fine grain:

- the device worker wraps each predict batch in :meth:`DeviceArbiter.predict`: it claims the
  device, waits for the audit's current *segment* to end, computes, releases;
- an audit calls :meth:`DeviceArbiter.background_gate` before every f-evaluation (its segments
  are the work between two gates: one f-evaluation, forward or backward, and the small work
  around it). The gate waits while predict work is claimed or queued; after ``max_wait_s`` it
  stops waiting for *queued* work (so audits progress under sustained load) but never computes
  while a predict batch does;
- :meth:`DeviceArbiter.background_done` ends the audit's segment between batches and at the end.

A predict batch therefore waits for at most one audit segment, and the two never overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["DeviceArbiter"]

_POLL_S = 0.05  # upper bound between checks of stop conditions while waiting


class DeviceArbiter:
    """Mutual exclusion of device compute with priority for predict batches.

    Args:
        queued: how many predict images are waiting (the batcher's queue), read at audit gates.
        clock: the time source of ``max_wait_s`` and ``background_wait_s`` (tests pass one they
            move themselves, so a wait ends when the test says, not after real seconds).
    """

    def __init__(
        self,
        queued: Callable[[], int] = lambda: 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cv = threading.Condition()
        self._queued = queued
        self._clock = clock
        self._claims = 0  # predict batches that want or hold the device
        self._background_active = False  # an audit segment is computing
        self.background_wait_s = 0.0  # total time audits spent waiting (for metrics and tests)

    @contextmanager
    def predict(self, max_wait_s: float = 60.0) -> Iterator[None]:
        """Hold the device for one predict batch (device worker thread). Waits for the running
        audit segment, at most ``max_wait_s`` (a safety bound: segments are one f-evaluation)."""
        with self._cv:
            self._claims += 1
            deadline = self._clock() + max_wait_s
            while self._background_active and self._clock() < deadline:
                self._cv.wait(_POLL_S)
        try:
            yield
        finally:
            with self._cv:
                self._claims -= 1
                self._cv.notify_all()

    def background_gate(
        self, max_wait_s: float, should_stop: Callable[[], bool] = lambda: False
    ) -> bool:
        """Start the next audit segment once predict work allows; True if it had to wait.

        Raises nothing itself: when ``should_stop()`` turns true while waiting, returns at once
        without starting a segment (the caller raises its own stop exception).
        """
        with self._cv:
            self._background_active = False
            self._cv.notify_all()
            t0 = self._clock()
            waited = False
            while True:
                if should_stop():
                    return waited
                patient = self._clock() - t0 < max_wait_s
                if self._claims == 0 and (not patient or self._queued() == 0):
                    break
                waited = True
                self._cv.wait(_POLL_S)
            self._background_active = True
            if waited:
                self.background_wait_s += self._clock() - t0
            return waited

    def background_done(self) -> None:
        """End the audit's current segment (between batches, at the end, on errors)."""
        with self._cv:
            self._background_active = False
            self._cv.notify_all()

    @property
    def background_active(self) -> bool:
        return self._background_active
