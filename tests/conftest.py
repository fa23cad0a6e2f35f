"""Shared pytest helpers: a real server process on 127.0.0.1 (generic) and a tiny model store.

``LiveServer`` starts any command that serves HTTP on a free port, waits for a readiness URL and
stops it with SIGTERM, so tests exercise the real uvicorn stack (sockets, signals, lifespan),
not only an in-process client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the test process dies, so no server outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _Http:
    """httpx.get/post with a long default timeout: the suite runs on shared, busy CPUs, and the
    tests check behaviour, never speed."""

    timeout = 600.0

    def get(self, url: str, **kwargs: object) -> httpx.Response:
        kwargs.setdefault("timeout", self.timeout)
        return httpx.get(url, **kwargs)  # type: ignore[arg-type]

    def post(self, url: str, **kwargs: object) -> httpx.Response:
        kwargs.setdefault("timeout", self.timeout)
        return httpx.post(url, **kwargs)  # type: ignore[arg-type]


http = _Http()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A server subprocess: ``start()`` waits until ``ready_path`` answers 200."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        ready_path: str = "/readyz",
        log_path: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        self.env = {**os.environ, **(env or {})}
        self.ready_path = ready_path
        self.log_path = log_path or Path(f"/tmp/live-server-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 300.0) -> LiveServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=10.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


# ----------------------------------------------------------------------- service fixtures
TEST_MODEL = "test-micro"


def build_test_store(root: Path, name: str = TEST_MODEL) -> Path:
    """A model store with one ``micro`` entry: seeded random init, classifier scaled up so that
    predictions are confident enough for entropy changes to show (no training: fast)."""
    import torch

    from deqguard.models import build_model
    from deqguard.store import save_entry

    torch.manual_seed(0)
    model = build_model("micro").eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    save_entry(root, name, model, version="1", metrics={"note": "random init, tests only"})
    return root


def service_command() -> list[str]:
    return [sys.executable, "-m", "service.cli", "--port", "{port}"]


def service_env(store: Path, **extra: object) -> dict[str, str]:
    env = {
        "DEQGUARD_MODEL_STORE": str(store),
        "DEQGUARD_MODEL": TEST_MODEL,
        "DEQGUARD_HOST": "127.0.0.1",
        "DEQGUARD_LOG_LEVEL": "warning",
        "DEQGUARD_TORCH_THREADS": "2",
        # no request of ours should hit the default deadline on a busy CPU; tests that check
        # deadlines set their own
        "DEQGUARD_DEFAULT_DEADLINE_MS": "3600000",
    }
    env.update({f"DEQGUARD_{k.upper()}": str(v) for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def service_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def service_server(service_store: Path) -> Iterator[LiveServer]:
    """The main test server: batches of up to 32, 20 ms batching delay, preset off by default."""
    server = LiveServer(
        service_command(),
        env=service_env(
            service_store,
            max_batch_size=32,
            max_batch_delay_ms=20,
            default_preset="off",
            max_images_per_request=256,
            max_body_bytes=16 * 1024 * 1024,
        ),
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model():
    """An untrained micro model with a sharpened classifier, so entropies are far from log 10
    and attacks have decisions to flip (shared by the defense, attack and audit tests)."""
    import torch

    from deqguard.models import build_model

    torch.manual_seed(0)
    m = build_model("micro").eval()
    with torch.no_grad():
        m.classifier.weight.mul_(30)
    return m
