"""The compose stack, validated and brought up here from local images (``make compose-test``).

Validates docker-compose.yml and deploy/compose.cpu.yml with Compose v2; brings up the CPU stack
with the registry-free stand-ins (deploy/compose.local.yml): two deqguard replicas, the admin
instance, nginx as the load balancer and Prometheus; checks that requests round-robin over the
replicas, that /admin reaches the admin instance only, that Prometheus sees every replica (and the
admin instance) up, and that every metric the provisioned Grafana dashboard queries is exported
by the running service. Grafana itself cannot be pulled here and is not started.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import subprocess
import time

import httpx
import pytest

from tests._live import free_port
from tests._metrics import dashboard_metrics, exported_series, metric_families
from tests.image._docker import (
    IMAGE,
    LOG_DIR,
    REPO,
    base_image,
    build_image,
    cifar_root,
    docker,
    have_image,
    run_logged,
    say,
    wait_for,
)

# A hang guard, not a speed check: building the image on a busy 2-core machine took over the
# suite-wide 900 s (2026-12-02, nice 10 beside two training runs).
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(3600)]

PROJECT = f"deqguard-compose-test-{os.getpid()}"
FILES = ("docker-compose.yml", "deploy/compose.cpu.yml", "deploy/compose.local.yml")
REPLICAS = 2


def compose(*args: str, files: tuple[str, ...] = FILES, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:  # fmt: skip
    argv = ["docker", "compose", "-p", PROJECT]
    for f in files:
        argv += ["-f", f]
    out = subprocess.run(
        argv + list(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv + list(args))} -> {out.returncode}:\n{out.stderr}")
    return out


def test_compose_files_validate() -> None:
    version = subprocess.run(
        ["docker", "compose", "version", "--short"], capture_output=True, text=True
    )
    say(f"docker compose {version.stdout.strip()}")
    for files in (("docker-compose.yml",), FILES[:2], FILES):
        compose("config", "--quiet", files=files)
    merged = json.loads(compose("config", "--format", "json", files=FILES[:2]).stdout)
    for name in ("deqguard", "deqguard-admin"):
        svc = merged["services"][name]
        assert svc["environment"]["DEQGUARD_DEVICE"] == "cpu"
        assert not (svc.get("deploy") or {}).get("resources"), svc.get("deploy")
    gpu = json.loads(compose("config", "--format", "json", files=FILES[:1]).stdout)
    for name in ("deqguard", "deqguard-admin"):
        devices = gpu["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def _ip(container: str) -> str:
    nets = json.loads(
        docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container).stdout
    )
    (net,) = nets.values()
    return net["IPAddress"]


def _in_container_get(container: str, path: str, token: str | None = None) -> tuple[int, str]:
    """GET http://127.0.0.1:8000{path} from inside a deqguard container (python3 is there)."""
    code = (
        "import sys, urllib.request as u, urllib.error as e\n"
        f"r = u.Request('http://127.0.0.1:8000{path}')\n"
        + (f"r.add_header('Authorization', 'Bearer {token}')\n" if token else "")
        + "try:\n    x = u.urlopen(r, timeout=10); print(x.status); print(x.read().decode())\n"
        "except e.HTTPError as h:\n    print(h.code)\n"
    )
    out = docker("exec", container, "python3", "-c", code, check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return 0, out.stderr
    status, _, body = out.stdout.partition("\n")
    return int(status), body


def test_compose_stack_round_robin_admin_prometheus() -> None:
    if not have_image(IMAGE):
        build_image(base_image())
    if not all(have_image(t) for t in ("deqguard/nginx:bookworm", "deqguard/prometheus:bookworm")):
        say("making deqguard/nginx and deqguard/prometheus (scripts/make_local_images.sh ops)")
        run_logged(["scripts/make_local_images.sh", "ops"], LOG_DIR / "ops.log")

    token = secrets.token_hex(16)
    lb_port, prom_port = free_port(), free_port()
    env = {
        "DEQGUARD_IMAGE": IMAGE,
        "DEQGUARD_REPLICAS": str(REPLICAS),
        "DEQGUARD_ADMIN_TOKEN": token,
        "DEQGUARD_PUBLIC_PORT": str(lb_port),
        "PROMETHEUS_PORT": str(prom_port),
        "DEQGUARD_CIFAR_DIR": str(cifar_root()),
        "DEQGUARD_TORCH_THREADS": "1",
    }
    lb = f"http://127.0.0.1:{lb_port}"
    t0 = time.monotonic()
    try:
        compose("up", "-d", "--no-build", env=env)
        ps = [
            json.loads(line)
            for line in compose("ps", "--format", "json", env=env).stdout.splitlines()
            if line.strip()
        ]
        by_service = collections.defaultdict(list)
        for c in ps:
            by_service[c["Service"]].append(c["Name"])
        say(f"containers: {dict(by_service)}")
        replicas, (admin,) = sorted(by_service["deqguard"]), by_service["deqguard-admin"]
        assert len(replicas) == REPLICAS
        assert by_service["lb"] and by_service["prometheus"] and "grafana" not in by_service

        for c in [*replicas, admin]:
            wait_for(lambda c=c: _in_container_get(c, "/readyz")[0] == 200, 600.0, f"{c} ready")
        say(f"all {REPLICAS + 1} deqguard instances ready {time.monotonic() - t0:.0f} s after up")
        ips = {_ip(c): c for c in replicas}
        admin_ip = _ip(admin)

        # through the load balancer: round-robin over the replicas, never the admin instance
        wait_for(lambda: httpx.get(lb + "/readyz", timeout=5).status_code == 200, 120.0, "lb")

        def through_lb(n: int) -> list[str]:
            seen = []
            for _ in range(n):
                r = httpx.get(lb + "/v1/models", timeout=30)
                assert r.status_code == 200, r.text
                seen.append(r.headers["x-upstream"].rsplit(":", 1)[0])
            return seen

        def assert_round_robin(seen: list[str], want: set[str]) -> None:
            counts = collections.Counter(seen)
            say(f"{len(seen)} requests through lb: {dict(counts)} (admin {admin_ip})")
            assert set(counts) == want, (counts, want)
            assert max(counts.values()) - min(counts.values()) <= 1, counts
            k = len(want)  # round-robin: every window of k consecutive requests hits all k
            assert all(len(set(seen[i : i + k])) == k for i in range(len(seen) - k + 1)), seen

        assert_round_robin(through_lb(12 * REPLICAS), set(ips))

        # /admin: through the lb it reaches the admin instance; replicas have no admin API
        r = httpx.get(
            lb + "/admin/audits", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-upstream"].rsplit(":", 1)[0] == admin_ip
        assert httpx.get(lb + "/admin/audits", timeout=30).status_code == 401
        for c in replicas:
            assert _in_container_get(c, "/admin/audits", token)[0] == 404, c
        assert _in_container_get(admin, "/admin/audits", token)[0] == 200

        # Prometheus: every replica's target (DNS discovery) and the admin instance are up
        prom = f"http://127.0.0.1:{prom_port}"

        def all_up(replica_ips: set[str]) -> bool:
            tg = httpx.get(prom + "/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            up = {(t["labels"]["job"], t["labels"]["instance"]) for t in tg if t["health"] == "up"}
            want = {("deqguard", f"{ip}:8000") for ip in replica_ips}
            return want | {("deqguard-admin", "deqguard-admin:8000")} <= up

        def up_by_job() -> dict[str, float]:
            q = httpx.get(prom + "/api/v1/query", params={"query": "sum by (job) (up)"}, timeout=5)
            return {r["metric"]["job"]: float(r["value"][1]) for r in q.json()["data"]["result"]}

        wait_for(lambda: all_up(set(ips)), 120.0, "every target up in Prometheus")
        ups = up_by_job()
        say(f"Prometheus up by job: {ups}")
        assert ups == {"deqguard": float(REPLICAS), "deqguard-admin": 1.0}, ups

        # scale out: the lb (reloaded by lb.sh) and Prometheus (DNS discovery) follow, no restart
        n = REPLICAS + 1
        compose("up", "-d", "--no-build", "--no-recreate", "--scale", f"deqguard={n}", env=env)
        ps = [
            json.loads(x)
            for x in compose("ps", "--format", "json", env=env).stdout.splitlines()
            if x.strip()
        ]
        replicas = sorted(c["Name"] for c in ps if c["Service"] == "deqguard")
        assert len(replicas) == n
        for c in replicas:
            wait_for(lambda c=c: _in_container_get(c, "/readyz")[0] == 200, 600.0, f"{c} ready")
        ips = {_ip(c): c for c in replicas}
        wait_for(lambda: set(through_lb(2 * n)) == set(ips), 60.0, "lb sending to the new replica")
        assert_round_robin(through_lb(6 * n), set(ips))
        wait_for(lambda: all_up(set(ips)) and up_by_job().get("deqguard") == n, 120.0, "3 up")
        say(f"scaled to {n}: Prometheus up by job {up_by_job()}")

        # the Grafana dashboard queries only metrics the running service exports
        status, text = _in_container_get(admin, "/metrics")
        assert status == 200
        exported = exported_series(metric_families(text))
        missing = sorted(dashboard_metrics() - exported)
        assert not missing, (
            f"dashboard queries metrics the running service does not export: {missing}"
        )
        say(
            f"dashboard: {len(dashboard_metrics())} metric names, all exported by the admin instance"
        )
    finally:
        logs = compose("logs", "--no-color", env=env, check=False)
        (LOG_DIR / "compose.log").write_text(logs.stdout + logs.stderr)
        compose("down", "-v", "--timeout", "45", env=env, check=False)
        say(f"stack down; {time.monotonic() - t0:.0f} s from up to down")
