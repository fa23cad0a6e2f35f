"""Service fixtures: the tiny model store, the app in process, and the live test server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._inprocess import InProcessApp
from tests._live import LiveServer
from tests.service._server import TEST_MODEL, build_test_store, service_command, service_env

# the main test service: batches of up to 32, 20 ms batching delay, preset off by default
MAIN = dict(
    max_batch_size=32,
    max_batch_delay_ms=20,
    default_preset="off",
    max_images_per_request=256,
    max_body_bytes=16 * 1024 * 1024,
)


@pytest.fixture(scope="session")
def service_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_store(tmp_path_factory.mktemp("model_store"))


@pytest.fixture(scope="session")
def service_server(service_store: Path) -> Iterator[LiveServer]:
    """The main test service on a real uvicorn server (for the Triton client)."""
    server = LiveServer(service_command(), env=service_env(service_store, **MAIN))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_client(service_store: Path) -> Iterator[httpx.Client]:
    """The main test service in process (``create_app``, same settings as the live server's)."""
    from service.app import create_app
    from service.settings import ServiceSettings

    settings = ServiceSettings(
        model_store=service_store,
        model=TEST_MODEL,
        device="cpu",
        torch_threads=1,
        default_deadline_ms=3_600_000,  # no request of ours should hit it on a busy CPU
        **MAIN,
    )
    with InProcessApp(create_app(settings)) as client:
        yield client
