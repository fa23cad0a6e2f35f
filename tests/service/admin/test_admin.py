"""The admin API against real uvicorn servers: audit jobs (run, cancel, kill -9 and resume),
model reload under load, and refused checkpoints and names (the socket-free contract:
test_admin_inprocess.py)."""

from __future__ import annotations

import base64
import io
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from deqguard.audit import validate_report
from deqguard.models import build_model
from deqguard.store import save_entry
from tests._live import LiveServer
from tests.service.admin._server import admin_server, make_store, wait_job

try:
    from deqguard.data import resolve_data_root

    resolve_data_root()
    HAVE_DATA = True
except Exception:  # the dataset lives outside the repo
    HAVE_DATA = False

# Server start-ups dominate here (~10-30 s each on an idle 2-core machine); the generous limit
# only matters on a machine that other jobs saturate.
pytestmark = pytest.mark.timeout(900)

needs_data = pytest.mark.skipif(not HAVE_DATA, reason="CIFAR-10 not found (DEQGUARD_DATA_DIR)")

# A tiny audit: 64 images, one PGD-2 attack, a 2-step defense; ~30 s on 2 busy CPU cores.
AUDIT: dict[str, Any] = {
    "model": "micro-a",
    "defense": {"preset": "paper", "R": 2},
    "suite": "smoke",
    "n_samples": 64,
    "batch_size": 16,
    "seed": 0,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def hold(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """While this file exists the server starts no device work (DEQGUARD_DEVICE_HOLD_FILE), so
    tests decide when an audit may progress instead of guessing how long it takes."""
    return tmp_path_factory.mktemp("hold") / "hold"


@pytest.fixture(scope="module")
def server(store: Path, hold: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = admin_server(
        store, tmp_path_factory.mktemp("state"), DEQGUARD_DEVICE_HOLD_FILE=str(hold)
    ).start()
    yield srv
    hold.unlink(missing_ok=True)
    srv.stop()


@pytest.fixture(scope="module")
def reference_report(server: LiveServer) -> dict[str, Any]:
    """The uninterrupted run of AUDIT (shared by the completion and the resume tests)."""
    with server.client() as c:
        r = c.post("/admin/audits", json=AUDIT, headers={"Idempotency-Key": "ref-run"})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], ("succeeded", "failed", "cancelled"), 900)
        assert job["state"] == "succeeded", job
        return c.get(f"/admin/audits/{job['id']}/report").json()


def _png_b64(seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                return s.value
    raise KeyError(name)


# Auth, the API off without a token and request validation need no socket:
# test_admin_inprocess.py.


# --------------------------------------------------------------------------- audits
@needs_data
def test_audit_runs_to_completion(server: LiveServer, reference_report: dict[str, Any]) -> None:
    rep = reference_report
    validate_report(rep)
    assert rep["n"] == 64 and rep["complete"] and rep["model"]["ref"] == "micro-a@1"
    assert 0.0 <= rep["clean"]["accuracy"] <= 1.0
    assert len(rep["attacks"]) == 1 and rep["attacks"][0]["kind"] == "pgd"
    worst = rep["worst_case"]
    assert worst["accuracy"] <= rep["headline"]["robust"]["accuracy"] <= 1.0
    assert worst["ci95"][0] <= worst["accuracy"] <= worst["ci95"][1]
    assert any("smoke" in note for note in rep["notes"])
    assert rep["summary_markdown"] and rep["plots"]
    with server.client() as c:
        job_id = rep["job"]["id"]
        # the same Idempotency-Key gives the same job; reusing it for another body is refused
        again = c.post("/admin/audits", json=AUDIT, headers={"Idempotency-Key": "ref-run"})
        assert again.status_code == 200 and again.json()["id"] == job_id
        assert again.headers["location"] == f"/admin/audits/{job_id}"
        other = {**AUDIT, "seed": 5}
        clash = c.post("/admin/audits", json=other, headers={"Idempotency-Key": "ref-run"})
        assert clash.status_code == 409
        status = c.get(f"/admin/audits/{job_id}").json()
        assert status["progress"]["samples_done"] == 64
        assert status["progress"]["robust_acc_ci95"] is not None
        assert job_id in [j["id"] for j in c.get("/admin/audits").json()["jobs"]]
        for name in rep["plots"]:
            r = c.get(f"/admin/audits/{job_id}/plots/{name}.png")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            assert r.content.startswith(b"\x89PNG")
        assert c.get(f"/admin/audits/{job_id}/plots/nope.png").status_code == 404
        text = c.get("/metrics").text
        assert _metric(text, "deqguard_audit_samples_processed_total") >= 64
        assert _metric(text, "deqguard_audit_jobs", {"state": "succeeded"}) >= 1


@needs_data
def test_cancel(server: LiveServer, hold: Path, reference_report: dict[str, Any]) -> None:
    hold.touch()  # the running audit cannot finish before it is cancelled
    try:
        _cancel_running_and_queued(server)
    finally:
        hold.unlink(missing_ok=True)
    with server.client() as c:
        assert c.get("/readyz").status_code == 200


def _cancel_running_and_queued(server: LiveServer) -> None:
    with server.client() as c:
        r = c.post("/admin/audits", json={**AUDIT, "n_samples": 2000, "seed": 7})
        assert r.status_code == 202
        job_id = r.json()["id"]
        wait_job(c, job_id, ("running",), 600)
        # at most one audit at a time (the default): a second one waits queued (the first is
        # held on the device, so it stays queued whatever the machine's speed)...
        second = c.post("/admin/audits", json={**AUDIT, "seed": 8}).json()["id"]
        assert c.get(f"/admin/audits/{second}").json()["state"] == "queued"
        # ...and a queued job is cancelled at once
        r = c.delete(f"/admin/audits/{second}")
        assert r.status_code == 202 and r.json()["state"] == "cancelled"
        r = c.delete(f"/admin/audits/{job_id}")
        assert r.status_code == 202 and r.json()["cancel_requested"]
        job = wait_job(c, job_id, ("cancelled", "succeeded", "failed"), 600)
        assert job["state"] == "cancelled"
        assert job["progress"]["samples_done"] == 0  # held from the start: nothing computed
        assert c.delete(f"/admin/audits/{job_id}").status_code == 409
        assert c.get(f"/admin/audits/{job_id}/report").status_code == 409


def _strip(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what may differ between runs (timing, per attack and of the sanity
    checks too, job bookkeeping, and the Markdown summary, which quotes the elapsed time)."""
    out = {k: v for k, v in report.items() if k not in ("job", "elapsed_s", "summary_markdown")}
    out["attacks"] = [{k: v for k, v in a.items() if k != "seconds"} for a in report["attacks"]]
    out["sanity"] = {k: v for k, v in report["sanity"].items() if k != "seconds"}
    return out


@needs_data
def test_kill9_then_restart_resumes_with_same_result(
    store: Path, tmp_path: Path, reference_report: dict[str, Any]
) -> None:
    """Killed mid-audit: once the first batch (16 of 64 images) is recorded the test holds the
    device, so the audit stops at its next f-evaluation; at most the batch then computing could
    still complete (no gate left in it), never the whole audit."""
    state = tmp_path / "state"
    hold = tmp_path / "hold"
    srv = admin_server(store, state, DEQGUARD_DEVICE_HOLD_FILE=str(hold)).start()
    with srv.client() as c:
        job_id = c.post("/admin/audits", json=AUDIT).json()["id"]
        deadline = time.monotonic() + 600  # hang guard
        while c.get(f"/admin/audits/{job_id}").json()["progress"]["samples_done"] < 16:
            assert time.monotonic() < deadline, "the audit made no progress"
            time.sleep(0.02)
        hold.touch()
    srv.kill9()
    hold.unlink()
    srv2 = admin_server(store, state).start()
    try:
        with srv2.client() as c:
            status = c.get(f"/admin/audits/{job_id}").json()
            assert status["state"] in ("running", "queued")
            assert 16 <= status["progress"]["samples_done"] < 64  # killed mid-audit
            job = wait_job(c, job_id, ("succeeded", "failed", "cancelled"), 900)
            assert job["state"] == "succeeded" and job["resumes"] >= 1
            report = c.get(f"/admin/audits/{job_id}/report").json()
    finally:
        srv2.stop()
    assert _strip(report) == _strip(reference_report)


# --------------------------------------------------------------------------- models
def test_model_reload_under_load_fails_no_request(server: LiveServer, store: Path) -> None:
    torch.manual_seed(3)
    save_entry(store, "micro-c", build_model("micro").eval(), version="1")
    body = {"images": [_png_b64()], "preset": "off", "model": "micro-c"}
    with server.client() as c:
        assert c.post("/v1/predict", json=body).status_code == 200
    codes: list[int] = []
    versions: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as hc:
            while not stop.is_set():
                r = hc.post("/v1/predict", json=body)
                codes.append(r.status_code)
                if r.status_code == 200:
                    versions.append(r.json()["model"]["version"])

    def served_at_least(n: int) -> None:
        deadline = time.monotonic() + 600  # hang guard
        while len(codes) < n:
            assert time.monotonic() < deadline, "the hammering clients got no answers"
            time.sleep(0.02)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        served_at_least(8)  # version 1 is being served under load
        torch.manual_seed(4)
        save_entry(store, "micro-c", build_model("micro").eval(), version="2")
        with server.client() as c:
            for _ in range(2):
                r = c.post("/admin/models/micro-c/load")
                assert r.status_code == 200, r.text
                assert r.json()["version"] == "2"
            assert c.post("/admin/models/micro-b/load").status_code == 200
        served_at_least(len(codes) + 8)  # and version 2 after the reload
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert codes and all(code == 200 for code in codes), sorted(set(codes))
    assert versions[-1] == "2" and "1" in versions


def test_tampered_checkpoint_and_bad_names_refused(server: LiveServer, store: Path) -> None:
    shutil.copytree(store / "micro-a", store / "micro-tampered")
    manifest = (store / "micro-tampered" / "manifest.json").read_text()
    (store / "micro-tampered" / "manifest.json").write_text(
        manifest.replace('"micro-a"', '"micro-tampered"')
    )
    weights = store / "micro-tampered" / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF
    weights.write_bytes(bytes(blob))
    predict = {"images": [_png_b64()], "preset": "off"}
    with server.client() as c:
        before = c.post("/v1/predict", json=predict).json()["model"]
        r = c.post("/admin/models/micro-tampered/load")
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["reason"] == "checkpoint_refused" and "sha256" in err["message"]
        after = c.post("/v1/predict", json=predict)
        assert after.status_code == 200 and after.json()["model"] == before
        for bad in ("a..b", "-x", ".hidden", "x" * 65, "name with space"):
            r = c.post(f"/admin/models/{bad}/load")
            assert r.status_code == 422 and r.json()["error"]["field"] == "name", (bad, r.text)
        # clients and the router may normalise these before the name check: never served
        for raw in ("..", "%2e%2e", "..%2F..%2Fetc%2Fpasswd", "%2e%2e%2fmodel_store"):
            r = c.post(f"/admin/models/{raw}/load")
            assert r.status_code in (404, 422), (raw, r.text)
        assert c.post("/admin/models/does-not-exist/load").status_code == 404
        assert c.get("/readyz").status_code == 200
        text = c.get("/metrics").text
        assert _metric(text, "deqguard_model_loads_total", {"result": "refused"}) >= 1


def test_dashboard_metrics_are_on_the_live_metrics_endpoint(server: LiveServer) -> None:
    from tests._metrics import dashboard_metrics, exported_series

    with server.client() as c:
        assert (
            c.post("/v1/predict", json={"images": [_png_b64()], "preset": "off"}).status_code == 200
        )
        text = c.get("/metrics").text
    families = {fam.name: fam.type for fam in text_string_to_metric_families(text)}
    missing = sorted(dashboard_metrics() - exported_series(families))
    assert not missing, f"dashboard queries metrics /metrics does not expose: {missing}"
