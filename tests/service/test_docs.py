"""Offline API docs: ``/docs`` and ``/redoc`` load their assets from the service itself (no CDN),
and the OpenAPI schema has an example per input form, each one a request the service accepts."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.service._server import TEST_MODEL

_ASSET = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
_ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}

_V2_INFER = f"/v2/models/{TEST_MODEL}/infer"
_RAW_MEDIA = ("image/png", "image/jpeg", "image/webp")


def _schema(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def _content(schema: dict[str, Any], path: str) -> dict[str, Any]:
    return schema["paths"][path]["post"]["requestBody"]["content"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_service(
    service_client: httpx.Client, page: str
) -> None:
    r = service_client.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "://" not in html.replace("http://www.w3.org", ""), "an absolute URL: a CDN?"
    assets = _ASSET.findall(html)
    assert any(a.endswith(".js") for a in assets), assets
    if page == "/docs":
        assert any(a.endswith(".css") for a in assets), assets
    for url in assets:
        assert url.startswith("/"), url
        got = service_client.get(url)
        assert got.status_code == 200, url
        kind = next(v for k, v in _ASSET_TYPES.items() if url.endswith(k))
        assert kind in got.headers["content-type"], (url, got.headers["content-type"])
        assert len(got.content) > 100, url
    assert "/openapi.json" in html


def test_the_old_cdn_pages_are_gone(service_client: httpx.Client) -> None:
    """One /docs only (ours); Swagger UI's own validator badge (an online call) is off."""
    html = service_client.get("/docs").text
    assert "cdn.jsdelivr.net" not in html and "validator" in html
    assert '"validatorUrl": null' in html


def test_every_input_form_has_an_example(service_client: httpx.Client) -> None:
    schema = _schema(service_client)
    v1 = _content(schema, "/v1/predict")
    assert set(v1) == {"application/json", "multipart/form-data", *_RAW_MEDIA}
    for media, body in v1.items():
        assert body.get("examples"), media
    v2 = _content(schema, "/v2/models/{model_name}/infer")
    assert set(v2) == {"application/json", "application/octet-stream"}
    assert {"fp32_tensor", "bytes_base64"} <= set(v2["application/json"]["examples"])
    assert v2["application/octet-stream"].get("examples")
    versioned = _content(schema, "/v2/models/{model_name}/versions/{model_version}/infer")
    assert versioned == v2


def _fetch(client: httpx.Client, url: str) -> bytes:
    r = client.get(url)
    assert r.status_code == 200, url
    return r.content


def test_every_v1_example_is_accepted(service_client: httpx.Client) -> None:
    client = service_client
    content = _content(_schema(client), "/v1/predict")
    sent = 0
    for name, ex in content["application/json"]["examples"].items():
        r = client.post("/v1/predict", json=ex["value"])
        assert r.status_code == 200, (name, r.text)
        assert len(r.json()["predictions"]) == len(ex["value"]["images"])
        sent += 1
    for name, ex in content["multipart/form-data"]["examples"].items():
        files = [("images", ("image.png", _fetch(client, u), "image/png")) for u in ex["x-images"]]
        r = client.post("/v1/predict", data=ex["value"], files=files)
        assert r.status_code == 200, (name, r.text)
        applied = r.json()["defense"]
        assert applied["preset"] == ex["value"]["preset"] and applied["R"] == int(ex["value"]["R"])
        sent += 1
    for media in _RAW_MEDIA:
        for name, ex in content[media]["examples"].items():
            body = _fetch(client, ex["externalValue"])
            r = client.post("/v1/predict", content=body, headers={"Content-Type": media})
            assert r.status_code == 200, (media, name, r.text)
            sent += 1
    assert sent >= 6


def test_every_v2_example_is_accepted(service_client: httpx.Client) -> None:
    client = service_client
    content = _content(_schema(client), "/v2/models/{model_name}/infer")
    for name, ex in content["application/json"]["examples"].items():
        r = client.post(_V2_INFER, json=ex["value"])
        assert r.status_code == 200, (name, r.text)
        assert r.json()["model_name"] == TEST_MODEL
    for name, ex in content["application/octet-stream"]["examples"].items():
        body = _fetch(client, ex["externalValue"])
        n = ex["x-inference-header-content-length"]
        assert f"Inference-Header-Content-Length: {n}" in ex["description"]
        r = client.post(
            _V2_INFER,
            content=body,
            headers={
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(n),
            },
        )
        assert r.status_code == 200, (name, r.text)
        outputs = {o["name"] for o in r.json()["outputs"]}
        assert "probabilities" in outputs


def test_an_unknown_example_file_is_a_json_404(service_client: httpx.Client) -> None:
    r = service_client.get("/docs/examples/nope.png")
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_found"
