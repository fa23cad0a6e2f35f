"""The admin API under test: a real uvicorn server (so kill -9 is a real kill) on a store with
two small models."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import httpx
import torch

from deqguard.models import build_model
from deqguard.store import save_entry
from tests._live import LiveServer

__all__ = ["AUTH", "TOKEN", "admin_server", "make_store", "wait_job"]

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_store(root: Path) -> Path:
    """A model store with two small untrained micro models (seeded: same weights every run)."""
    torch.manual_seed(0)
    save_entry(root, "micro-a", build_model("micro").eval(), version="1")
    torch.manual_seed(1)
    save_entry(root, "micro-b", build_model("micro").eval(), version="1")
    return root


def admin_server(
    store: Path, state_dir: Path, *, token: str | None = TOKEN, **env: str
) -> LiveServer:
    """``python -m uvicorn --factory service.admin:create_full_app`` on a free port, with only
    the ``DEQGUARD_*`` settings given here (``env`` adds to them); not started yet."""
    settings = {
        "DEQGUARD_MODEL_STORE": str(store),
        "DEQGUARD_MODEL": "micro-a",
        "DEQGUARD_DEVICE": "cpu",
        "DEQGUARD_STATE_DIR": str(state_dir),
        "DEQGUARD_MAX_BATCH_DELAY_MS": "2",
        "DEQGUARD_GRPC_PORT": "0",  # no fixed port: several of these servers run at once
    }
    data = os.environ.get("DEQGUARD_DATA_DIR")
    if data:
        settings["DEQGUARD_DATA_DIR"] = data
    if token is not None:
        settings["DEQGUARD_ADMIN_TOKEN"] = token
    settings.update(env)
    state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "uvicorn", "--factory", "service.admin:create_full_app",
            "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning"]  # fmt: skip
    server = LiveServer(
        argv,
        env=settings,
        stop_signal=signal.SIGINT,
        drop_env_prefix="DEQGUARD_",
        headers=AUTH,
    )
    server.log_path = state_dir / f"server-{server.port}.log"
    return server


def wait_job(client: httpx.Client, job_id: str, until: tuple[str, ...], timeout: float) -> dict:
    """Poll a job until its state is in ``until``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/admin/audits/{job_id}").json()
        if body["state"] in until:
            return body
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {body['state']} after {timeout}s: {body}")
