"""SIGTERM: readiness turns false, new work gets 503, in-flight work finishes, exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from deqguard.data import load_test
from service.imaging import encode_png
from tests._live import LiveServer, http
from tests.service._server import service_command, service_env

# live servers on shared, busy CPUs: generous per-test limit (behaviour, not speed, is tested)
pytestmark = pytest.mark.timeout(900)


def test_sigterm_drains_in_flight_work(service_store: Path, tmp_path: Path) -> None:
    """Three images in flight (one held on the device, two queued: the test holds the device,
    so they are still in flight at SIGTERM whatever the machine's speed); after SIGTERM the
    server is unready and refuses new work, then answers all three once released, and exits 0."""
    hold = tmp_path / "hold"
    hold.touch()
    server = LiveServer(
        service_command(),
        env=service_env(
            service_store,
            max_batch_size=1,
            drain_delay_s=1.5,
            drain_grace_s=1800,
            device_hold_file=hold,
        ),
    ).start()
    try:
        url = server.url
        pngs = [encode_png(img.numpy()) for img in load_test(n=3).images]
        results: list[int] = []

        def call(png: bytes) -> None:
            r = http.post(
                url + "/v1/predict",
                content=png,
                headers={"Content-Type": "image/png"},
            )
            results.append(r.status_code)

        threads = [threading.Thread(target=call, args=(p,)) for p in pngs]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while http.get(url + "/readyz").json()["in_flight"] < 3:
            assert time.monotonic() < deadline, "requests did not arrive"  # hang guard
            time.sleep(0.05)
        assert not results  # held: nothing can have finished

        server.signal(signal.SIGTERM)
        while http.get(url + "/readyz").status_code != 503:  # the signal is handled async
            assert time.monotonic() < deadline, "SIGTERM not handled"
            time.sleep(0.05)
        ready = http.get(url + "/readyz")
        assert ready.status_code == 503 and ready.json()["draining"] is True
        assert http.get(url + "/v2/health/ready").status_code == 503
        new = http.post(url + "/v1/predict", content=pngs[0], headers={"Content-Type": "image/png"})
        assert new.status_code == 503 and new.json()["error"]["reason"] == "draining"
        assert not results  # still held
        hold.unlink()  # release the device: the drain lets in-flight work finish

        for t in threads:
            t.join(timeout=1800)
        assert results == [200, 200, 200]
        assert server.wait(timeout=600) == 0
    finally:
        server.stop()


# Work that outlives the grace by construction, whatever the machine: one image, N = 256 solver
# steps, an intervention after every step (Tf = 1) of R = 10,000 input-gradient steps each:
# 2.56 million gradient steps, each a forward and a backward through the stem, f's outer part
# and the head (dozens of kernels and an autograd call). Even at an unreachable 5 us per step
# that is 12.8 s, over the exit bound below; in practice it is hours (a gradient step
# of this model took 20-50 ms on the project's shared 2-core CPU, and well over 100 us anywhere).
_SLOW = {"R": 10_000, "Tf": 1}
_STEPS = 256
_GRACE_S = 1.0
_EXIT_BOUND_S = _GRACE_S + 10.0


def test_sigterm_past_the_grace_answers_503_and_stops_the_device(service_store: Path) -> None:
    """Requests that outlive the drain grace (one computing, one queued behind it) get the
    service's JSON 503 (``shutting_down``), not uvicorn's plain-text 500 after twice the grace,
    and the device stops the batch at its next step: the process exits 0 within the grace plus
    a few seconds instead of when the batch would have ended."""
    server = LiveServer(
        service_command(),
        env=service_env(
            service_store,
            max_batch_size=1,
            max_batch_delay_ms=1,
            solver_steps=_STEPS,
            max_defense_steps=_SLOW["R"],
            max_request_grad_steps=0,  # no work cap: the point is a request that runs long
            drain_grace_s=_GRACE_S,
        ),
    ).start()
    try:
        url = server.url
        png = encode_png(load_test(n=1).images[0].numpy())
        raw = {"content": png, "headers": {"Content-Type": "image/png"}}
        answers: list[httpx.Response | BaseException] = []

        def call() -> None:
            try:
                answers.append(http.post(url + "/v1/predict", params=_SLOW, timeout=300, **raw))
            except BaseException as exc:  # reported by the asserts below
                answers.append(exc)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while True:  # one computing (taken off the queue), one queued behind it
            ready = http.get(url + "/readyz").json()
            if ready["in_flight"] == 2 and ready["queue_depth"] == 1:
                break
            assert time.monotonic() < deadline, f"requests did not arrive: {ready}"
            time.sleep(0.05)

        sent = time.monotonic()
        server.signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert len(answers) == 2, answers
        for r in answers:
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 503, r.text
            assert r.headers["content-type"] == "application/json"
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["reason"] == "shutting_down"
        assert server.wait(timeout=max(0.1, _EXIT_BOUND_S - (time.monotonic() - sent))) == 0
        assert "answered 503" in server.log()
    finally:
        server.stop()
