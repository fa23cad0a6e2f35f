"""Service parts without a server: batcher, image decoding, settings, the app factory."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import APIRouter, Depends
from PIL import Image

from service.batcher import Batcher, Job
from service.errors import BatchFailed, DeadlineExceeded, PayloadTooLarge, QueueFull
from service.imaging import decode_image, encode_png
from service.settings import ServiceSettings, format_settings_error, load_settings


# --------------------------------------------------------------------------------- batcher
def _job(loop: asyncio.AbstractEventLoop, tag: float, n: int = 1, deadline_s: float = 30.0) -> Job:
    return Job(
        model="m",
        images=torch.full((n, 3, 32, 32), tag),
        params=[None] * n,
        deadline=time.monotonic() + deadline_s,
        future=loop.create_future(),
    )


def _tag_runner(calls: list[int], poison: float | None = None, delay: float = 0.0):
    def run(model: str, images: torch.Tensor, params: list) -> tuple[list[float], str]:
        calls.append(images.shape[0])
        time.sleep(delay)
        tags = images[:, 0, 0, 0].tolist()
        if poison is not None and poison in tags:
            raise RuntimeError("CUDA out of memory (simulated)")
        return tags, "served"

    return run


def test_batcher_batches_and_splits_results() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        b = Batcher(_tag_runner(calls), max_batch=8, max_delay_s=0.05, queue_size=64)
        b.start()
        jobs = [_job(loop, float(i), n=2) for i in range(3)]
        for j in jobs:
            b.submit(j)
        results = await asyncio.gather(*(j.future for j in jobs))
        assert calls == [6]
        assert [r.outputs for r in results] == [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
        assert all(r.batch_size == 6 for r in results)
        await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize("fill_fraction, second_batch", [(0.0, 4), (0.5, 8)])
def test_under_load_a_batch_waits_for_answered_clients_only_when_asked(
    fill_fraction: float, second_batch: int
) -> None:
    """Closed loop, 8 clients, batches of up to 8: 4 clients start, 4 arrive while the first
    batch computes. Without filling, the batches alternate between the two halves; with it, the
    first half's clients (answered, back 20 ms later) join the second half in one batch."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        b = Batcher(
            _tag_runner(calls, delay=0.4),
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=fill_fraction,
        )
        b.start()

        async def client(tag: float, start_s: float) -> None:
            await asyncio.sleep(start_s)
            for _ in range(2):
                job = _job(loop, tag)
                b.submit(job)
                await job.future
                await asyncio.sleep(0.02)  # the client's turnaround

        await asyncio.gather(*(client(float(i), 0.0 if i < 4 else 0.1) for i in range(8)))
        assert calls[0] == 4 and calls[1] == second_batch
        await b.stop()

    asyncio.run(main())


@pytest.mark.parametrize(("fill_fraction", "full_batches"), [(0.0, (0, 1)), (0.5, (3, 4))])
def test_after_a_full_batch_the_next_waits_for_the_clients_it_answered(
    fill_fraction: float, full_batches: tuple[int, int]
) -> None:
    """Closed loop, 8 clients, batches of up to 8, nobody queued while a batch computes: the
    answered clients come back spread over 30 ms (the event loop answers them one by one).
    Without filling, the first to return starts a small batch and the load splits; with it
    (once the arrival rate is known), each batch waits for all eight."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        b = Batcher(
            _tag_runner(calls, delay=0.3),
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=fill_fraction,
            fill_gap_s=0.02,
        )
        b.start()

        async def client(i: int) -> None:
            for _ in range(5):
                job = _job(loop, float(i))
                b.submit(job)
                await job.future
                await asyncio.sleep(0.002 + 0.004 * i)  # staggered returns

        await asyncio.gather(*(client(i) for i in range(8)))
        await b.stop()
        full = calls[2:].count(8)  # from the third batch on, the rate estimate exists
        assert full_batches[0] <= full <= full_batches[1], calls

    asyncio.run(main())


def test_sparse_requests_that_meet_a_busy_device_do_not_wait_to_fill() -> None:
    """One request every 0.4 s, each computing 0.5 s: a request that arrives while the device is
    busy starts as soon as it frees up, because no company is expected within the 0.25 s fill."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        b = Batcher(
            _tag_runner(calls, delay=0.5),
            max_batch=8,
            max_delay_s=0.001,
            queue_size=64,
            fill_fraction=0.5,  # fill after a 0.5 s batch: 0.25 s
        )
        b.start()
        jobs = []
        for i in range(3):
            jobs.append(_job(loop, float(i)))
            b.submit(jobs[-1])
            await asyncio.sleep(0.4)  # the next one arrives while this one computes
        results = await asyncio.gather(*(j.future for j in jobs))
        assert calls == [1, 1, 1]
        assert b._busy_rate * b.fill_wait_s() < 1.0 and b.fill_wait_s() == 0.25
        # they waited only for the batch ahead (about 0.1 and 0.2 s), never the extra 0.25 s fill
        assert all(r.queue_s < 0.3 for r in results), [r.queue_s for r in results]
        await b.stop()

    asyncio.run(main())


def test_failing_batch_is_split_and_fails_only_its_own_request() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        failures: list[int] = []
        b = Batcher(
            _tag_runner(calls, poison=5.0),
            max_batch=8,
            max_delay_s=0.05,
            queue_size=64,
            on_failure=lambda: failures.append(1),
        )
        b.start()
        jobs = [_job(loop, float(i)) for i in range(8)]
        for j in jobs:
            b.submit(j)
        done = await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)
        for i, r in enumerate(done):
            if i == 5:
                assert isinstance(r, BatchFailed) and "out of memory" in str(r)
            else:
                assert r.outputs == [float(i)]
        assert calls[0] == 8 and len(failures) == 4  # 8 -> 4 -> 2 -> 1 failed
        # the worker survives
        again = _job(loop, 1.0)
        b.submit(again)
        assert (await again.future).outputs == [1.0]
        await b.stop()

    asyncio.run(main())


def test_queue_bound_deadline_and_cancel() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        calls: list[int] = []
        b = Batcher(
            _tag_runner(calls, delay=0.3),
            max_batch=1,
            max_delay_s=0.0,
            queue_size=2,
        )
        b.start()
        first = _job(loop, 0.0)
        b.submit(first)
        await asyncio.sleep(0.05)  # first is computing now
        late = _job(loop, 1.0, deadline_s=0.1)
        cancelled = _job(loop, 2.0)
        b.submit(late)
        b.submit(cancelled)
        with pytest.raises(QueueFull) as full:
            b.submit(_job(loop, 3.0))
        assert full.value.headers["Retry-After"].isdigit()
        assert b.cancel(cancelled) and b.queued_images == 1
        assert (await first.future).outputs == [0.0]
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert calls == [1]  # the late and the cancelled job never reached the device
        await b.stop()

    asyncio.run(main())


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
    from deqguard.store import update_metrics
    from service.errors import ModelNotFound
    from service.runtime import ModelPool
    from tests.conftest import TEST_MODEL, build_test_store

    build_test_store(tmp_path)
    pool = ModelPool(tmp_path, TEST_MODEL, torch.device("cpu"))
    first = pool.manifest(None)
    assert pool.manifest(TEST_MODEL) is pool.manifest(TEST_MODEL)  # no re-read per request
    assert pool.manifest(None) is first
    update_metrics(tmp_path, TEST_MODEL, {"clean_acc": 0.5})
    fresh = pool.manifest(None)
    assert fresh is not first and fresh.metrics["clean_acc"] == 0.5
    with pytest.raises(ModelNotFound):
        pool.manifest(f"{TEST_MODEL}@999")  # a version check is never served from the cache
    (tmp_path / TEST_MODEL / "manifest.json").unlink()
    with pytest.raises(ModelNotFound):
        pool.manifest(None)


@pytest.mark.parametrize("workers", [1, 2])
def test_device_workers_compute_batches_side_by_side(workers: int) -> None:
    """Batches of one image each, 0.3 s of compute: one worker runs them one after another,
    two workers two at a time; every job gets its own answer, and stop() lets running batches
    finish and answer."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        spans: list[tuple[float, float]] = []

        def run(model: str, images: torch.Tensor, params: list) -> tuple[list[float], str]:
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((t0, time.monotonic()))
            return images[:, 0, 0, 0].tolist(), "served"

        b = Batcher(run, max_batch=1, max_delay_s=0.0, queue_size=64, workers=workers)
        assert b.torch_threads >= 1
        b.start()
        jobs = [_job(loop, float(i)) for i in range(4)]
        for j in jobs:
            b.submit(j)
        done = await asyncio.gather(*(j.future for j in jobs[:2]))
        assert [r.outputs[0] for r in done] == [0.0, 1.0]
        await b.stop()  # the batches already running still answer
        finished = [j for j in jobs if j.future.done() and not j.future.exception()]
        overlaps = sum(
            1 for i, a in enumerate(spans) for c in spans[i + 1 :] if c[0] < a[1] and a[0] < c[1]
        )
        if workers == 1:
            assert overlaps == 0
        else:
            assert overlaps >= 1
        assert len(finished) >= 2 and all(
            j.future.result().outputs[0] == float(jobs.index(j)) for j in finished
        )

    asyncio.run(main())
