"""Clocks for tests that must not depend on how fast the machine is.

- :class:`VirtualTimeLoop` is an asyncio event loop whose ``time()`` is a :class:`VirtualClock`.
  Whenever nothing is ready to run and no executor thread is running real code, it jumps virtual
  time to the next timer or to the next moment a fake device call (``clock.sleep``) ends. So
  ``asyncio.sleep``/``wait_for`` and fake compute take exact virtual time and no real time,
  whatever the load: a test of a time-based policy (the batcher's) sees the same timeline on an
  idle laptop and on a CI box with both cores busy.
- :class:`ManualClock` only moves when the test sets it, and counts its reads, so a test can wait
  until a thread is polling it (it is in its wait loop) instead of sleeping and hoping.

Every thread whose work the virtual loop waits for must be started with ``run_in_executor`` on
that loop (an explicit executor). A call queued in a ThreadPoolExecutor whose threads all hold
calls does not hold virtual time back (it starts when one of them ends).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import selectors
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["ManualClock", "VirtualClock", "VirtualTimeLoop", "run_virtual", "wait_until"]

T = TypeVar("T")

_SLICE_S = 0.05  # real seconds between checks while an executor thread runs real code
_HANG_S = 60.0  # real seconds of executor work that can only be a hang
_local = threading.local()  # .clock: the VirtualClock whose executor call this thread runs


class _Pool:
    """Executor calls of one executor: submitted and not started, started and not done."""

    def __init__(self, max_workers: int | None) -> None:
        self.max_workers = max_workers
        self.pending = 0
        self.started = 0

    def stuck(self) -> bool:
        """Its pending calls cannot start: every thread holds a call (they wait on the clock)."""
        return self.max_workers is not None and self.started >= self.max_workers


class VirtualClock:
    """Virtual seconds, moved only by :class:`VirtualTimeLoop`; callable like time.monotonic.

    Starts at 1000 (not 0): code may treat a zero timestamp as "never" (the batcher does).
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._cond = threading.Condition()
        self._running = 0  # executor calls running real code (started, not sleeping, not done)
        self._pools: dict[int, _Pool] = {}
        self._wakes: list[float] = []  # heap: when each sleeping executor call ends
        self._closed = False

    def __call__(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        """Block this executor thread for ``seconds`` of virtual time (fake device compute)."""
        if getattr(_local, "clock", None) is not self:
            raise RuntimeError("VirtualClock.sleep is for executor calls of its VirtualTimeLoop")
        if seconds <= 0:
            return
        with self._cond:
            wake = self._now + seconds
            heapq.heappush(self._wakes, wake)
            self._running -= 1
            self._cond.notify_all()
            while self._now < wake:
                # hang guard: only the loop moves virtual time, so a loop thread blocked on this
                # call (or a closed loop) would leave it asleep for ever
                if self._closed or not self._cond.wait(_HANG_S):
                    self._wakes.remove(wake)
                    heapq.heapify(self._wakes)
                    self._running += 1
                    raise RuntimeError(
                        "virtual time stood still while this call slept: the event loop is "
                        "closed or its thread is blocked waiting for this call"
                    )
            # _advance counted this call as running again when it popped ``wake``

    def close(self) -> None:
        """Fail the calls still asleep (the loop that would wake them is gone)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ---------------------------------------------------------------- used by the loop
    def _submitted(self, executor: concurrent.futures.Executor) -> _Pool:
        with self._cond:
            pool = self._pools.get(id(executor))
            if pool is None:
                pool = _Pool(getattr(executor, "_max_workers", None))
                self._pools[id(executor)] = pool
            pool.pending += 1
            return pool

    def _started(self, pool: _Pool) -> None:
        with self._cond:
            pool.pending -= 1
            pool.started += 1
            self._running += 1

    def _done(self, pool: _Pool, started: bool) -> None:
        with self._cond:
            if started:
                pool.started -= 1
                self._running -= 1
            else:  # cancelled before it started
                pool.pending -= 1
            self._cond.notify_all()

    def _quiet(self) -> bool:
        return self._running == 0 and all(p.pending == 0 or p.stuck() for p in self._pools.values())

    def _settle(self, timeout: float) -> bool:
        """Wait until no executor call runs (or is about to run) real code; False if one does."""
        with self._cond:
            return self._cond.wait_for(self._quiet, timeout)

    def _next_wake(self) -> float | None:
        with self._cond:
            return self._wakes[0] if self._wakes else None

    def _advance(self, to: float) -> None:
        with self._cond:
            self._now = max(self._now, to)
            while self._wakes and self._wakes[0] <= self._now:
                heapq.heappop(self._wakes)
                self._running += 1  # before it wakes, so the loop never races ahead of it
            self._cond.notify_all()


class _VirtualSelector:
    """The loop's selector, except that a wait for a timer skips ahead in virtual time."""

    def __init__(self, inner: selectors.BaseSelector, clock: VirtualClock) -> None:
        self._inner = inner
        self._clock = clock
        self._busy_since: float | None = None  # real time since executor calls keep running
        self.loop: VirtualTimeLoop | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
        events = self._inner.select(0)
        if events or timeout == 0:
            return events
        clock = self._clock
        if not clock._settle(_SLICE_S):  # a thread runs real code: serve the loop meanwhile
            now = time.monotonic()
            self._busy_since = self._busy_since or now
            if now - self._busy_since > _HANG_S:
                raise RuntimeError(f"virtual-time loop: executor calls ran {_HANG_S} s for real")
            return self._inner.select(0)
        self._busy_since = None
        events = self._inner.select(0)  # a finished call posted its result before settling
        if events:
            return events
        # nothing ready, nothing computing: the next thing that happens is a timer or the end of
        # a sleeping executor call, whichever is first
        assert self.loop is not None
        target = clock._next_wake()
        scheduled = self.loop._scheduled  # heap of TimerHandles; cancelled heads already gone
        if scheduled:
            when = scheduled[0].when()
            target = when if target is None else min(target, when)
        if target is None:
            raise RuntimeError(
                "virtual-time loop deadlocked: no timer, no executor call, nothing ready "
                "(threads must be started with run_in_executor on this loop)"
            )
        clock._advance(target)
        clock._settle(_SLICE_S)  # let the calls that ended post their results
        return self._inner.select(0)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a :class:`VirtualClock` (``loop.clock``)."""

    def __init__(self) -> None:
        self.clock = VirtualClock()
        selector = _VirtualSelector(selectors.DefaultSelector(), self.clock)
        super().__init__(selector)  # type: ignore[arg-type]
        selector.loop = self

    def time(self) -> float:
        return self.clock()

    def run_in_executor(
        self, executor: concurrent.futures.Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """Like the base loop, but counts the call as running until its result is posted."""
        self._check_closed()  # type: ignore[attr-defined]
        if executor is None:
            raise ValueError("VirtualTimeLoop needs an explicit executor")
        clock = self.clock
        pool = clock._submitted(executor)
        started = False

        def call() -> T:
            nonlocal started
            started = True
            clock._started(pool)
            _local.clock = clock
            try:
                return func(*args)
            finally:
                _local.clock = None

        try:
            cf = executor.submit(call)
        except BaseException:
            clock._done(pool, started=False)
            raise
        fut = asyncio.wrap_future(cf, loop=self)  # registers the callback that posts the result
        cf.add_done_callback(lambda _: clock._done(pool, started))  # ...so this one runs after it
        return fut


def run_virtual(main: Callable[[VirtualClock], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main(clock))`` on a fresh :class:`VirtualTimeLoop`."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, VirtualTimeLoop)
        try:
            return runner.run(main(loop.clock))
        finally:
            loop.clock.close()


class ManualClock:
    """A clock that moves only when the test calls :meth:`set`; counts how often it is read."""

    def __init__(self, now: float = 0.0) -> None:
        self._now = now
        self._reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._reads += 1
            return self._now

    @property
    def reads(self) -> int:
        with self._lock:
            return self._reads

    def set(self, now: float) -> None:
        with self._lock:
            self._now = now


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """Poll until ``predicate()`` holds; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(0.001)
