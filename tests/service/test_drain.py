"""SIGTERM: readiness turns false, new work gets 503, in-flight work finishes, exit code 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

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
