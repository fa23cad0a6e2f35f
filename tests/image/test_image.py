"""The container image, built and run here (``make image-test``; issue 17).

Builds the image with ``make image`` (offline wheelhouse) on the Dockerfile's default base when it
can be pulled, else on a minimal Debian made with debootstrap; runs it as its non-root user with
the shipped model store; checks readiness, one prediction per CIFAR-10 test image against the
library's prediction for the same image, /metrics and a SIGTERM drain; prints the image size and
the cold-start time (container start to ready).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._live import free_port
from tests._metrics import metric_families
from tests.image._docker import (
    CLASSES,
    IMAGE,
    LOG_DIR,
    base_image,
    build_image,
    cifar_test_images,
    docker,
    image_size,
    offline_predictions,
    png_bytes,
    ready,
    say,
    wait_for,
)

# A hang guard, not a speed check: building the image on a busy 2-core machine took over the
# suite-wide 900 s (2026-12-02, nice 10 beside two training runs).
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(3600)]

MODEL = "micro-trades-ri"  # the image's default (DEQGUARD_MODEL)
GRACE_S = 10.0  # DEQGUARD_DRAIN_GRACE_S given to the container
INDICES = (0, 1, 2, 3, 4, 5, 6, 7)  # CIFAR-10 test images sent


def _container_running(name: str) -> bool:
    out = docker("inspect", "-f", "{{.State.Running}}", name, check=False)
    return out.stdout.strip() == "true"


def test_image_builds_serves_and_drains() -> None:
    t_all = time.monotonic()
    base = base_image()
    build_s = build_image(base)
    size = image_size(IMAGE)
    config = json.loads(docker("image", "inspect", "-f", "{{json .Config}}", IMAGE).stdout)
    assert config["User"] == "10001:10001", config["User"]
    assert config["Env"] and any(
        e == "DEQGUARD_MODEL_STORE=/app/model_store" for e in config["Env"]
    )

    name = f"deqguard-image-test-{os.getpid()}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    docker("rm", "-f", "-v", name, check=False)
    t_start = time.monotonic()
    docker(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
        "-e", "DEQGUARD_DEVICE=cpu", "-e", "DEQGUARD_TORCH_THREADS=1",
        "-e", f"DEQGUARD_DRAIN_GRACE_S={GRACE_S:g}",
        "--cpus", "2", IMAGE,
    )  # fmt: skip
    try:
        t_ready = wait_for(ready(url), 600.0, "/readyz 200", alive=lambda: _container_running(name))
        cold_start = t_ready - t_start
        say(f"ready {cold_start:.1f} s after docker run")

        # the server runs as the image's user, from the image's model store
        status = docker("exec", name, "cat", "/proc/1/status").stdout
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {"10001"}, uids
        assert MODEL in docker("exec", name, "ls", "/app/model_store").stdout.split()

        # one CIFAR-10 test PNG per request; the label is the library's for the same image
        images, labels = cifar_test_images(INDICES)
        served_probs = []
        served_labels = []
        for img in images:
            r = httpx.post(
                url + "/v1/predict",
                content=png_bytes(img),
                headers={"Content-Type": "image/png"},
                timeout=300.0,
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model"]["name"] == MODEL
            pred = body["predictions"][0]
            served_labels.append(pred["class_index"])
            served_probs.append(pred["probabilities"])
            assert pred["label"] == CLASSES[pred["class_index"]]
        offline = offline_predictions(images, MODEL)
        say(f"served {served_labels}, offline {offline.argmax(1).tolist()}, true {labels}")
        assert served_labels == offline.argmax(1).tolist()
        served_p = np.array(
            [[p[c] for c in CLASSES] if isinstance(p, dict) else p for p in served_probs]
        )
        np.testing.assert_allclose(served_p, offline, atol=2e-3)

        # /metrics: Prometheus text with the service's families, this traffic counted
        m = httpx.get(url + "/metrics", timeout=30.0)
        assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
        families = metric_families(m.text)
        for needed in ("deqguard_http_requests", "deqguard_images", "deqguard_batch_size",
                       "deqguard_ready", "deqguard_inference_duration_seconds"):  # fmt: skip
            assert needed in families, (needed, sorted(families))
        images_total = sum(
            s.value
            for fam in text_string_to_metric_families(m.text)
            if fam.name == "deqguard_images"
            for s in fam.samples
            if s.name == "deqguard_images_total"
        )
        assert images_total >= len(INDICES), images_total

        # SIGTERM with a request in flight: it is answered, then the process exits 0 in the grace
        slow: dict[str, object] = {}

        def _inflight() -> None:
            try:
                slow["r"] = httpx.post(
                    url + "/v1/predict?preset=strong",
                    content=png_bytes(images[0]),
                    headers={"Content-Type": "image/png"},
                    timeout=120.0,
                )
            except httpx.HTTPError as exc:
                slow["error"] = exc

        th = threading.Thread(target=_inflight)
        th.start()
        time.sleep(0.5)
        t_term = time.monotonic()
        docker("kill", "--signal", signal.Signals.SIGTERM.name, name)
        code = int(docker("wait", name, timeout=GRACE_S + 60).stdout.strip())
        exit_s = time.monotonic() - t_term
        th.join(30)
        logs = docker("logs", name).stderr + docker("logs", name).stdout
        (LOG_DIR / "container.log").write_text(logs)
        say(f"SIGTERM -> exit code {code} after {exit_s:.2f} s (grace {GRACE_S:g} s)")
        assert code == 0, logs[-3000:]
        assert exit_s <= GRACE_S + 5.0, exit_s  # + interpreter shutdown
        assert "Traceback" not in logs, logs[-3000:]
        if "r" in slow:  # answered (200) or, had it not started before the drain, refused (503)
            assert slow["r"].status_code in (200, 503), slow["r"].text  # type: ignore[attr-defined]
        inflight = slow.get("r").status_code if "r" in slow else repr(slow.get("error"))  # type: ignore[union-attr]
    finally:
        docker("rm", "-f", "-v", name, check=False)

    figures = {
        "base_image": base,
        "image": IMAGE,
        "image_size_bytes": size,
        "image_size_gb": round(size / 1e9, 2),
        "build_s": round(build_s, 1),
        "cold_start_s": round(cold_start, 2),
        "sigterm_exit_s": round(exit_s, 2),
        "sigterm_exit_code": code,
        "inflight_during_drain": inflight,
        "test_s": round(time.monotonic() - t_all, 1),
    }
    (LOG_DIR / "figures.json").write_text(json.dumps(figures, indent=2))
    say("figures: " + json.dumps(figures))
