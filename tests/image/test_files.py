"""Fast checks of the container files, without Docker (these run in ``make test``).

The Dockerfile's base argument and offline path, what the build context keeps, the load
balancer's round-robin upstream, and deploy/nginx/lb.sh (run with stand-in ``getent`` and
``nginx``: it reloads nginx when the replicas' addresses change and stops it on SIGTERM).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_base_argument_and_offline_path() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.0\.\d+-runtime-ubuntu24\.04$", text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\$\{CUDA_IMAGE\}$", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], froms
    assert "COPY wheelhouse/ /wheels/" in text
    assert "--no-index --find-links /wheels" in text
    assert "download.pytorch.org/whl/cu130" in text  # the online path stays
    # the wheelhouse exists in a fresh clone (so COPY works) and its wheels are never committed
    assert (REPO / "wheelhouse" / "README.md").is_file()
    gitignore = (REPO / ".gitignore").read_text().splitlines()
    assert "/wheelhouse/*" in gitignore and "!/wheelhouse/README.md" in gitignore
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "wheelhouse" not in ignored and "wheelhouse/" not in ignored
    assert "training/state" in ignored  # the campaign's state is no part of the image


def test_lb_round_robins_over_an_upstream_and_compose_runs_lb_sh() -> None:
    conf = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    upstream = re.search(r"upstream (\w+) \{(.*?)\}", conf, re.S)
    assert upstream, "no upstream block"
    name, body = upstream.groups()
    assert re.search(r"^\s*zone \w+ \d+k;", body, re.M)  # one round-robin across workers
    assert re.search(r"^\s*server deqguard:8000;", body, re.M)
    assert f"proxy_pass http://{name};" in conf
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    lb = compose["services"]["lb"]
    assert lb["command"] == ["/bin/sh", "/deqguard-lb.sh"]
    assert "./deploy/nginx/lb.sh:/deqguard-lb.sh:ro" in lb["volumes"]
    local = yaml.safe_load((REPO / "deploy" / "compose.local.yml").read_text())
    assert set(local["services"]) == {"lb", "prometheus", "grafana"}
    assert local["services"]["grafana"]["profiles"] == ["grafana"]


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)


def test_lb_sh_reloads_nginx_when_the_replicas_change(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answers, events = tmp_path / "answers", tmp_path / "events"
    answers.write_text("10.0.0.2 STREAM deqguard\n10.0.0.3 STREAM deqguard\n")
    events.write_text("")
    _stub(bin_dir / "getent", f'[ "$2" = deqguard ] && cat {answers}\n')
    _stub(
        bin_dir / "nginx",
        f"""\
        if [ "$1" = -s ]; then echo "$2" >>{events}; exit 0; fi
        echo start >>{events}
        trap 'echo term >>{events}; exit 0' TERM
        while :; do sleep 0.05; done
        """,
    )
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LB_RERESOLVE_S": "0.2"}
    proc = subprocess.Popen(
        ["sh", str(REPO / "deploy" / "nginx" / "lb.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def wait_event(line: str, n: int = 1) -> None:
            deadline = time.monotonic() + 10
            while events.read_text().splitlines().count(line) < n:
                assert time.monotonic() < deadline, (line, events.read_text())
                time.sleep(0.05)

        wait_event("start")
        time.sleep(0.6)  # same answer (in another order): no reload
        answers.write_text("10.0.0.3 STREAM deqguard\n10.0.0.2 STREAM deqguard\n")
        time.sleep(0.6)
        assert "reload" not in events.read_text()
        answers.write_text("10.0.0.2 STREAM x\n10.0.0.3 STREAM x\n10.0.0.4 STREAM x\n")
        wait_event("reload")
        answers.write_text("")  # nothing resolves (all replicas gone): keep the last config
        time.sleep(0.6)
        assert events.read_text().splitlines().count("reload") == 1
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert events.read_text().splitlines() == ["start", "reload", "term"], events.read_text()
    assert "deqguard -> 10.0.0.2 10.0.0.3 10.0.0.4" in out, out
