"""Overload and deadline paths against a deliberately small live server (batch 1, queue 2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deqguard.data import load_test
from service.imaging import encode_png
from tests.conftest import LiveServer, http, service_command, service_env

# live servers on shared, busy CPUs: generous per-test limit (behaviour, not speed, is tested)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tight_server(service_store: Path) -> Iterator[LiveServer]:
    server = LiveServer(
        service_command(),
        env=service_env(
            service_store,
            max_batch_size=1,
            max_batch_delay_ms=0,
            queue_size=2,
            max_images_per_request=4,
            default_preset="off",
        ),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pngs() -> list[bytes]:
    return [encode_png(img.numpy()) for img in load_test(n=8).images]


def _counter(url: str, name: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(http.get(url + "/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def _post(client: httpx.AsyncClient, url: str, png: bytes, **params: object):
    return client.post(
        url + "/v1/predict", content=png, headers={"Content-Type": "image/png"}, params=params
    )


def _blocker(client: httpx.AsyncClient, url: str, pngs: list[bytes]):
    """A request that keeps the device busy for a while: two images, preset strong (140 input
    gradient steps each), run one after the other (batch size 1)."""
    files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs[:2])]
    return client.post(url + "/v1/predict", files=files, params={"preset": "strong"})


def _wait_idle(url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = http.get(url + "/readyz").json()
        if r["in_flight"] == 0 and r["queue_depth"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("server did not go idle")


def test_queue_full_is_429_with_retry_after(tight_server: LiveServer, pngs: list[bytes]) -> None:
    url = tight_server.url
    before = _counter(url, "deqguard_rejections_total", reason="queue_full")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(*(_post(client, url, p, preset="fast") for p in pngs))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["reason"] == "queue_full"
    after = _counter(url, "deqguard_rejections_total", reason="queue_full")
    assert after - before == len(rejected)
    _wait_idle(url)
    assert (
        http.post(
            url + "/v1/predict", content=pngs[0], headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )


def test_deadline_passed_while_queued_is_504(tight_server: LiveServer, pngs: list[bytes]) -> None:
    url = tight_server.url
    before = _counter(url, "deqguard_images_total")
    late_before = _counter(url, "deqguard_rejections_total", reason="deadline_exceeded")

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=600) as client:
            blocker = asyncio.create_task(_blocker(client, url, pngs))
            await asyncio.sleep(0.2)
            by_field = await _post(client, url, pngs[2], deadline_ms=100)
            by_header = await client.post(
                url + "/v1/predict",
                content=pngs[2],
                headers={"Content-Type": "image/png", "X-Deadline-Ms": "100"},
            )
            return await blocker, by_field, by_header

    blocker, late, late2 = asyncio.run(run())
    assert blocker.status_code == 200
    for r in (late, late2):
        assert r.status_code == 504, r.text
        assert r.json()["error"]["reason"] == "deadline_exceeded"
    _wait_idle(url)
    assert _counter(url, "deqguard_images_total") - before == 2  # the late ones never ran
    assert _counter(url, "deqguard_rejections_total", reason="deadline_exceeded") - late_before == 2


def test_client_disconnect_cancels_queued_work(tight_server: LiveServer, pngs: list[bytes]) -> None:
    url = tight_server.url
    images_before = _counter(url, "deqguard_images_total")
    gone_before = _counter(url, "deqguard_rejections_total", reason="client_disconnected")

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=600) as client:
            blocker = asyncio.create_task(_blocker(client, url, pngs))
            await asyncio.sleep(0.2)
            async with httpx.AsyncClient(timeout=0.3) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await _post(impatient, url, pngs[2])
            return await blocker

    assert asyncio.run(run()).status_code == 200
    _wait_idle(url)
    assert (
        _counter(url, "deqguard_rejections_total", reason="client_disconnected") - gone_before == 1
    )
    assert _counter(url, "deqguard_images_total") - images_before == 2  # the blocker's only


def test_too_many_images_is_413(tight_server: LiveServer, pngs: list[bytes]) -> None:
    r = http.post(
        tight_server.url + "/v1/predict",
        files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs[:5])],
    )
    assert r.status_code == 413 and r.json()["error"]["field"] == "images"
