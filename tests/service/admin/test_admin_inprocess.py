"""The admin API's contract where no socket is involved: auth, the API off without a token, and
audit request validation, on ``create_app`` in process with the admin router that ``deqguard
serve`` wires (``service.admin.admin_routers``, configured from ``DEQGUARD_*``). Audit runs,
cancel, kill -9, reloads under load and refused checkpoints need a real server:
``test_admin.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._inprocess import InProcessApp
from tests.service.admin._server import AUTH, TOKEN, make_store
from tests.service.admin.test_admin import AUDIT


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


def _app(store: Path, state: Path, token: str | None, mp: pytest.MonkeyPatch) -> InProcessApp:
    from service.admin import admin_routers
    from service.app import create_app
    from service.settings import ServiceSettings

    mp.setenv("DEQGUARD_STATE_DIR", str(state))
    if token is None:
        mp.delenv("DEQGUARD_ADMIN_TOKEN", raising=False)
    else:
        mp.setenv("DEQGUARD_ADMIN_TOKEN", token)
    settings = ServiceSettings(
        model_store=store, model="micro-a", device="cpu", torch_threads=1, max_batch_delay_ms=2
    )
    return InProcessApp(create_app(settings, extra_routers=admin_routers()))


@pytest.fixture(scope="module")
def client(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with pytest.MonkeyPatch.context() as mp:
        app = _app(store, tmp_path_factory.mktemp("state"), TOKEN, mp)
        with app as c:
            yield c


def test_auth_paths(client: httpx.Client) -> None:
    r = client.get("/admin/audits")
    assert r.status_code == 401 and r.json()["error"]["reason"] == "unauthorized"
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/admin/audits", headers={"Authorization": "Basic abc"}).status_code == 401
    r = client.get("/admin/audits", headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 403 and r.json()["error"]["reason"] == "forbidden"
    r = client.post("/admin/models/micro-b/load", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 403
    assert client.get("/admin/audits", headers=AUTH).status_code == 200
    assert client.get("/readyz").status_code == 200  # the public API needs no token


def test_admin_api_off_without_token(store: Path, tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as mp, _app(store, tmp_path / "state", None, mp) as c:
        assert c.get("/admin/audits").status_code == 404
        assert c.post("/admin/models/micro-a/load").status_code == 404
        assert c.get("/readyz").status_code == 200


def test_audit_request_validation(client: httpx.Client) -> None:
    cases = [
        ({**AUDIT, "suite": "nope"}, 422, "suite"),
        ({**AUDIT, "n_samples": 0}, 422, "n_samples"),
        ({**AUDIT, "defense": {"R": -1}}, 422, "defense"),
        ({**AUDIT, "defense": "bogus"}, 422, "defense"),
        ({**AUDIT, "model": "../etc"}, 422, "model"),
        ({**AUDIT, "model": "no-such-model"}, 404, "model"),
        ({**AUDIT, "colour": "red"}, 422, "colour"),
        ({**AUDIT, "options": {"pgd_steps": -1}}, 422, "pgd_steps"),
        ({**AUDIT, "options": {"bogus": 1}}, 422, "bogus"),
    ]
    for body, code, field in cases:
        r = client.post("/admin/audits", json=body, headers=AUTH)
        assert r.status_code == code, (body, r.text)
        assert field in r.text, (body, r.text)
    assert client.get("/admin/audits/0123456789abcdef", headers=AUTH).status_code == 404
    assert client.get("/admin/audits/..%2f..%2fetc", headers=AUTH).status_code == 404
    assert client.get("/readyz").status_code == 200
