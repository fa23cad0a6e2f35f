"""Helpers shared by the benchmark scripts: machine description, docs/BENCHMARKS.md sections, and
the A/B scripts' input gradient and alternating timing."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "BENCHMARKS.md"


def machine() -> str:
    """One line naming the hardware and software the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{dev}"
    )


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def write_section(key: str, body: str) -> None:
    """Replace (or append) the section between ``<!-- key:start -->`` and ``<!-- key:end -->``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + block + "\n"
    )
    BENCHMARKS_MD.write_text(text)


def input_gradient(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, d CE / d x) of ``fn`` at x [B, 3, H, W] with labels y [B]: one attack step."""
    xx = x.clone().requires_grad_(True)
    logits = fn(xx)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), xx)
    return logits.detach(), grad


def alternating_wall_s(
    runs: dict[str, Callable[[], object]], repeats: int, digits: int = 2
) -> dict[str, list[float]]:
    """Wall seconds of each run, ``repeats`` rounds of all of them in turn (an A/B in one
    process: machine drift hits both alike)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t = time.perf_counter()
            run()
            times[name].append(round(time.perf_counter() - t, digits))
    return times
