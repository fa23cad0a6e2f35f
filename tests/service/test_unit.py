"""Service parts without a server: batcher, image decoding, settings, the app factory."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import APIRouter, Depends
from PIL import Image

from service.batcher import Batcher, Job
from service.errors import (
    BatchFailed,
    DeadlineExceeded,
    NotReady,
    PayloadTooLarge,
    QueueFull,
)
from service.imaging import decode_image, encode_png
from service.settings import ServiceSettings, format_settings_error, load_settings
from tests._virtual_time import VirtualClock, run_virtual


# --------------------------------------------------------------------------------- batcher
# The batcher's policy is time-based, so these tests run it on a virtual-time event loop with a
# fake device whose compute takes virtual time (tests/_virtual_time.py): every wait, arrival and
# compute ends at an exact virtual moment, and batch composition and queue times are the same on
# any machine under any load. Times below are seconds after the test's t0.
def _job(clock: VirtualClock, tag: float, n: int = 1, deadline_s: float = 30.0) -> Job:
    return Job(
        model="m",
        images=torch.full((n, 3, 32, 32), tag),
        params=[None] * n,
        deadline=clock() + deadline_s,
        future=asyncio.get_running_loop().create_future(),
        enqueued=clock(),
    )


class _Device:
    """Fake runner: answers each image with its tag after ``delay`` virtual seconds (raising
    after them when ``poison`` is in the batch); records batch sizes and compute spans."""

    def __init__(self, clock: VirtualClock, delay: float = 0.0, poison: float | None = None):
        self.clock = clock
        self.delay = delay
        self.poison = poison
        self.t0 = clock()
        self.calls: list[int] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) - t0

    def __call__(self, model: str, images: torch.Tensor, params: list) -> tuple[list[float], str]:
        start = self.clock() - self.t0
        self.calls.append(images.shape[0])
        self.clock.sleep(self.delay)
        self.spans.append((start, self.clock() - self.t0))
        tags = images[:, 0, 0, 0].tolist()
        if self.poison is not None and self.poison in tags:
            raise RuntimeError("CUDA out of memory (simulated)")
        return tags, "served"

    @property
    def starts(self) -> list[float]:
        return [round(a, 6) for a, _ in sorted(self.spans)]


def test_batcher_batches_and_splits_results() -> None:
    """Three jobs at once, 6 images < max_batch 8: they wait max_delay for company (no more),
    share one batch, and each gets its own outputs."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock)
        b = Batcher(device, max_batch=8, max_delay_s=0.05, queue_size=64, clock=clock)
        b.start()
        jobs = [_job(clock, float(i), n=2) for i in range(3)]
        for j in jobs:
            b.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs))
        assert device.calls == [6]
        assert [r.outputs for r in results] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
        assert all(r.batch_size == 6 and r.model == "served" for r in results)
        assert [r.queue_s for r in results] == pytest.approx([0.05] * 3, abs=1e-9)
        await b.stop()

    run_virtual(main)


@pytest.mark.parametrize(
    ("fill_fraction", "calls", "second_start"),
    [(0.0, [4, 4, 4, 4], 0.401), (0.5, [4, 8, 4], 0.421)],
)
def test_under_load_a_batch_waits_for_answered_clients_only_when_asked(
    fill_fraction: float, calls: list[int], second_start: float
) -> None:
    """Closed loop, 8 clients of 2 requests, batches of up to 8, 0.4 s of compute: 4 clients
    start at 0, 4 arrive at 0.1 while the first batch (0.001-0.401) computes. Without filling,
    the second half starts alone when the device frees up and the batches alternate between the
    halves; with it (fill 0.2 s, 4 arrivals in 0.4 s expect company), the first half's clients,
    answered and back 0.02 s later, join the second half: one full batch at 0.421, not at the
    end of the 0.2 s fill (it is full)."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.4)
        b = Batcher(
            device,
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=fill_fraction,
            clock=clock,
        )
        b.start()

        async def client(tag: float, start_s: float) -> None:
            await asyncio.sleep(start_s)
            for _ in range(2):
                job = _job(clock, tag)
                b.submit(job)
                await job.future
                await asyncio.sleep(0.02)  # the client's turnaround

        await asyncio.gather(*(client(float(i), 0.0 if i < 4 else 0.1) for i in range(8)))
        assert device.calls == calls
        assert device.starts[:2] == [0.001, second_start]
        await b.stop()

    run_virtual(main)


def test_filling_ends_when_the_answered_clients_pause() -> None:
    """As above with filling, but only 2 of the 4 answered clients come back (at 0.421): the
    batch does not wait out the 0.2 s fill for company that is not coming; it starts once
    arrivals pause for fill_gap_s (4 ms), at 0.425."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.4)
        b = Batcher(
            device, max_batch=8, max_delay_s=0.001, queue_size=64, fill_fraction=0.5, clock=clock
        )
        b.start()

        async def client(tag: float, start_s: float, requests: int) -> None:
            await asyncio.sleep(start_s)
            for _ in range(requests):
                job = _job(clock, tag)
                b.submit(job)
                await job.future
                await asyncio.sleep(0.02)

        await asyncio.gather(
            *(client(float(i), 0.0 if i < 4 else 0.1, 2 if i < 2 else 1) for i in range(8))
        )
        assert device.calls == [4, 6] and device.starts == [0.001, 0.425]
        await b.stop()

    run_virtual(main)


@pytest.mark.parametrize(
    ("fill_fraction", "calls"),
    [(0.0, [8, 1, 7, 1, 7, 1, 7, 1, 7]), (0.5, [8, 1, 8, 8, 8, 7])],
)
def test_after_a_full_batch_the_next_waits_for_the_clients_it_answered(
    fill_fraction: float, calls: list[int]
) -> None:
    """Closed loop, 8 clients of 5 requests, batches of up to 8, 0.3 s of compute, all eight
    start together (nobody is queued while the first batch computes): the answered clients come back spread over 30 ms (client i after
    2 + 4i ms). Without filling, the first to return starts a batch alone and the load stays
    split 1 + 7; with it, as soon as an arrival rate is known (the 7 that arrived during the
    second batch), each batch waits for all eight (every gap is under fill_gap_s 20 ms); the
    last one lacks client 0, which is done."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.3)
        b = Batcher(
            device,
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=fill_fraction,
            fill_gap_s=0.02,
            clock=clock,
        )
        b.start()

        async def client(i: int) -> None:
            for _ in range(5):
                job = _job(clock, float(i))
                b.submit(job)
                await job.future
                await asyncio.sleep(0.002 + 0.004 * i)  # staggered returns

        await asyncio.gather(*(client(i) for i in range(8)))
        await b.stop()
        assert device.calls == calls

    run_virtual(main)


def test_sparse_requests_that_meet_a_busy_device_do_not_wait_to_fill() -> None:
    """One request every 0.4 s, each computing 0.5 s: a request that arrives while the device is
    busy starts as soon as it frees up, because no company is expected within the 0.25 s fill."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.5)
        b = Batcher(
            device,
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=0.5,  # fill after a 0.5 s batch: 0.25 s
            clock=clock,
        )
        b.start()
        jobs = []
        for i in range(3):
            jobs.append(_job(clock, float(i)))
            b.submit(jobs[-1])
            await asyncio.sleep(0.4)  # the next one arrives while this one computes
        results = await asyncio.gather(*(j.future for j in jobs))
        assert device.calls == [1, 1, 1]
        assert b._busy_rate * b.fill_wait_s() < 1.0 and b.fill_wait_s() == 0.25
        # the first waits max_delay, the others only for the batch ahead (which frees the device
        # at 0.501 and 1.001), never the extra 0.25 s fill
        queue_s = [r.queue_s for r in results]
        assert queue_s == pytest.approx([0.001, 0.101, 0.201], abs=1e-9)
        await b.stop()

    run_virtual(main)


def test_failing_batch_is_split_and_fails_only_its_own_request() -> None:
    async def main(clock: VirtualClock) -> None:
        failures: list[int] = []
        device = _Device(clock, poison=5.0)
        b = Batcher(
            device,
            max_batch=8,
            max_delay_s=0.05,
            queue_size=64,
            on_failure=lambda: failures.append(1),
            clock=clock,
        )
        b.start()
        jobs = [_job(clock, float(i)) for i in range(8)]
        for j in jobs:
            b.submit(j)
        done = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        for i, r in enumerate(done):
            if i == 5:
                assert isinstance(r, BatchFailed) and "out of memory" in str(r)
            else:
                assert r.outputs == [float(i)]
        # 8 fails; 0-3 pass, 4-7 fail; 4-5 fail; 4 passes, 5 fails; 6-7 pass
        assert device.calls == [8, 4, 4, 2, 1, 1, 2] and len(failures) == 4
        # the worker survives
        again = _job(clock, 1.0)
        b.submit(again)
        assert (await again.future).outputs == [1.0]
        await b.stop()

    run_virtual(main)


def test_queue_bound_deadline_and_cancel() -> None:
    """One image per batch, 0.3 s each. While the first computes, four jobs queue (the bound):
    one whose deadline (0.15) passes before the device frees up at 0.3, one whose deadline (1.0)
    does not, one withdrawn with cancel(), one whose handler gave up (its future cancelled, the
    job left queued); a fifth is refused with 429. Only the one on time reaches the device."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.3)
        b = Batcher(device, max_batch=1, max_delay_s=0.0, queue_size=4, clock=clock)
        b.start()
        first = _job(clock, 0.0)
        b.submit(first)
        await asyncio.sleep(0.05)
        assert first.started and device.calls == [1]  # computing until 0.3
        late = _job(clock, 1.0, deadline_s=0.1)
        on_time = _job(clock, 2.0, deadline_s=0.95)
        cancelled = _job(clock, 3.0)
        left = _job(clock, 4.0)
        for j in (late, on_time, cancelled, left):
            b.submit(j)
        with pytest.raises(QueueFull) as full:
            b.submit(_job(clock, 5.0))
        assert full.value.headers["Retry-After"] == "1"  # 4 images x 0.05 s, rounded up
        assert b.cancel(cancelled) and b.queued_images == 3
        assert cancelled.future.cancelled() and not b.cancel(cancelled)
        left.future.cancel()  # the client went away; the job stays queued until taken
        assert (await first.future).outputs == [0.0]
        with pytest.raises(DeadlineExceeded):
            await late.future
        result = await on_time.future
        assert result.outputs == [2.0] and result.queue_s == pytest.approx(0.25, abs=1e-9)
        await asyncio.sleep(0.1)  # the device is free again at 0.6: what is left is taken
        assert device.calls == [1, 1] and device.starts == [0.0, 0.3]
        assert b.queued_images == 0 and not left.started
        await b.stop()

    run_virtual(main)


# --------------------------------------------------------------------------------- imaging
def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_32x32_rgb_png_is_exact() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    out = decode_image(encode_png(arr), "x", max_pixels=10_000)
    assert out.dtype == np.uint8 and (out == arr).all()


def test_modes_sizes_and_alpha() -> None:
    red = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent -> white
    out = decode_image(_encode(red), "p", max_pixels=10_000)
    assert out.shape == (3, 32, 32) and (out == 255).all()
    grey = decode_image(_encode(Image.new("L", (10, 90), 77)), "p", max_pixels=10_000)
    assert (grey == 77).all()
    cmyk = decode_image(_encode(Image.new("CMYK", (40, 40)), "JPEG"), "p", max_pixels=10_000)
    assert cmyk.shape == (3, 32, 32)


def test_pixel_limit_and_decompression_bomb_guard() -> None:
    data = _encode(Image.new("1", (300, 300)))
    with pytest.raises(PayloadTooLarge, match="90000 pixels"):
        decode_image(data, "img", max_pixels=50_000)
    # Pillow's guard is set to the same limit: a header claiming a huge image fails early
    assert Image.MAX_IMAGE_PIXELS == 50_000


# --------------------------------------------------------------------------------- settings
def test_settings_from_env_and_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEQGUARD_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("DEQGUARD_DEVICE", "cpu")
    s = ServiceSettings()
    assert s.max_batch_size == 16 and s.device == "cpu" and s.model == "micro-trades-ri"
    monkeypatch.setenv("DEQGUARD_MAX_BATCH_SIZE", "0")
    monkeypatch.setenv("DEQGUARD_DEVICE", "tpu")
    with pytest.raises(SystemExit) as exc:
        load_settings()
    msg = str(exc.value)
    assert "DEQGUARD_MAX_BATCH_SIZE" in msg and "DEQGUARD_DEVICE" in msg
    monkeypatch.delenv("DEQGUARD_MAX_BATCH_SIZE")
    monkeypatch.delenv("DEQGUARD_DEVICE")
    monkeypatch.setenv("DEQGUARD_MODEL", "../evil")
    with pytest.raises(SystemExit, match="DEQGUARD_MODEL"):
        load_settings()
    assert callable(format_settings_error)


def test_serve_names_a_missing_default_model(tmp_path: Path, capsys) -> None:
    from service.cli import main

    code = main(["--model-store", str(tmp_path), "--model", "micro-trades-ri"])
    assert code == 2
    err = capsys.readouterr().err
    assert "micro-trades-ri" in err and "not found" in err and str(tmp_path) in err


# ------------------------------------------------------------------------ app, not started
def test_not_ready_is_503_and_extra_routers_are_included(service_store: Path) -> None:
    from service.app import create_app
    from service.context import ServiceContext, get_ctx

    extra = APIRouter()

    @extra.get("/admin/ping")
    async def ping(ctx: ServiceContext = Depends(get_ctx)) -> dict[str, object]:
        return {"ready": ctx.ready, "model": ctx.settings.model}

    settings = ServiceSettings(model_store=service_store, model="test-micro", device="cpu")
    app = create_app(settings, extra_routers=[extra])

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)  # no lifespan: the model never loads
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            r = await client.post(
                "/v1/predict", content=b"x", headers={"Content-Type": "image/png"}
            )
            assert r.status_code == 503 and r.json()["error"]["reason"] == "not_ready"
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/livez")).status_code == 200
            assert (await client.get("/admin/ping")).json() == {
                "ready": False,
                "model": "test-micro",
            }
            assert "deqguard_rejections_total" in (await client.get("/metrics")).text

    asyncio.run(main())


# ------------------------------------------------------------------------------ model pool
def test_manifest_is_cached_until_the_file_changes(tmp_path: Path) -> None:
    from deqguard.store import StoreNotFoundError, update_metrics
    from service.errors import ModelNotFound, as_service_error
    from service.resolver import RequestResolver
    from tests.service._server import TEST_MODEL, build_test_store

    build_test_store(tmp_path)
    resolver = RequestResolver(ServiceSettings(model_store=tmp_path, model=TEST_MODEL))
    first = resolver.manifest(None)
    assert resolver.manifest(TEST_MODEL) is resolver.manifest(TEST_MODEL)  # no re-read
    assert resolver.manifest(None) is first
    update_metrics(tmp_path, TEST_MODEL, {"clean_acc": 0.5})
    fresh = resolver.manifest(None)
    assert fresh is not first and fresh.metrics["clean_acc"] == 0.5
    with pytest.raises(StoreNotFoundError) as missing:
        resolver.manifest(f"{TEST_MODEL}@999")  # a version check is never served from the cache
    assert isinstance(as_service_error(missing.value), ModelNotFound)
    (tmp_path / TEST_MODEL / "manifest.json").unlink()
    with pytest.raises(StoreNotFoundError) as gone:
        resolver.manifest(None)
    assert isinstance(as_service_error(gone.value), ModelNotFound)


@pytest.mark.parametrize(
    ("workers", "starts"), [(1, [0.0, 0.3, 0.6, 0.9]), (2, [0.0, 0.0, 0.3, 0.3])]
)
def test_device_workers_compute_batches_side_by_side(workers: int, starts: list[float]) -> None:
    """Four batches of one image, 0.3 s of compute each: one worker runs them one after
    another, two workers two at a time; every job gets its own answer, and stop() lets the
    batches already computing finish and answer while jobs still queued get 503."""

    async def main(clock: VirtualClock) -> None:
        device = _Device(clock, delay=0.3)
        b = Batcher(
            device, max_batch=1, max_delay_s=0.0, queue_size=64, workers=workers, clock=clock
        )
        assert b.torch_threads >= 1
        b.start()
        jobs = [_job(clock, float(i)) for i in range(4)]
        for j in jobs:
            b.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs))
        assert [r.outputs[0] for r in results] == [0.0, 1.0, 2.0, 3.0]
        assert device.starts == starts  # one worker: end to end; two: pairs side by side

        # stop() while batches compute: they still answer, the queued rest get 503
        t0 = clock() - device.t0
        more = [_job(clock, float(10 + i)) for i in range(workers + 2)]
        for j in more:
            b.submit(j)
        await asyncio.sleep(0.1)  # the first `workers` of them are computing until t0 + 0.3
        await b.stop()
        running, queued = more[:workers], more[workers:]
        assert all(j.started for j in running) and not any(j.started for j in queued)
        assert [j.future.result().outputs[0] for j in running] == [10.0 + i for i in range(workers)]
        assert all(isinstance(j.future.exception(), NotReady) for j in queued)
        assert device.starts[4:] == [round(t0, 6)] * workers

    run_virtual(main)


def test_one_error_table_for_model_lookups(service_store: Path) -> None:
    """The same store error, answered by where it happens (service/errors.py's tables): a
    malformed name is a bad parameter in v1 (422 naming ``model``) and no model in a v2 path
    (404, the only error v2 documents there); the app need not be started for look-ups."""
    from deqguard.store import StoreError, StoreIntegrityError, StoreNotFoundError
    from service.app import create_app
    from service.errors import (
        LOAD_ERRORS,
        PATH_ERRORS,
        SERVE_ERRORS,
        CheckpointRefused,
        InvalidParameter,
        ModelLoadFailed,
        ModelNotFound,
        as_service_error,
    )

    settings = ServiceSettings(model_store=service_store, model="test-micro", device="cpu")
    app = create_app(settings)

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            v1 = await client.get("/v1/models/a..b")
            assert v1.status_code == 422 and v1.json()["error"]["field"] == "model"
            for path in ("/v2/models/a..b", "/v2/models/nope", "/v2/models/a..b/ready"):
                r = await client.get(path)
                assert r.status_code == 404, (path, r.text)
                assert r.json()["details"]["reason"] == "model_not_found"  # KServe v2 body
                assert isinstance(r.json()["error"], str)

    asyncio.run(main())
    bad, missing, broken = StoreError("x"), StoreNotFoundError("x"), StoreIntegrityError("x")
    assert isinstance(as_service_error(bad), InvalidParameter)
    assert isinstance(as_service_error(bad, PATH_ERRORS), ModelNotFound)
    assert isinstance(as_service_error(broken), ModelLoadFailed)
    assert isinstance(as_service_error(broken, SERVE_ERRORS), ModelLoadFailed)
    refused = as_service_error(broken, LOAD_ERRORS, field="name")
    assert isinstance(refused, CheckpointRefused) and refused.field == "name"
    assert refused.status_code == 422 and "keeps serving" in refused.message
    for table in (PATH_ERRORS, SERVE_ERRORS, LOAD_ERRORS):
        assert isinstance(as_service_error(missing, table), ModelNotFound)
