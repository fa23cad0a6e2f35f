"""What a real client finds (issue 16): deeply nested JSON, KServe v2 error bodies, leaks and
loose validation, admin audit limits, and the metrics registry. In process (``create_app`` with
the admin router), except where the Triton client needs a socket."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._inprocess import InProcessApp
from tests.service._server import TEST_MODEL

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def app_client(
    service_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """The service with its admin API, in process (no audit is ever started here)."""
    from service.admin import AdminSettings, build_admin_router
    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        model_store=service_store,
        model=TEST_MODEL,
        device="cpu",
        torch_threads=1,
        default_deadline_ms=3_600_000,
        default_preset="off",
    )
    admin = AdminSettings(admin_token=TOKEN, state_dir=tmp_path_factory.mktemp("admin_state"))
    router = build_admin_router(admin)
    with InProcessApp(create_app(settings, extra_routers=[router])) as client:
        yield client


def _deep(depth: int, key: str) -> bytes:
    return ("{" + f'"{key}": ' + "[" * depth + "]" * depth + "}").encode()


@pytest.mark.parametrize(
    "path,key,headers",
    [
        ("/v1/predict", "images", {}),
        (f"/v2/models/{TEST_MODEL}/infer", "inputs", {}),
        ("/admin/audits", "options", AUTH),
    ],
)
def test_deeply_nested_json_is_a_json_400_naming_it(
    app_client: httpx.Client, path: str, key: str, headers: dict[str, str]
) -> None:
    for depth in (1_000, 100_000):
        r = app_client.post(
            path, content=_deep(depth, key), headers={"Content-Type": "application/json", **headers}
        )
        assert r.status_code == 400, r.text
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
        assert "nested too deeply" in message
    # the service keeps serving
    png = base64.b64encode(_png()).decode()
    assert app_client.post("/v1/predict", json={"images": [png]}).status_code == 200


def _png() -> bytes:
    import numpy as np

    from service.imaging import encode_png

    return encode_png(np.full((3, 32, 32), 128, dtype=np.uint8))


def test_v2_errors_follow_the_protocol(app_client: httpx.Client) -> None:
    """``{"error": "<string>"}`` on /v2 (the KServe v2 protocol), details under ``details``;
    /v1 keeps the error object."""
    for method, path, kwargs, code in [
        ("get", "/v2/models/nope", {}, 404),
        ("get", "/v2/models/nope/versions/1/ready", {}, 404),
        ("post", f"/v2/models/{TEST_MODEL}/infer", {"json": {"inputs": []}}, 422),
        ("post", f"/v2/models/{TEST_MODEL}/infer", {"content": b"{"}, 400),
        ("get", "/v2/no/such/route", {}, 404),
    ]:
        r = getattr(app_client, method)(path, **kwargs)
        assert r.status_code == code, r.text
        body = r.json()
        assert isinstance(body["error"], str) and body["error"] == body["details"]["message"]
        assert body["details"]["code"] == code
    v1 = app_client.post("/v1/predict?beta=5", content=b"x", headers={"Content-Type": "image/png"})
    assert v1.status_code == 422 and v1.json()["error"]["field"] == "beta"


def test_tritonclient_reads_v2_errors(service_server) -> None:  # noqa: ANN001
    """str() of tritonclient's InferenceServerException works and carries the message (it
    raised TypeError on the old ``{"error": {...}}`` body)."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=service_server.url.removeprefix("http://"))
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert "nope" in str(info.value)
    inp = triton.InferInput("images", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.full((1, 3, 32, 32), 2.0, dtype=np.float32))  # out of [0, 1]
    with pytest.raises(InferenceServerException) as info:
        client.infer(TEST_MODEL, [inp])
    assert "inputs[0].data" in str(info.value) and "[0, 1]" in str(info.value)


def _big_png(w: int, h: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def test_no_server_paths_and_strict_validation(app_client: httpx.Client) -> None:
    c = app_client
    png = _png()
    # unknown models: the message names the model, never where the server keeps its files
    for r in [
        c.post("/v1/predict?model=nope", content=png, headers={"Content-Type": "image/png"}),
        c.get("/v1/models/nope"),
        c.get("/v2/models/nope"),
    ]:
        assert r.status_code == 404, r.text
        assert "nope" in r.text and "/tmp" not in r.text and "model_store" not in r.text
    # unknown query parameters are rejected naming them (as unknown JSON/form fields are)
    r = c.post("/v1/predict?r=5", content=png, headers={"Content-Type": "image/png"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "r", r.text
    assert "'r'" in r.json()["error"]["message"]
    assert c.get("/v1/models?verbose=1").status_code == 422
    assert c.get("/v2/models/nope?x=1").json()["details"]["field"] == "x"
    # booleans are not numbers; NaN is not "over 1"
    b64 = base64.b64encode(png).decode()
    for body, field in [({"R": True}, "R"), ({"beta": False}, "beta"), ({"Tf": True}, "Tf")]:
        r = c.post("/v1/predict", json={"images": [b64], **body})
        assert r.status_code == 422 and r.json()["error"]["field"] == field, r.text
    for q in ("beta=nan", "eps=inf", "deadline_ms=nan"):
        r = c.post(f"/v1/predict?{q}", content=png, headers={"Content-Type": "image/png"})
        assert r.status_code == 422 and "finite" in r.json()["error"]["message"], r.text
    r = c.post("/v1/predict", files=[("images", ("a.png", png, "image/png"))], data={"beta": "nan"})
    assert r.status_code == 422 and "finite" in r.json()["error"]["message"], r.text
    # image/jpg is what many clients send for JPEG
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, format="JPEG")
    r = c.post("/v1/predict", content=buf.getvalue(), headers={"Content-Type": "image/jpg"})
    assert r.status_code == 200, r.text
    # the pixel-limit message cites the limit enforced (not Pillow's 2x bomb threshold)
    from service.settings import ServiceSettings

    limit = ServiceSettings.model_fields["max_image_pixels"].default
    side = int((2.5 * limit) ** 0.5) + 1
    r = c.post("/v1/predict", content=_big_png(side, side), headers={"Content-Type": "image/png"})
    assert r.status_code == 413, r.text
    assert str(limit) in r.json()["error"]["message"]
    assert str(2 * limit) not in r.json()["error"]["message"]
    # HEAD /livez answers like GET
    assert c.head("/livez").status_code == 200
    # v2: the model's one input is `images`
    body = {"inputs": [{"name": "x", "shape": [1, 3, 32, 32], "datatype": "FP32",
                        "data": [0.5] * 3072}]}  # fmt: skip
    r = c.post(f"/v2/models/{TEST_MODEL}/infer", json=body)
    assert r.status_code == 422 and r.json()["details"]["field"] == "inputs[0].name", r.text


def test_audit_specs_are_held_to_serving_limits_and_budgets(app_client: httpx.Client) -> None:
    """Runaway audit settings are a 422 naming the field at the edge; no job is created."""
    spec = {"model": TEST_MODEL, "defense": "paper", "suite": "smoke", "n_samples": 8}
    cases = [
        ({"defense": {"preset": "paper", "R": 100_000}}, "R must be <= 50"),
        ({"defense": {"preset": "paper", "beta": 5}}, "beta"),
        ({"defense": {"preset": "paper", "Tf": 99}}, "Tf"),
        ({"options": {"pgd_steps": 1e9}}, "options.pgd_steps"),
        ({"options": {"pgd_steps": 1_000_000_000}}, "options.pgd_steps"),
        ({"options": {"pgd_steps": True}}, "options.pgd_steps"),
        ({"options": {"square_queries": 10**7}}, "options.square_queries"),
        ({"options": {"eps": 2}}, "options.eps"),
        ({"options": {"autoattack": "yes"}}, "options.autoattack"),
        ({"options": {"autoattack": True}}, "options.autoattack"),  # smoke runs none
        ({"options": {"cascade": "yes"}}, "options.cascade"),
        ({"options": {"undefended_grad": 1}}, "options.undefended_grad"),
        ({"options": {"undefended_grad": "bptt"}}, "undefended_grad must be one of"),
        ({"options": {"model_form": 1}}, "options.model_form"),
        ({"options": {"model_form": "folded"}}, "model_form must be one of"),
        ({"options": {"transfer_from": "../../etc/passwd"}}, "options.transfer_from"),
        ({"options": {"transfer_from": "no-such-model"}}, "options.transfer_from"),
    ]
    for change, named in cases:
        r = app_client.post("/admin/audits", json={**spec, **change}, headers=AUTH)
        assert r.status_code == 422, (change, r.text)
        assert named in r.text and "/tmp" not in r.text, (change, r.text)
    assert app_client.get("/admin/audits", headers=AUTH).json()["jobs"] == []


def test_smoke_report_says_what_ran(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A smoke report is labelled `smoke`, without AutoAttack (it said `quick`, `true`)."""
    from service.admin import audits

    spec = {"model": "m", "defense": "paper", "suite": "smoke", "n_samples": 8,
            "batch_size": 8, "seed": 0, "options": {}}  # fmt: skip
    config = audits.audit_config(spec, 8, "cpu")
    assert config.autoattack is False and config.pgd_steps == audits.SMOKE_PGD_STEPS
    cascaded = audits.audit_config({**spec, "options": {"cascade": True}}, 8, "cpu")
    assert cascaded.cascade is True and config.cascade is False
    solver = audits.audit_config({**spec, "options": {"undefended_grad": "solver"}}, 8, "cpu")
    assert solver.undefended_grad == "solver" and config.undefended_grad == "unrolled"
    monkeypatch.setattr(audits, "write_plots", lambda report, d: [])
    monkeypatch.setattr(audits, "markdown_summary", lambda report, files: "")
    report = audits.finish_report({"notes": [], "config": config.to_dict()}, spec, tmp_path)
    assert report["config"]["suite"] == "smoke" and report["config"]["autoattack"] is False


def test_metrics_have_process_series_and_no_created(app_client: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    app_client.get("/livez")
    text = app_client.get("/metrics").text
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for standard in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_open_fds",
        "python_info",
    ):
        assert standard in names, standard
    assert not [n for n in names if n.endswith("_created")]
    assert "deqguard_http_requests_total" in names  # the service's own series are all there
    assert "deqguard_http_request_duration_seconds_count" in names


def test_one_requests_work_is_bounded(app_client: httpx.Client) -> None:
    """64 images at R=50, Tf=1 (25,600 gradient steps) is a 413 naming the limit, on v1 and v2,
    before any device work; within the bound the same settings are served."""
    from service.settings import ServiceSettings

    limit = ServiceSettings.model_fields["max_request_grad_steps"].default
    b64 = base64.b64encode(_png()).decode()
    heavy = {"preset": "strong", "R": 50}
    r = app_client.post("/v1/predict", json={"images": [b64] * 64, **heavy})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert (
        err["field"] == "images"
        and f"64 x 400 = 25600, over the limit of {limit}" in (err["message"])
    )
    body = {"parameters": heavy, "inputs": [{"name": "images", "shape": [64, 3, 32, 32],
            "datatype": "FP32", "data": [0.5] * (64 * 3072)}]}  # fmt: skip
    r = app_client.post(f"/v2/models/{TEST_MODEL}/infer", json=body)
    assert r.status_code == 413 and str(limit) in r.json()["error"], r.text
    ok = app_client.post("/v1/predict", json={"images": [b64], "preset": "strong", "R": 2})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["grad_steps"] == 16, ok.text
