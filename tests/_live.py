"""The one live-server helper: a real server process on 127.0.0.1, for the tests that need a
real socket (signals, disconnects, the Triton client, kill -9 and resume, schemathesis).

``LiveServer`` starts any command that serves HTTP on a free port, waits for a readiness URL and
stops it with a signal, so tests exercise the real uvicorn stack (sockets, signals, lifespan),
not only an in-process client.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "LiveServer", "free_port", "http"]


# Linux: the server SIGTERMs itself if the test process dies (PR_SET_PDEATHSIG, kept across
# exec), so no server outlives a killed run. Set by a launcher in the child, not by a
# ``preexec_fn``: a preexec_fn makes subprocess fork() the test process and run its atfork
# handlers, and after the gRPC tests the test process has gRPC threads whose fork handler
# aborted the child before exec (exit -6, "epoll_wait error: Bad file descriptor"); without one,
# CPython starts the child with vfork and no handlers run.
_LAUNCH_WITH_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n"
)


def _with_pdeathsig(argv: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-c", _LAUNCH_WITH_PDEATHSIG, *argv]


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
        return int(s.getsockname()[1])


class LiveServer:
    """A server subprocess: ``start()`` waits until ``ready_path`` answers 200.

    ``{port}`` in ``argv`` becomes the port. ``env`` goes over this process's environment;
    ``drop_env_prefix`` first removes inherited variables with that prefix (``DEQGUARD_``: the
    server sees only what the test sets). ``headers`` are sent by :meth:`client`.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        ready_path: str = "/readyz",
        log_path: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        drop_env_prefix: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.argv = [a.replace("{port}", str(self.port)) for a in argv]
        base = {
            k: v
            for k, v in os.environ.items()
            if drop_env_prefix is None or not k.startswith(drop_env_prefix)
        }
        self.env = {**base, **(env or {})}
        self.ready_path = ready_path
        self.log_path = log_path or Path(f"/tmp/live-server-{self.port}.log")
        self.stop_signal = stop_signal
        self.headers = dict(headers or {})
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
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                _with_pdeathsig(list(self.argv)),
                env=self.env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
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
        self.kill9()  # never leave an orphan behind
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        """A real kill: no shutdown code runs."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(self.stop_signal)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def client(self, auth: bool = True) -> httpx.Client:
        """An httpx client on this server (with :attr:`headers` unless ``auth`` is False)."""
        return httpx.Client(base_url=self.url, headers=self.headers if auth else {}, timeout=60)
