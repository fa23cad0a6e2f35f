"""Helpers of the container tests: docker commands, the base image, the build, CIFAR-10 PNGs.

Only ``make image-test`` and ``make compose-test`` run these tests (they set
``DEQGUARD_DOCKER_TESTS=1``); they need root and a Docker engine, which those targets provide.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "nvidia/cuda:13.0.0-runtime-ubuntu24.04"  # the Dockerfile's default
LOCAL_BASE = "deqguard/debian-base:bookworm"  # scripts/make_local_images.sh base
IMAGE = os.environ.get("IMAGE_TEST_TAG", "deqguard:image-test")
LOG_DIR = Path(os.environ.get("IMAGE_TEST_LOG_DIR", "/tmp/deqguard-image-test"))
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def say(msg: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docker(
    *args: str, check: bool = True, timeout: float | None = 600.0, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=input is None,
        input=input,
        timeout=timeout,
    )
    if isinstance(out.stdout, bytes):
        out.stdout = out.stdout.decode(errors="replace")
        out.stderr = out.stderr.decode(errors="replace")
    if check and out.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} -> {out.returncode}:\n{out.stderr}")
    return out


def have_image(tag: str) -> bool:
    return docker("image", "inspect", tag, check=False).returncode == 0


def run_logged(argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> float:
    """Run a command from the repo root, output to ``log``; seconds it took (raises on failure)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("wb") as f:
        rc = subprocess.run(
            list(argv),
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        ).returncode
    took = time.monotonic() - t0
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"{' '.join(argv)} failed ({rc}); last output:\n{tail}")
    return took


def base_image() -> str:
    """The base to build on: IMAGE_TEST_BASE if set; else the Dockerfile's default when it is
    here or can be pulled; else a minimal Debian made with debootstrap + docker import."""
    chosen = os.environ.get("IMAGE_TEST_BASE")
    if chosen:
        return chosen
    if have_image(DEFAULT_BASE):
        return DEFAULT_BASE
    pulled = docker("pull", DEFAULT_BASE, check=False, timeout=300)
    if pulled.returncode == 0:
        return DEFAULT_BASE
    say(
        f"cannot pull {DEFAULT_BASE} ({pulled.stderr.strip().splitlines()[-1:]}); using {LOCAL_BASE}"
    )
    if not have_image(LOCAL_BASE):
        say("making it: debootstrap + docker import (scripts/make_local_images.sh base)")
        took = run_logged(["scripts/make_local_images.sh", "base"], LOG_DIR / "base.log")
        say(f"{LOCAL_BASE} made in {took:.0f} s")
    return LOCAL_BASE


def build_image(base: str, tag: str = IMAGE) -> float:
    """``make image`` (wheelhouse + docker build) on ``base``; seconds it took."""
    say(f"make image BASE_IMAGE={base} IMAGE={tag} (log: {LOG_DIR / 'build.log'})")
    return run_logged(
        ["make", "image", f"BASE_IMAGE={base}", f"IMAGE={tag}"], LOG_DIR / "build.log"
    )


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())


def wait_for(
    probe: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None
) -> float:
    """Poll ``probe`` every 0.1 s; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if probe():
                return time.monotonic()
        except (httpx.HTTPError, OSError):
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"gave up waiting for {what}: the container is gone")
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached within {timeout:.0f} s")


def ready(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url + "/readyz", timeout=2.0).status_code == 200


def cifar_root() -> Path:
    """The CIFAR-10 root holding cifar-10-batches-py/ (DEQGUARD_CIFAR_DIR, else ../shared/data)."""
    for cand in (os.environ.get("DEQGUARD_CIFAR_DIR"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "cifar-10-batches-py" / "test_batch").is_file():
            return Path(cand)
    raise FileNotFoundError("no cifar-10-batches-py/test_batch (set DEQGUARD_CIFAR_DIR)")


def cifar_test_images(indices: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """uint8 [N, 32, 32, 3] test images and their labels (the official test_batch order)."""
    with (cifar_root() / "cifar-10-batches-py" / "test_batch").open("rb") as f:
        batch = pickle.load(f, encoding="latin1")  # noqa: S301  (the project's own data copy)
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = list(batch["labels"])
    return data[list(indices)], [labels[i] for i in indices]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def offline_predictions(images: np.ndarray, model: str, preset: str = "paper") -> np.ndarray:
    """Probabilities [N, 10] of the library (deqguard) on the same images: the shipped model
    from model_store/, loaded as training/evaluation load it, with the service's default preset."""
    import torch

    from deqguard.defense import defended_forward, get_preset
    from deqguard.store import load_entry

    entry = load_entry(REPO / "model_store", model)
    solver = entry.manifest.solver
    steps = solver.max_steps or 8
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    res = defended_forward(entry.model, x, get_preset(preset), solver, steps=steps)
    return torch.softmax(res.logits.detach().float(), dim=1).numpy()
