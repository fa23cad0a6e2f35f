"""Device arbiter: predict batches and audit segments never compute at the same time, predict
goes first, audits still progress under sustained queued load, and stop requests are honoured."""

from __future__ import annotations

import threading
import time

from service.arbiter import DeviceArbiter


def _record(log: list[tuple[str, float, float]], who: str, seconds: float) -> None:
    t0 = time.monotonic()
    time.sleep(seconds)
    log.append((who, t0, time.monotonic()))


def test_predict_and_audit_segments_never_overlap() -> None:
    arbiter = DeviceArbiter()
    log: list[tuple[str, float, float]] = []
    stop = threading.Event()

    def audit() -> None:
        while not stop.is_set():
            arbiter.background_gate(max_wait_s=10.0, should_stop=stop.is_set)
            if stop.is_set():
                break
            _record(log, "audit", 0.003)
        arbiter.background_done()

    worker = threading.Thread(target=audit)
    worker.start()
    for _ in range(40):
        with arbiter.predict():
            _record(log, "predict", 0.002)
        time.sleep(0.001)
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
    kinds = {who for who, _, _ in log}
    assert kinds == {"audit", "predict"}  # both made progress
    spans = sorted(log, key=lambda r: r[1])
    for (w1, _, end1), (w2, start2, _) in zip(spans, spans[1:]):
        assert start2 >= end1 - 1e-4, f"{w1} and {w2} overlapped"


def test_audit_waits_for_queued_work_then_progresses_after_max_wait() -> None:
    queued = [3]
    arbiter = DeviceArbiter(lambda: queued[0])
    t0 = time.monotonic()
    assert arbiter.background_gate(max_wait_s=0.2) is True  # waited for the queue, then went
    assert time.monotonic() - t0 >= 0.2
    assert arbiter.background_active and arbiter.background_wait_s >= 0.2
    arbiter.background_done()
    queued[0] = 0
    assert arbiter.background_gate(max_wait_s=5.0) is False  # nothing queued: no wait
    arbiter.background_done()


def test_audit_never_starts_while_a_predict_batch_holds_the_device() -> None:
    arbiter = DeviceArbiter()
    started = threading.Event()
    release = threading.Event()

    def predict() -> None:
        with arbiter.predict():
            started.set()
            release.wait(10)

    t = threading.Thread(target=predict)
    t.start()
    started.wait(10)
    went: list[bool] = []
    audit = threading.Thread(target=lambda: went.append(arbiter.background_gate(max_wait_s=0.0)))
    audit.start()
    audit.join(timeout=0.3)
    assert audit.is_alive() and not arbiter.background_active  # max_wait 0 still waits for it
    release.set()
    audit.join(timeout=10)
    t.join(timeout=10)
    assert went == [True] and arbiter.background_active
    arbiter.background_done()


def test_predict_waits_for_the_running_audit_segment() -> None:
    arbiter = DeviceArbiter()
    arbiter.background_gate(max_wait_s=0.0)
    order: list[str] = []

    def predict() -> None:
        with arbiter.predict():
            order.append("predict")

    t = threading.Thread(target=predict)
    t.start()
    time.sleep(0.1)
    order.append("segment ends")
    arbiter.background_done()
    t.join(timeout=10)
    assert order == ["segment ends", "predict"]


def test_stop_request_returns_without_starting_a_segment() -> None:
    arbiter = DeviceArbiter(lambda: 1)
    flag = threading.Event()
    threading.Timer(0.1, flag.set).start()
    arbiter.background_gate(max_wait_s=60.0, should_stop=flag.is_set)
    assert flag.is_set() and not arbiter.background_active


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
