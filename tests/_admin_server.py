"""A real uvicorn server in a subprocess for the admin tests (so kill -9 is a real kill)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from deqguard.models import build_model
from deqguard.store import save_entry

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_store(root: Path) -> Path:
    """A model store with two small untrained micro models (seeded: same weights every run)."""
    torch.manual_seed(0)
    save_entry(root, "micro-a", build_model("micro").eval(), version="1")
    torch.manual_seed(1)
    save_entry(root, "micro-b", build_model("micro").eval(), version="1")
    return root


class LiveServer:
    """``python -m uvicorn --factory service.admin:create_full_app`` on a free port."""

    def __init__(
        self, store: Path, state_dir: Path, *, token: str | None = TOKEN, **env: str
    ) -> None:
        self.store = store
        self.state_dir = state_dir
        self.token = token
        self.env_extra = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / f"server-{self.port}.log"

    def start(self, timeout: float = 300.0) -> LiveServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEQGUARD_")}
        env.update(
            DEQGUARD_MODEL_STORE=str(self.store),
            DEQGUARD_MODEL="micro-a",
            DEQGUARD_DEVICE="cpu",
            DEQGUARD_STATE_DIR=str(self.state_dir),
            DEQGUARD_MAX_BATCH_DELAY_MS="2",
        )
        data = os.environ.get("DEQGUARD_DATA_DIR")
        if data:
            env["DEQGUARD_DATA_DIR"] = data
        if self.token is not None:
            env["DEQGUARD_ADMIN_TOKEN"] = self.token
        env.update(self.env_extra)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child keeps it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "service.admin:create_full_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.proc.kill()  # never leave an orphan behind
        self.proc.wait(timeout=30)
        raise TimeoutError(f"server not ready: {self.log_path.read_text()[-3000:]}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def client(self, auth: bool = True) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH if auth else {}, timeout=60)


def wait_job(client: httpx.Client, job_id: str, until: tuple[str, ...], timeout: float) -> dict:
    """Poll a job until its state is in ``until``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/admin/audits/{job_id}").json()
        if body["state"] in until:
            return body
        time.sleep(0.25)
    raise TimeoutError(f"job {job_id} still {body['state']} after {timeout}s: {body}")
