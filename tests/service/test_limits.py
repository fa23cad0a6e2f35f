"""Overload and deadline paths against a deliberately small live server (batch 1, queue 2)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deqguard.data import load_test
from service.imaging import encode_png
from tests._live import LiveServer, http
from tests.service._server import service_command, service_env

# live servers on shared, busy CPUs: generous per-test limit (behaviour, not speed, is tested)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def hold_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists the server starts no device work (DEQGUARD_DEVICE_HOLD_FILE):
    the test, not the machine's speed, decides when compute proceeds."""
    return tmp_path_factory.mktemp("hold") / "hold"


@pytest.fixture(scope="module")
def tight_server(service_store: Path, hold_file: Path) -> Iterator[LiveServer]:
    server = LiveServer(
        service_command(),
        env=service_env(
            service_store,
            max_batch_size=1,
            max_batch_delay_ms=0,
            queue_size=2,
            max_images_per_request=4,
            default_preset="off",
            device_hold_file=hold_file,
        ),
    )
    server.start()
    yield server
    hold_file.unlink(missing_ok=True)
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


async def _until(check: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
    """Poll ``check`` (a hang guard only: the condition is reached whatever the speed)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _readyz(url: str) -> dict[str, int]:
    return http.get(url + "/readyz").json()


async def _hold_with_blocker(
    client: httpx.AsyncClient, url: str, png: bytes, hold_file: Path
) -> asyncio.Task[httpx.Response]:
    """Hold the device, then send one image that takes it: returns once that image's batch
    has left the queue (it waits, held, on the device) and the queue is empty."""
    hold_file.touch()
    blocker = asyncio.create_task(_post(client, url, png))
    await _until(
        lambda: _readyz(url)["in_flight"] == 1 and _readyz(url)["queue_depth"] == 0,
        "the blocker to reach the held device",
    )
    return blocker


def _wait_idle(url: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _readyz(url)
        if r["in_flight"] == 0 and r["queue_depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError("server did not go idle")


def test_queue_full_is_429_with_retry_after(
    tight_server: LiveServer, pngs: list[bytes], hold_file: Path
) -> None:
    """One image held on the device, two fill the queue (size 2): every further one is 429."""
    url = tight_server.url
    before = _counter(url, "deqguard_rejections_total", reason="queue_full")

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=600) as client:
            blocker = await _hold_with_blocker(client, url, pngs[0], hold_file)
            queued = [asyncio.create_task(_post(client, url, p)) for p in pngs[1:3]]
            await _until(lambda: _readyz(url)["queue_depth"] == 2, "two queued images")
            rejected = await asyncio.gather(*(_post(client, url, p) for p in pngs[3:6]))
            hold_file.unlink()
            served = await asyncio.gather(blocker, *queued)
            return list(served), list(rejected)

    served, rejected = asyncio.run(run())
    assert [r.status_code for r in served] == [200, 200, 200]
    assert [r.status_code for r in rejected] == [429, 429, 429]
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["reason"] == "queue_full"
    after = _counter(url, "deqguard_rejections_total", reason="queue_full")
    assert after - before == 3
    _wait_idle(url)
    assert (
        http.post(
            url + "/v1/predict", content=pngs[0], headers={"Content-Type": "image/png"}
        ).status_code
        == 200
    )


def test_deadline_passed_while_queued_is_504(
    tight_server: LiveServer, pngs: list[bytes], hold_file: Path
) -> None:
    """Two requests with a 100 ms deadline (query field, header) queue behind a held batch; the
    device is released only after both have been answered, so neither may compute. (Nothing
    waits for both to be queued at once: on a slow machine the first may be dropped before the
    second arrives; either way each must get its 504 while the device is still held.)"""
    url = tight_server.url
    before = _counter(url, "deqguard_images_total")
    late_before = _counter(url, "deqguard_rejections_total", reason="deadline_exceeded")

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(timeout=600) as client:
            blocker = await _hold_with_blocker(client, url, pngs[0], hold_file)
            by_field = asyncio.create_task(_post(client, url, pngs[2], deadline_ms=100))
            by_header = asyncio.create_task(
                client.post(
                    url + "/v1/predict",
                    content=pngs[2],
                    headers={"Content-Type": "image/png", "X-Deadline-Ms": "100"},
                )
            )
            late = await by_field, await by_header  # answered while the device is held
            hold_file.unlink()
            return await blocker, *late

    blocker, late, late2 = asyncio.run(run())
    assert blocker.status_code == 200
    for r in (late, late2):
        assert r.status_code == 504, r.text
        assert r.json()["error"]["reason"] == "deadline_exceeded"
    _wait_idle(url)
    assert _counter(url, "deqguard_images_total") - before == 1  # the late ones never ran
    assert _counter(url, "deqguard_rejections_total", reason="deadline_exceeded") - late_before == 2


def test_client_disconnect_cancels_queued_work(
    tight_server: LiveServer, pngs: list[bytes], hold_file: Path
) -> None:
    """A client that gives up while its image is queued behind a held batch: the server notices,
    drops the image before compute and counts the disconnect."""
    url = tight_server.url
    images_before = _counter(url, "deqguard_images_total")
    gone_before = _counter(url, "deqguard_rejections_total", reason="client_disconnected")

    def gone() -> float:
        return _counter(url, "deqguard_rejections_total", reason="client_disconnected")

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(timeout=600) as client:
            blocker = await _hold_with_blocker(client, url, pngs[0], hold_file)
            # nothing can be answered while the device is held, so this times out for sure
            async with httpx.AsyncClient(timeout=0.5) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    await _post(impatient, url, pngs[2])
            await _until(lambda: gone() - gone_before == 1, "the disconnect to be noticed")
            hold_file.unlink()
            return await blocker

    assert asyncio.run(run()).status_code == 200
    _wait_idle(url)
    assert gone() - gone_before == 1
    assert _counter(url, "deqguard_images_total") - images_before == 1  # the blocker's only


def test_too_many_images_is_413(tight_server: LiveServer, pngs: list[bytes]) -> None:
    r = http.post(
        tight_server.url + "/v1/predict",
        files=[("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs[:5])],
    )
    assert r.status_code == 413 and r.json()["error"]["field"] == "images"
