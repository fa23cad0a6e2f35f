"""Device arbiter: predict batches and audit segments never compute at the same time, predict
goes first, audits still progress under sustained queued load, and stop requests are honoured."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from service.arbiter import DeviceArbiter
from tests._virtual_time import ManualClock, wait_until

# The arbiter reads its clock in every round of its wait loops, so "the clock has been read
# again" is how a test knows a thread is waiting there (and not merely slow to start). The
# clocks never move unless a test moves them: no result depends on real time. Joins only guard
# against a hang.
_HANG_S = 60.0


class _Device:
    """Who computes now; records every time two parties were inside at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inside: list[str] = []
        self.overlaps: list[tuple[list[str], str]] = []
        self.segments: Counter[str] = Counter()

    @contextmanager
    def hold(self, who: str) -> Iterator[None]:
        with self._lock:
            if self.inside:
                self.overlaps.append((list(self.inside), who))
            self.inside.append(who)
            self.segments[who] += 1
        try:
            yield
        finally:
            with self._lock:
                self.inside.remove(who)


def _thread(target: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=target, daemon=True)  # daemon: a failed test cannot hang exit
    t.start()
    return t


def test_predict_and_audit_segments_never_overlap() -> None:
    """Rounds forced by the test: an audit segment is computing when a predict batch asks for
    the device (the segment lasts until the batch is provably waiting in predict(), or has got
    in, which is the bug); the audit then yields to the queued batch and computes its next
    segment only after the batch. Both progress every round and never compute together."""
    clock = ManualClock()
    queued = [0]
    arbiter = DeviceArbiter(lambda: queued[0], clock=clock)
    device = _Device()
    in_segment = threading.Semaphore(0)  # audit -> test: a segment is computing
    asked = threading.Semaphore(0)  # test -> audit: a predict batch is asking
    stop = threading.Event()
    rounds = 10

    def audit() -> None:
        while True:
            arbiter.background_gate(max_wait_s=_HANG_S, should_stop=stop.is_set)
            if stop.is_set():
                break
            with device.hold("audit"):
                in_segment.release()
                if not asked.acquire(timeout=_HANG_S) or stop.is_set():
                    break
                # predict() reads the clock for its deadline, then once per wait round
                reads = clock.reads
                wait_until(
                    lambda r=reads: clock.reads >= r + 2 or "predict" in device.inside,
                    "the predict batch to wait for the audit segment",
                )
        arbiter.background_done()

    worker = _thread(audit)
    for _ in range(rounds):
        assert in_segment.acquire(timeout=_HANG_S)
        queued[0] = 1  # the batch is queued: the audit must not start its next segment
        asked.release()
        with arbiter.predict():
            queued[0] = 0
            with device.hold("predict"):  # (if it got in early, the audit sees it and ends)
                wait_until(lambda: "audit" not in device.inside, "the audit segment to end")
    assert in_segment.acquire(timeout=_HANG_S)  # the audit went on after the last batch
    stop.set()
    asked.release()
    worker.join(timeout=_HANG_S)
    assert not worker.is_alive()
    assert device.overlaps == []
    assert device.segments == {"audit": rounds + 1, "predict": rounds}


def test_audit_waits_for_queued_work_then_progresses_after_max_wait() -> None:
    """With predict images queued, the gate waits, and goes once max_wait_s has passed on its
    clock (not before); the time it waited is accounted exactly. With nothing queued it goes
    at once."""
    clock = ManualClock(100.0)
    queued = [3]
    arbiter = DeviceArbiter(lambda: queued[0], clock=clock)
    went: list[bool] = []
    audit = _thread(lambda: went.append(arbiter.background_gate(max_wait_s=0.2)))
    # it reads t0, then the clock once per round: a third read means it has waited a round
    wait_until(lambda: clock.reads >= 3 or bool(went), "the gate to poll")
    assert went == []
    clock.set(100.15)
    reads = clock.reads
    wait_until(lambda: clock.reads >= reads + 3 or bool(went), "the gate to poll at 100.15")
    assert went == [] and not arbiter.background_active  # 0.15 s: still waiting
    clock.set(100.2)
    audit.join(timeout=_HANG_S)
    assert went == [True]  # waited for the queue, then went
    assert arbiter.background_active and arbiter.background_wait_s == pytest.approx(0.2)
    arbiter.background_done()
    queued[0] = 0
    assert arbiter.background_gate(max_wait_s=5.0) is False  # nothing queued: no wait
    assert arbiter.background_wait_s == pytest.approx(0.2)
    arbiter.background_done()


def test_audit_never_starts_while_a_predict_batch_holds_the_device() -> None:
    """Even with max_wait_s 0 (impatient), the gate waits for a predict batch that computes."""
    clock = ManualClock()
    arbiter = DeviceArbiter(clock=clock)
    started = threading.Event()
    release = threading.Event()

    def predict() -> None:
        with arbiter.predict():
            started.set()
            release.wait(_HANG_S)

    t = _thread(predict)
    assert started.wait(_HANG_S)
    went: list[bool] = []
    reads = clock.reads
    audit = _thread(lambda: went.append(arbiter.background_gate(max_wait_s=0.0)))
    # the gate reads t0, then the clock once per round: a third read means it has waited a round
    wait_until(lambda: clock.reads >= reads + 3 or bool(went), "the gate to poll")
    assert went == [] and not arbiter.background_active
    release.set()
    audit.join(timeout=_HANG_S)
    t.join(timeout=_HANG_S)
    assert went == [True] and arbiter.background_active
    arbiter.background_done()


def test_predict_waits_for_the_running_audit_segment() -> None:
    clock = ManualClock()
    arbiter = DeviceArbiter(clock=clock)
    arbiter.background_gate(max_wait_s=0.0)
    order: list[str] = []

    def predict() -> None:
        with arbiter.predict():
            order.append("predict")

    reads = clock.reads
    t = _thread(predict)
    # the deadline read, then one per wait round: a third read means it has waited a round
    wait_until(lambda: clock.reads >= reads + 3 or bool(order), "predict() to wait")
    order.append("segment ends")
    arbiter.background_done()
    t.join(timeout=_HANG_S)
    assert order == ["segment ends", "predict"]


def test_stop_request_returns_without_starting_a_segment() -> None:
    """A gate waiting for queued work (with all the patience in the world) returns as soon as
    should_stop() turns true, without starting a segment."""
    clock = ManualClock()
    arbiter = DeviceArbiter(lambda: 1, clock=clock)
    flag = threading.Event()
    went: list[bool] = []
    audit = _thread(
        lambda: went.append(arbiter.background_gate(max_wait_s=60.0, should_stop=flag.is_set))
    )
    wait_until(lambda: clock.reads >= 3 or bool(went), "the gate to poll")
    assert went == [] and not arbiter.background_active  # waiting for the queue
    reads = clock.reads
    flag.set()
    # a second read after the flag is set comes from a round that saw the flag: it should have
    # returned instead
    wait_until(lambda: bool(went) or clock.reads >= reads + 2, "the gate to return")
    audit.join(timeout=_HANG_S)
    assert went == [True] and not arbiter.background_active
    # asked to stop before it starts: returns at once, without waiting
    assert arbiter.background_gate(max_wait_s=60.0, should_stop=lambda: True) is False
    assert not arbiter.background_active


def test_device_thread_keeps_its_torch_threads_when_an_audit_thread_uses_one() -> None:
    """The audit threads run torch with 1 thread (a second multi-threaded OpenMP team throttles
    every team's spin-waiting); that must not change the device thread's count."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from service.admin.settings import AdminSettings
    from service.batcher import Batcher

    assert AdminSettings().audit_torch_threads == 1
    before = torch.get_num_threads()
    batcher = Batcher(lambda *a: [], max_batch=1, max_delay_s=0.0, queue_size=1, torch_threads=2)
    try:
        assert batcher.executor.submit(torch.get_num_threads).result() == 2
        audit = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
        x = torch.rand(64, 64)
        assert audit.submit(lambda: (x @ x, torch.get_num_threads())[1]).result() == 1
        audit.shutdown()
        assert batcher.executor.submit(torch.get_num_threads).result() == 2
    finally:
        batcher.executor.shutdown()
        torch.set_num_threads(before)


def test_device_threads_default_to_one(monkeypatch) -> None:  # noqa: ANN001
    """The default thread policy (docs/BENCHMARKS.md, 'Device threads on a shared CPU'): the
    served device thread runs torch with 1 thread unless DEQGUARD_TORCH_THREADS says otherwise,
    whatever torch's process-wide default is."""
    import torch

    from service.batcher import Batcher
    from service.settings import load_settings

    monkeypatch.delenv("DEQGUARD_TORCH_THREADS", raising=False)
    settings = load_settings()
    assert settings.torch_threads == 1
    monkeypatch.setenv("DEQGUARD_TORCH_THREADS", "0")
    assert load_settings().torch_threads == 0  # 0 still means torch's default
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    batcher = Batcher(
        lambda *a: [],
        max_batch=1,
        max_delay_s=0.0,
        queue_size=1,
        torch_threads=settings.torch_threads,
    )
    try:
        assert batcher.executor.submit(torch.get_num_threads).result() == 1
    finally:
        batcher.executor.shutdown()
        torch.set_num_threads(before)
