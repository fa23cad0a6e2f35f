"""The HTTP contract end to end: the app in process (``create_app`` with its lifespan, through
httpx), and the Triton client against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deqguard.data import CLASSES, load_test
from deqguard.dynamics import deq_forward
from deqguard.store import load_entry
from service.imaging import encode_png
from tests._live import LiveServer
from tests.service._server import TEST_MODEL

# shared, busy CPUs: generous per-test limit (behaviour, not speed, is tested)
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def test_images() -> tuple[list[bytes], np.ndarray, torch.Tensor]:
    split = load_test(n=200)
    pngs = [encode_png(img.numpy()) for img in split.images]
    return pngs, split.labels.numpy(), split.float_images()


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _predict_png(client: httpx.Client, png: bytes, **params: object) -> dict:
    r = client.post(
        "/v1/predict",
        content=png,
        headers={"Content-Type": "image/png"},
        params=params,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_three_input_forms_agree(service_client: httpx.Client, test_images) -> None:
    pngs, _, _ = test_images
    client = service_client
    multi = client.post(
        "/v1/predict",
        files=[("images", (f"{i}.png", pngs[i], "image/png")) for i in range(3)],
        data={"preset": "off"},
    )
    assert multi.status_code == 200, multi.text
    js = client.post(
        "/v1/predict",
        json={"images": [base64.b64encode(p).decode() for p in pngs[:3]], "preset": "off"},
    )
    assert js.status_code == 200, js.text
    raw = [_predict_png(client, pngs[i], preset="off") for i in range(3)]
    for i in range(3):
        a = multi.json()["predictions"][i]
        b = js.json()["predictions"][i]
        c = raw[i]["predictions"][0]
        assert a["label"] == b["label"] == c["label"]
        for k in CLASSES:
            assert a["probabilities"][k] == pytest.approx(b["probabilities"][k], abs=1e-5)
            assert a["probabilities"][k] == pytest.approx(c["probabilities"][k], abs=1e-5)
    body = multi.json()
    assert body["model"]["name"] == TEST_MODEL and len(body["model"]["sha256"]) == 64
    assert set(body["timing"]) == {"queue_ms", "compute_ms", "total_ms", "batch_size"}
    pred = body["predictions"][0]
    assert len(pred["entropy_trace"]) == body["defense"]["steps"] == 8
    assert pred["state"] == 8 and pred["nfe"] >= 1 and pred["grad_steps"] == 0
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_accuracy_on_200_images_equals_offline(
    service_client: httpx.Client, service_store, test_images
) -> None:
    pngs, labels, x = test_images
    client = service_client
    preds = []
    for start in range(0, 200, 50):
        r = client.post(
            "/v1/predict?preset=off",
            files=[
                ("images", (f"{i}.png", pngs[i], "image/png")) for i in range(start, start + 50)
            ],
        )
        assert r.status_code == 200, r.text
        preds += [p["class_index"] for p in r.json()["predictions"]]
    entry = load_entry(service_store, TEST_MODEL)
    offline = deq_forward(entry.model, x, entry.manifest.solver, steps=8).logits.argmax(1).numpy()
    served = np.array(preds)
    assert (served == labels).mean() == (offline == labels).mean()
    assert (served == offline).all()


def test_presets_change_the_entropy_trace(service_client: httpx.Client, test_images) -> None:
    pngs, _, _ = test_images
    client = service_client
    off = _predict_png(client, pngs[0], preset="off")["predictions"][0]
    paper = _predict_png(client, pngs[0], preset="paper")
    fast = _predict_png(client, pngs[0], preset="fast")["predictions"][0]
    p = paper["predictions"][0]
    assert paper["defense"]["R"] == 10 and paper["defense"]["Tf"] == 2
    assert not any(s["defense_acted"] for s in off["entropy_trace"])
    assert off["grad_steps"] == 0
    acted = [s["step"] for s in p["entropy_trace"] if s["defense_acted"]]
    assert acted == [2, 4, 6, 8]  # every Tf = 2 steps, the last (N = 8) included
    assert p["grad_steps"] == 40
    assert [s["step"] for s in fast["entropy_trace"] if s["defense_acted"]] == [4, 8]
    # Up to the first intervention the dynamics are the same; afterwards entropy is reduced.
    assert p["entropy_trace"][0]["entropy"] == pytest.approx(
        off["entropy_trace"][0]["entropy"], abs=1e-4
    )
    for s in p["entropy_trace"]:
        if s["defense_acted"]:
            assert s["post_entropy"] is not None and s["post_entropy"] < s["entropy"]
        else:
            assert s["post_entropy"] is None
    # from the first intervention on (z[2] is recomputed on the updated input: Algorithm 1,
    # line 13) the trace departs from the undefended one
    assert abs(p["entropy_trace"][1]["entropy"] - off["entropy_trace"][1]["entropy"]) > 1e-4
    assert any(
        abs(a["entropy"] - b["entropy"]) > 1e-4
        for a, b in zip(p["entropy_trace"][2:], off["entropy_trace"][2:])
    )
    # early state: the prediction comes from the requested state
    early = _predict_png(client, pngs[0], preset="off", state=3)["predictions"][0]
    assert early["state"] == 3
    assert early["entropy"] == pytest.approx(off["entropy_trace"][2]["entropy"], abs=1e-4)


def _concurrent(client: httpx.Client, pngs: list[bytes], presets: list[str]) -> list[dict]:
    """One thread per request, all at once (they share the app's loop, hence batches)."""
    with ThreadPoolExecutor(max_workers=len(presets)) as pool:
        futures = [
            pool.submit(_predict_png, client, pngs[i], preset=presets[i])
            for i in range(len(presets))
        ]
        return [f.result() for f in futures]


def test_32_concurrent_clients_are_batched_and_match_unbatched(
    service_client: httpx.Client, test_images
) -> None:
    pngs, _, _ = test_images
    client = service_client
    presets = ["off" if i % 4 else "fast" for i in range(32)]  # mixed settings share batches
    single = [_predict_png(client, pngs[i], preset=presets[i]) for i in range(32)]
    assert all(s["timing"]["batch_size"] == 1 for s in single)
    before = _metrics(client)
    batched = _concurrent(client, pngs, presets)
    after = _metrics(client)
    assert max(b["timing"]["batch_size"] for b in batched) > 1
    n_batches = _get(after, "deqguard_batch_size_count") - _get(before, "deqguard_batch_size_count")
    ones = _get(after, "deqguard_batch_size_bucket", le="1.0") - _get(
        before, "deqguard_batch_size_bucket", le="1.0"
    )
    assert n_batches < 32 and ones < n_batches  # the histogram shows batches above 1
    # equal up to float32 reassociation (conv kernels differ by batch size; sign steps amplify)
    for s, b in zip(single, batched):
        ps, pb = s["predictions"][0], b["predictions"][0]
        assert ps["class_index"] == pb["class_index"]
        for k in CLASSES:
            assert ps["probabilities"][k] == pytest.approx(pb["probabilities"][k], abs=2e-3)
        for ts, tb in zip(ps["entropy_trace"], pb["entropy_trace"]):
            assert ts["defense_acted"] == tb["defense_acted"]
            assert ts["entropy"] == pytest.approx(tb["entropy"], abs=2e-3)


def test_request_id_and_server_timing(service_client: httpx.Client, test_images) -> None:
    pngs, _, _ = test_images
    r = service_client.post(
        "/v1/predict?preset=off",
        content=pngs[0],
        headers={"Content-Type": "image/png", "X-Request-ID": "abc-123"},
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-123" and r.json()["request_id"] == "abc-123"
    timing = r.headers["server-timing"]
    assert "queue;dur=" in timing and "compute;dur=" in timing and "total;dur=" in timing
    r2 = service_client.get("/livez", headers={"X-Request-ID": "bad id <x>"})
    assert r2.headers["x-request-id"] != "bad id" and len(r2.headers["x-request-id"]) == 32


def test_models_and_health(service_client: httpx.Client) -> None:
    client = service_client
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == [TEST_MODEL]
    assert models[0]["metrics"]["note"].startswith("random init") and models[0]["default"]
    one = client.get(f"/v1/models/{TEST_MODEL}@1")
    assert one.status_code == 200 and one.json()["loaded"] is True
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/livez").status_code == 200
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["model_loaded"] and ready["warmed_up"]


def _png_of_size(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color=0).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"params": {"beta": "2"}}, 422, "beta"),
        ({"params": {"R": "-1"}}, 422, "R"),
        ({"params": {"R": "999"}}, 422, "R"),
        ({"params": {"state": "9"}}, 422, "state"),
        ({"params": {"Tf": "0"}}, 422, "Tf"),
        ({"params": {"eps": "nan"}}, 422, "eps"),
        ({"params": {"preset": "nope"}}, 422, "preset"),
        ({"params": {"model": "nope"}}, 404, "model"),
        ({"params": {"model": "../etc"}}, 422, "model"),
    ],
)
def test_bad_parameters_are_422_naming_the_field(
    service_client: httpx.Client, test_images, kwargs: dict, code: int, field: str
) -> None:
    pngs, _, _ = test_images
    r = service_client.post(
        "/v1/predict",
        content=pngs[0],
        headers={"Content-Type": "image/png"},
        **kwargs,
    )
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert err["field"] == field and field in err["message"]


def test_every_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(
    service_client: httpx.Client, test_images
) -> None:
    pngs, _, _ = test_images
    client = service_client
    before = _metrics(client)
    cases = [
        # (request kwargs, expected code, expected part/field, reason)
        (dict(content=b"not an image", headers={"Content-Type": "image/png"}), 415, "body"),
        (
            dict(content=pngs[0][: len(pngs[0]) // 2], headers={"Content-Type": "image/png"}),
            400,
            "body",
        ),
        (dict(content=b"x", headers={"Content-Type": "text/plain"}), 415, "content-type"),
        (dict(content=b"{", headers={"Content-Type": "application/json"}), 400, "body"),
        (dict(json={"images": ["%%%"]}), 400, "images[0]"),
        (dict(json={"images": []}), 422, "images"),
        (dict(json={"images": [base64.b64encode(pngs[0]).decode()], "bogus": 1}), 422, "bogus"),
        (dict(files=[("other", ("a.png", pngs[0], "image/png"))]), 422, "other"),
        (
            dict(files=[("images", ("a.gif", b"GIF89a" + b"\0" * 20, "image/gif"))]),
            415,
            "images[0] (a.gif)",
        ),
        (
            dict(content=_png_of_size(5000, 5000, "1"), headers={"Content-Type": "image/png"}),
            413,
            "body",
        ),
    ]
    for kwargs, code, where in cases:
        r = client.post("/v1/predict?preset=off", **kwargs)
        assert r.status_code == code, (kwargs.get("headers"), r.text)
        err = r.json()["error"]
        assert where in (err.get("part"), err.get("field")), err
        assert where.split(" ")[0] in err["message"]
    big = client.post(
        "/v1/predict",
        content=b"\0" * (17 * 1024 * 1024),
        headers={"Content-Type": "image/png"},
    )
    assert big.status_code == 413
    after = _metrics(client)
    for reason, n in {"bad_image": 3, "unsupported_media_type": 3, "invalid_parameter": 3}.items():
        got = _get(after, "deqguard_rejections_total", reason=reason) - _get(
            before, "deqguard_rejections_total", reason=reason
        )
        assert got == n, reason
    assert (
        _get(after, "deqguard_rejections_total", reason="payload_too_large")
        - _get(before, "deqguard_rejections_total", reason="payload_too_large")
        == 2
    )
    # still serving
    assert _predict_png(client, pngs[0], preset="off")["predictions"][0]["label"] in CLASSES


def _sample_image(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A test image with structure in every channel (different ramps per channel plus noise), so
    that a swapped channel, a lost alpha or a missing resize changes the decoded pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    ramps = [xx / max(w - 1, 1), yy / max(h - 1, 1), (xx + yy) / max(w + h - 2, 1)]
    rgb = np.stack([0.2 + 0.6 * r for r in ramps], axis=-1) + rng.uniform(-0.2, 0.2, (h, w, 3))
    rgb8 = np.clip(rgb * 255, 0, 255).astype(np.uint8)
    if mode == "RGB":
        return Image.fromarray(rgb8, "RGB")
    if mode == "RGBA":
        alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
        return Image.fromarray(np.concatenate([rgb8, alpha], axis=-1), "RGBA")
    if mode == "L":
        return Image.fromarray(rgb8[..., 0], "L")
    if mode == "P":
        return Image.fromarray(rgb8, "RGB").quantize(colors=64)
    if mode == "I;16":
        img = Image.fromarray((rgb[..., 1].clip(0, 1) * 65535).astype(np.uint16))
        assert img.mode == "I;16"
        return img
    raise ValueError(mode)


def _reference_decode(data: bytes) -> np.ndarray:
    """The README's rule computed here, in float64, from Pillow's decoded pixels: palette looked
    up, greyscale replicated, alpha composited over white, 16 bit scaled to 0..255; then, unless
    the image is 32x32, each channel resized to 32x32 with Pillow's antialiased bicubic filter.
    [3, 32, 32] float64 (not rounded)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        mode, arr = img.mode, np.asarray(img)
        palette = img.getpalette()
    if mode == "P":
        rgb = np.asarray(palette, dtype=np.float64).reshape(-1, 3)[arr]
    elif mode == "L":
        rgb = np.repeat(arr[..., None].astype(np.float64), 3, axis=-1)
    elif mode == "RGBA":
        a = arr[..., 3:].astype(np.float64) / 255
        rgb = arr[..., :3] * a + 255 * (1 - a)
    elif mode.startswith("I;16"):
        rgb = np.repeat(arr[..., None].astype(np.float64) / 65535 * 255, 3, axis=-1)
    else:
        assert mode == "RGB", mode
        rgb = arr.astype(np.float64)
    if rgb.shape[:2] == (32, 32):
        return rgb.transpose(2, 0, 1)
    channels = [
        np.asarray(
            Image.fromarray(rgb[..., c].astype(np.float32), "F").resize(
                (32, 32), Image.Resampling.BICUBIC
            ),
            dtype=np.float64,
        )
        for c in range(3)
    ]
    return np.clip(np.stack(channels), 0, 255)


def test_any_mode_and_size_is_converted(service_client: httpx.Client, service_store) -> None:
    """Every mode and size decodes to the README's conversion (checked against a reference
    computed in the test: within one grey level, on at most 30% of the values (rounding only;
    a swapped channel order, dropped alpha, or a skipped or other resize is off by tens), and
    the server classifies exactly that array (probabilities equal the offline model's on it)."""
    from service.imaging import decode_image

    client = service_client
    entry = load_entry(service_store, TEST_MODEL)
    cases = [
        ("L", (64, 48), "PNG"),
        ("RGBA", (7, 100), "PNG"),
        ("P", (32, 32), "PNG"),
        ("P", (50, 20), "PNG"),
        ("RGB", (200, 150), "JPEG"),
        ("RGB", (33, 31), "WEBP"),
        ("RGB", (32, 32), "PNG"),
        ("I;16", (40, 40), "PNG"),
    ]
    decoded = []
    served = []
    for seed, (mode, size, fmt) in enumerate(cases):
        buf = io.BytesIO()
        _sample_image(mode, size, seed).save(buf, format=fmt)
        data = buf.getvalue()
        got = decode_image(data, "image", max_pixels=10**6)
        assert got.shape == (3, 32, 32) and got.dtype == np.uint8, (mode, size, fmt)
        diff = np.abs(got.astype(np.float64) - np.round(_reference_decode(data)))
        # rounding only: at most one grey level, on at most 30% of the values
        assert diff.max() <= 1 and diff.mean() <= 0.3, (mode, size, fmt, diff.max(), diff.mean())
        if size == (32, 32):
            assert diff.max() == 0  # 32x32 passes unresized: exactly the file's (converted) pixels
        decoded.append(got)
        media = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}[fmt]
        r = client.post("/v1/predict?preset=off", content=data, headers={"Content-Type": media})
        assert r.status_code == 200, (mode, size, fmt, r.text)
        served.append([r.json()["predictions"][0]["probabilities"][k] for k in CLASSES])
    x = torch.from_numpy(np.stack(decoded)).float() / 255
    with torch.no_grad():
        offline = deq_forward(entry.model, x, entry.manifest.solver, steps=8).logits.softmax(1)
    np.testing.assert_allclose(np.array(served), offline.numpy(), atol=1e-4)


def test_metrics_parse_and_counts_match_traffic(service_client: httpx.Client, test_images) -> None:
    pngs, _, _ = test_images
    client = service_client
    before = _metrics(client)
    for i in range(3):
        _predict_png(client, pngs[i], preset="off")
    _predict_png(client, pngs[3], preset="fast")
    client.post("/v1/predict?beta=5", content=pngs[0], headers={"Content-Type": "image/png"})
    after = _metrics(client)

    def delta(name: str, **labels: str) -> float:
        return _get(after, name, **labels) - _get(before, name, **labels)

    route = dict(route="/v1/predict", method="POST")
    assert delta("deqguard_http_requests_total", code="200", **route) == 4
    assert delta("deqguard_http_requests_total", code="422", **route) == 1
    assert delta("deqguard_http_request_duration_seconds_count", route="/v1/predict") == 5
    assert delta("deqguard_images_total", model=TEST_MODEL) == 4
    assert delta("deqguard_queue_wait_seconds_count") == 4
    assert delta("deqguard_prediction_entropy_nats_count") == 4
    assert delta("deqguard_defense_gradient_steps_count") == 4
    assert delta("deqguard_defense_gradient_steps_sum") == 10  # fast: steps 4 and 8, R = 5
    assert delta("deqguard_rejections_total", reason="invalid_parameter") == 1
    assert delta("deqguard_inference_duration_seconds_count", model=TEST_MODEL) == 4
    assert _get(after, "deqguard_queue_depth_images") == 0
    assert _get(after, "deqguard_requests_in_flight") == 0
    assert _get(after, "deqguard_ready") == 1
    info = [k for k in after if k[0] == "deqguard_model_info"]
    assert len(info) == 1 and dict(info[0][1])["name"] == TEST_MODEL


# ------------------------------------------------------------------------------- KServe v2
def test_v2_with_tritonclient(service_server: LiveServer, test_images) -> None:
    import tritonclient.http as triton

    _, _, x = test_images
    client = triton.InferenceServerClient(url=service_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(TEST_MODEL)
    meta = client.get_model_metadata(TEST_MODEL)
    assert meta["name"] == TEST_MODEL and meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
    batch = x[:4].numpy().astype(np.float32)
    inp = triton.InferInput("images", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)  # binary tensor extension (the default)
    res = client.infer(TEST_MODEL, [inp], parameters={"preset": "off"})
    probs = res.as_numpy("probabilities")
    labels = res.as_numpy("label")
    assert probs.shape == (4, 10) and labels.shape == (4,)
    with httpx.Client(base_url=service_server.url, timeout=600) as http_client:
        ref = [
            _predict_png(http_client, encode_png((b * 255).round().astype(np.uint8)), preset="off")
            for b in batch
        ]
    for i in range(4):
        assert labels[i].decode() == ref[i]["predictions"][0]["label"]
        assert res.as_numpy("class_index")[i] == ref[i]["predictions"][0]["class_index"]
    # JSON outputs, a requested subset, and BYTES (encoded image) input
    png = encode_png((batch[0] * 255).round().astype(np.uint8))
    inp2 = triton.InferInput("images", [1], "BYTES")
    inp2.set_data_from_numpy(np.array([png], dtype=object))
    out = triton.InferRequestedOutput("entropy_trace", binary_data=False)
    res2 = client.infer(TEST_MODEL, [inp2], outputs=[out], parameters={"preset": "paper"})
    trace = res2.as_numpy("entropy_trace")
    assert trace.shape == (1, 8)
    assert res2.as_numpy("probabilities") is None


def test_v2_plain_json(service_client: httpx.Client, test_images) -> None:
    pngs, _, x = test_images
    client = service_client
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json()["ready"] is True
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get(f"/v2/models/{TEST_MODEL}/versions/1/ready").status_code == 200
    body = {
        "id": "req-1",
        "parameters": {"preset": "fast"},
        "inputs": [
            {
                "name": "images",
                "shape": [2, 3, 32, 32],
                "datatype": "FP32",
                "data": x[:2].flatten().tolist(),
            }
        ],
    }
    r = client.post(f"/v2/models/{TEST_MODEL}/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and out["model_name"] == TEST_MODEL and out["model_version"] == "1"
    named = {o["name"]: o for o in out["outputs"]}
    assert named["probabilities"]["shape"] == [2, 10] and len(named["probabilities"]["data"]) == 20
    assert named["defense_acted"]["data"][3] is True  # fast: acts after step 4
    assert named["grad_steps"]["data"] == [10, 10]  # and after step 8
    v1 = _predict_png(client, pngs[0], preset="fast")["predictions"][0]
    assert named["label"]["data"][0] == v1["label"]
    b64 = {
        "inputs": [
            {
                "name": "images",
                "shape": [1],
                "datatype": "BYTES",
                "data": [base64.b64encode(pngs[0]).decode()],
            }
        ],
        "parameters": {"preset": "fast"},
    }
    r2 = client.post(f"/v2/models/{TEST_MODEL}/versions/1/infer", json=b64)
    assert r2.status_code == 200 and {o["name"]: o for o in r2.json()["outputs"]}["label"][
        "data"
    ] == [v1["label"]]
    bad = [
        ({**body, "parameters": {"beta": 3}}, 422, "parameters.beta"),
        ({**body, "parameters": {"whatever": 1}}, 422, "parameters.whatever"),
        ({"inputs": [{**body["inputs"][0], "datatype": "INT8"}]}, 422, "inputs[0].datatype"),
        ({"inputs": [{**body["inputs"][0], "shape": [2, 3, 32, 31]}]}, 422, "inputs[0].shape"),
        ({"inputs": [{**body["inputs"][0], "data": [2.0] * 6144}]}, 422, "inputs[0].data"),
        ({"inputs": [{**body["inputs"][0], "data": [0.5] * 10}]}, 422, "inputs[0].data"),
    ]
    for req, code, field in bad:
        rb = client.post(f"/v2/models/{TEST_MODEL}/infer", json=req)
        assert rb.status_code == code, rb.text
        err = rb.json()
        assert isinstance(err["error"], str) and field in err["error"]  # KServe v2: a string
        assert err["details"]["field"] == field
    assert client.post("/v2/models/nope/infer", json=body).status_code == 404
