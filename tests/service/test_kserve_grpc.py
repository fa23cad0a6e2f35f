"""KServe v2 beyond HTTP inference: the gRPC endpoint (``tritonclient.grpc`` on a real server),
Triton's statistics extension, the read-only model repository index, and two versions of one
model served side by side, on HTTP and gRPC alike.

One live server (real uvicorn, real gRPC socket) serves a store with ``test-micro`` versions 1
(the current one) and 2 (``versions/2/``, other weights).
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests._live import LiveServer, free_port
from tests.service._server import TEST_MODEL, build_test_store, service_command, service_env

MAX_IMAGES = 4


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from deqguard.models import build_model
    from deqguard.store import save_entry

    root = build_test_store(tmp_path_factory.mktemp("versions_store"))
    torch.manual_seed(1)
    model = build_model("micro").eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    save_entry(root, TEST_MODEL, model, version="2", as_version=True)
    return root


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    hold = tmp_path_factory.mktemp("hold") / "hold"
    env = service_env(
        store,
        grpc_port=free_port(),
        default_preset="off",
        max_images_per_request=MAX_IMAGES,
        max_body_bytes=256 * 1024,
        device_hold_file=hold,
        drain_delay_s=10,
    )
    srv = LiveServer(service_command(), env=env)
    srv.grpc_port = int(env["DEQGUARD_GRPC_PORT"])  # type: ignore[attr-defined]
    srv.hold = hold  # type: ignore[attr-defined]
    srv.start()
    yield srv
    srv.stop()


def _grpc(server: LiveServer):  # noqa: ANN202
    import tritonclient.grpc as tg

    return tg.InferenceServerClient(url=f"127.0.0.1:{server.grpc_port}")  # type: ignore[attr-defined]


def _http(server: LiveServer):  # noqa: ANN202
    import tritonclient.http as th

    return th.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=600)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, 32, 32), dtype=np.float32)


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((x.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _grpc_infer(server: LiveServer, x: np.ndarray, version: str = "", **kwargs: object):  # noqa: ANN202
    import tritonclient.grpc as tg

    inp = tg.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return _grpc(server).infer(TEST_MODEL, [inp], model_version=version, **kwargs)


def _http_infer(server: LiveServer, x: np.ndarray, version: str = ""):  # noqa: ANN202
    import tritonclient.http as th

    inp = th.InferInput("images", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return _http(server).infer(TEST_MODEL, [inp], model_version=version)


def _grpc_error(call):  # noqa: ANN001, ANN202
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value.status(), info.value.message()


# ------------------------------------------------------------------------------ gRPC
def test_grpc_health_metadata_and_infer_match_http(server: LiveServer) -> None:
    client = _grpc(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(TEST_MODEL) and client.is_model_ready(TEST_MODEL, "2")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "deqguard" and "statistics" in meta["extensions"]
    model = client.get_model_metadata(TEST_MODEL, as_json=True)
    assert model["versions"] == ["1", "2"] and model["inputs"][0]["shape"] == [
        "-1",
        "3",
        "32",
        "32",
    ]

    x = _images(3)
    res = _grpc_infer(server, x)
    ref = _http_infer(server, x)
    probs = res.as_numpy("probabilities")
    assert probs.shape == (3, 10)
    np.testing.assert_allclose(probs, ref.as_numpy("probabilities"), atol=1e-5)
    assert (res.as_numpy("class_index") == ref.as_numpy("class_index")).all()
    assert [b.decode() for b in res.as_numpy("label")] == [
        b.decode() for b in ref.as_numpy("label")
    ]
    assert res.as_numpy("defense_acted").dtype == np.bool_
    response = res.get_response(as_json=True)
    assert (
        response["model_version"] == "1"
        and len(response["parameters"]["sha256"]["string_param"]) == 64
    )

    # BYTES (an encoded image), a requested subset of outputs, defense parameters
    import tritonclient.grpc as tg

    inp = tg.InferInput("images", [1], "BYTES")
    inp.set_data_from_numpy(np.array([_png(x[0])], dtype=object))
    out = tg.InferRequestedOutput("entropy_trace")
    res2 = client.infer(TEST_MODEL, [inp], outputs=[out], parameters={"preset": "fast"})
    assert res2.as_numpy("entropy_trace").shape == (1, 8)
    assert res2.as_numpy("probabilities") is None


def test_grpc_errors_follow_the_service_error_table(server: LiveServer) -> None:
    import tritonclient.grpc as tg

    client = _grpc(server)
    x = _images(1)
    status, msg = _grpc_error(lambda: client.get_model_metadata("nope"))
    assert status == "StatusCode.NOT_FOUND" and "nope" in msg
    status, msg = _grpc_error(lambda: _grpc_infer(server, x, parameters={"beta": 3}))
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameters.beta" in msg
    status, msg = _grpc_error(lambda: _grpc_infer(server, x, parameters={"r": 5}))
    assert status == "StatusCode.INVALID_ARGUMENT" and "parameters.r" in msg
    status, msg = _grpc_error(lambda: _grpc_infer(server, _images(MAX_IMAGES + 1)))
    assert status == "StatusCode.RESOURCE_EXHAUSTED" and f"limit {MAX_IMAGES}" in msg
    bad = tg.InferInput("pixels", [1, 3, 32, 32], "FP32")
    bad.set_data_from_numpy(x)
    status, msg = _grpc_error(lambda: client.infer(TEST_MODEL, [bad]))
    assert status == "StatusCode.INVALID_ARGUMENT" and "inputs[0].name" in msg
    # over DEQGUARD_MAX_BODY_BYTES (256 KiB here): gRPC's own receive limit
    big = tg.InferInput("images", [1], "BYTES")
    big.set_data_from_numpy(np.array([b"\0" * 300_000], dtype=object))
    status, _ = _grpc_error(lambda: client.infer(TEST_MODEL, [big]))
    assert status == "StatusCode.RESOURCE_EXHAUSTED"
    status, _ = _grpc_error(lambda: client.get_model_config(TEST_MODEL))
    assert status == "StatusCode.UNIMPLEMENTED"


def test_grpc_deadlines_are_the_batchers(server: LiveServer) -> None:
    """While the device is held with one request on it, the service's deadline (504) and the
    client's gRPC deadline both end a request queued behind it; failures count in the model's
    statistics, and the first request is answered once the device is free."""
    client = _grpc(server)
    before = _http(server).get_inference_statistics(TEST_MODEL, "1")["model_stats"][0]
    first: list[object] = []
    server.hold.touch()  # type: ignore[attr-defined]
    try:
        blocker = threading.Thread(target=lambda: first.append(_grpc_infer(server, _images(1))))
        blocker.start()
        _wait_computing(server)
        status, msg = _grpc_error(
            lambda: _grpc_infer(server, _images(1), parameters={"deadline_ms": 300})
        )
        assert status == "StatusCode.DEADLINE_EXCEEDED" and "deadline of 300 ms" in msg
        status, _ = _grpc_error(lambda: _grpc_infer(server, _images(1), client_timeout=0.5))
        assert status == "StatusCode.DEADLINE_EXCEEDED"
        _wait_computing(server)  # the cancelled request left the queue: withdrawn, not computed
    finally:
        server.hold.unlink()  # type: ignore[attr-defined]
    blocker.join(timeout=600)
    assert first and first[0].as_numpy("probabilities").shape == (1, 10)  # type: ignore[attr-defined]
    after = _http(server).get_inference_statistics(TEST_MODEL, "1")["model_stats"][0]
    fails = after["inference_stats"]["fail"]["count"] - before["inference_stats"]["fail"]["count"]
    assert fails == 2
    assert client.is_server_ready()


def _wait_computing(server: LiveServer) -> None:
    """Until one request is in flight and none is queued (it waits on the device hold)."""
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        text = httpx.get(server.url + "/metrics", timeout=60).text
        values = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith(("deqguard_requests_in_flight", "deqguard_queue_depth_images"))
        }
        if values.get("deqguard_requests_in_flight") == 1 and not values.get(
            "deqguard_queue_depth_images"
        ):
            return
        time.sleep(0.05)
    raise AssertionError("the first request never reached the device")


# ------------------------------------------------------------------------------ versions
def test_two_versions_served_side_by_side(server: LiveServer) -> None:
    x = _images(2, seed=5)
    http = {v: _http_infer(server, x, v) for v in ("1", "2")}
    grpc = {v: _grpc_infer(server, x, v) for v in ("1", "2")}
    for v in ("1", "2"):
        assert http[v].get_response()["model_version"] == v
        assert grpc[v].get_response(as_json=True)["model_version"] == v
        np.testing.assert_allclose(
            grpc[v].as_numpy("probabilities"), http[v].as_numpy("probabilities"), atol=1e-5
        )
    p1, p2 = (http[v].as_numpy("probabilities") for v in ("1", "2"))
    assert np.abs(p1 - p2).max() > 1e-3  # other weights
    unversioned = _http_infer(server, x)
    assert unversioned.get_response()["model_version"] == "1"
    np.testing.assert_allclose(unversioned.as_numpy("probabilities"), p1, atol=1e-5)
    # both stay loaded (the pool keys versions apart): the repository index says so
    index = _http(server).get_model_repository_index()
    mine = {(m["name"], m["version"]): m for m in index if m["name"] == TEST_MODEL}
    assert set(mine) == {(TEST_MODEL, "1"), (TEST_MODEL, "2")}
    assert all(m["state"] == "READY" and m["reason"] == "loaded" for m in mine.values())
    grpc_index = _grpc(server).get_model_repository_index(as_json=True)["models"]
    assert sorted((m["name"], m["version"]) for m in grpc_index) == sorted(mine)
    # a version the store lacks
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="versions"):
        _http_infer(server, x, "3")
    status, _ = _grpc_error(lambda: _grpc_infer(server, x, "3"))
    assert status == "StatusCode.NOT_FOUND"


# ------------------------------------------------------------------------------ statistics
def test_statistics_count_per_version_on_http_and_grpc(server: LiveServer) -> None:
    http, grpc = _http(server), _grpc(server)

    def stats(version: str) -> dict:
        return http.get_inference_statistics(TEST_MODEL, version)["model_stats"][0]

    before = {v: stats(v) for v in ("1", "2")}
    _grpc_infer(server, _images(3), "2")
    _http_infer(server, _images(2), "2")
    after = {v: stats(v) for v in ("1", "2")}
    a, b = after["2"], before["2"]
    assert a["name"] == TEST_MODEL and a["version"] == "2"
    assert a["inference_count"] - b["inference_count"] == 5
    assert a["inference_stats"]["success"]["count"] - b["inference_stats"]["success"]["count"] == 2
    assert a["execution_count"] - b["execution_count"] >= 1
    assert a["inference_stats"]["compute_infer"]["ns"] > b["inference_stats"]["compute_infer"]["ns"]
    assert a["inference_stats"]["success"]["ns"] >= a["inference_stats"]["compute_infer"]["ns"]
    assert a["last_inference"] >= b["last_inference"] and a["last_inference"] > 0
    assert sum(s["compute_infer"]["count"] for s in a["batch_stats"]) == a["execution_count"]
    assert after["1"]["inference_count"] == before["1"]["inference_count"]  # versions apart
    # both versions under the model's name; gRPC gives the same numbers
    both = http.get_inference_statistics(TEST_MODEL)["model_stats"]
    assert [s["version"] for s in both] == ["1", "2"]
    over_grpc = grpc.get_inference_statistics(TEST_MODEL, "2", as_json=True)["model_stats"][0]
    assert int(over_grpc["inference_count"]) == a["inference_count"]
    assert (
        int(over_grpc["inference_stats"]["success"]["ns"]) == a["inference_stats"]["success"]["ns"]
    )
    everything = http.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {(TEST_MODEL, "1"), (TEST_MODEL, "2")}
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException):
        http.get_inference_statistics("nope")
    status, _ = _grpc_error(lambda: grpc.get_inference_statistics("nope"))
    assert status == "StatusCode.NOT_FOUND"


# ------------------------------------------------------------------------------ drain (last)
def test_grpc_refuses_new_work_while_draining(server: LiveServer) -> None:
    """SIGTERM: gRPC readiness turns false and new inferences are UNAVAILABLE, like HTTP's 503,
    while the server keeps answering (DEQGUARD_DRAIN_DELAY_S); then the process exits 0."""
    client = _grpc(server)
    server.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while client.is_server_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not client.is_server_ready() and client.is_server_live()
    status, msg = _grpc_error(lambda: _grpc_infer(server, _images(1)))
    assert status == "StatusCode.UNAVAILABLE" and "draining" in msg
    assert server.wait(120) == 0


def test_grpc_port_settings_and_a_port_in_use(tmp_path: Path) -> None:
    """The gRPC port may not be the HTTP port, and one that is taken stops the start with a
    message naming the setting (never shared through SO_REUSEPORT)."""
    import asyncio
    import socket

    from service.context import ServiceContext
    from service.grpc_server import start_grpc
    from service.settings import ServiceSettings, load_settings

    with pytest.raises(SystemExit, match="grpc_port: 9000 is also the HTTP port"):
        load_settings(port=9000, grpc_port=9000)
    assert ServiceSettings(grpc_port=0).grpc_port == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = ServiceSettings(model_store=tmp_path, device="cpu", grpc_port=port)
        with pytest.raises(RuntimeError, match="DEQGUARD_GRPC_PORT"):
            asyncio.run(start_grpc(ServiceContext(settings)))
