"""Predict latency while an audit job runs vs idle (issue 6 target: p99 at most 3x idle).

Starts a real server (``deqguard serve`` stack via uvicorn, admin API on) in a subprocess, then:

1. idle: open-loop Poisson arrivals of single-image ``POST /v1/predict`` requests for
   ``--duration`` seconds;
2. audit: the same load while an audit job (``--suite``, many images) runs on the same device;
   the job is cancelled afterwards.

Open-loop arrivals (not closed-loop clients) so that requests arrive while the audit computes,
which is the case the audit's yielding must handle. Prints JSON; ``--write-docs`` writes the
result into docs/BENCHMARKS.md with the command, machine, date and load average.

    .venv/bin/python benchmarks/bench_audit_latency.py --duration 60 --rate 4 --write-docs
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _png_b64(seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


async def open_loop(url: str, rate: float, duration: float, preset: str, seed: int) -> dict:
    """Poisson arrivals at ``rate``/s for ``duration`` s; latency of each request (ms)."""
    rng = random.Random(seed)
    images = [_png_b64(i) for i in range(16)]
    lat: list[float] = []
    codes: dict[int | str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:

        async def one(i: int) -> None:
            body = {"images": [images[i % len(images)]], "preset": preset}
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/predict", json=body)
            except httpx.HTTPError as exc:  # counted, never fatal: the table shows it
                key = type(exc).__name__
                codes[key] = codes.get(key, 0) + 1
                return
            dt = (time.perf_counter() - t0) * 1000.0
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            if r.status_code == 200:
                lat.append(dt)

        tasks = []
        t_end = time.perf_counter() + duration
        i = 0
        while time.perf_counter() < t_end:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    return {
        "requests": i,
        "codes": codes,
        "p50_ms": _pct(lat, 0.50),
        "p90_ms": _pct(lat, 0.90),
        "p99_ms": _pct(lat, 0.99),
        "max_ms": max(lat) if lat else float("nan"),
        "mean_ms": statistics.fmean(lat) if lat else float("nan"),
    }


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def start_server(args: argparse.Namespace, store: Path, state: Path, port: int) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEQGUARD_")}
    env.update(
        DEQGUARD_MODEL_STORE=str(store),
        DEQGUARD_MODEL=args.model,
        DEQGUARD_DEVICE=args.device,
        DEQGUARD_ADMIN_TOKEN=TOKEN,
        DEQGUARD_STATE_DIR=str(state),
    )
    if os.environ.get("DEQGUARD_DATA_DIR"):
        env["DEQGUARD_DATA_DIR"] = os.environ["DEQGUARD_DATA_DIR"]
    log = open(state / "server.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "service.admin:create_full_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit((state / "server.log").read_text()[-3000:])
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="micro-trades-ri", help="store entry to serve and audit")
    p.add_argument("--model-store", default=None, help="store root (default: the repo's)")
    p.add_argument("--untrained", action="store_true",
                   help="serve an untrained micro model from a temporary store")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--rate", type=float, default=2.0, help="predict arrivals per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--preset", default="paper", help="defense preset of the predict requests")
    p.add_argument("--suite", default="quick", help="audit suite")
    p.add_argument("--audit-batch", type=int, default=32)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    if args.untrained:
        from deqguard.models import build_model
        from deqguard.store import save_entry

        torch.manual_seed(0)
        store = tmp / "store"
        save_entry(store, "micro-untrained", build_model("micro").eval(), version="1")
        args.model = "micro-untrained"
    else:
        from deqguard.store import default_store_root

        store = Path(args.model_store) if args.model_store else default_store_root()
    if not args.port:
        from tests._admin_server import free_port

        args.port = free_port()
    state = tmp / "state"
    state.mkdir(parents=True)
    load_before = load_average()
    proc, url = start_server(args, store, state, args.port)
    try:
        # warm-up traffic, then the idle phase
        asyncio.run(open_loop(url, args.rate, 10.0, args.preset, seed=99))
        idle = asyncio.run(open_loop(url, args.rate, args.duration, args.preset, seed=1))
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
            body = {"model": args.model, "defense": "paper", "suite": args.suite,
                    "n_samples": 10_000, "batch_size": args.audit_batch, "seed": 0}  # fmt: skip
            r = c.post("/admin/audits", json=body)
            r.raise_for_status()
            job_id = r.json()["id"]
            while c.get(f"/admin/audits/{job_id}").json()["state"] != "running":
                time.sleep(0.2)
            time.sleep(3.0)  # the audit's model is loaded and computing
            m0 = c.get("/metrics").text
            busy = asyncio.run(open_loop(url, args.rate, args.duration, args.preset, seed=1))
            m1 = c.get("/metrics").text
            status = c.get(f"/admin/audits/{job_id}").json()
            c.delete(f"/admin/audits/{job_id}")
        audited = _metric(m1, "deqguard_audit_samples_processed_total") - _metric(
            m0, "deqguard_audit_samples_processed_total"
        )
        yielded = _metric(m1, "deqguard_audit_yield_seconds_total") - _metric(
            m0, "deqguard_audit_yield_seconds_total"
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    result = {
        "model": args.model,
        "untrained": args.untrained,
        "device": args.device,
        "rate_per_s": args.rate,
        "duration_s": args.duration,
        "preset": args.preset,
        "suite": args.suite,
        "audit_batch": args.audit_batch,
        "idle": idle,
        "audit": busy,
        "p99_ratio": busy["p99_ms"] / idle["p99_ms"],
        "p50_ratio": busy["p50_ms"] / idle["p50_ms"],
        "audit_images_during_phase": audited,
        "audit_yield_s_during_phase": yielded,
        "audit_progress_at_end": status["progress"],
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
        "date": now(),
        "commit": git_commit(),
    }
    print(json.dumps(result, indent=2))
    if args.write_docs:
        cmd = "python benchmarks/bench_audit_latency.py " + " ".join(
            shlex.quote(a) for a in sys.argv[1:] if a != "--write-docs"
        )
        ok = "meets" if result["p99_ratio"] <= 3.0 else "MISSES"
        body = f"""## Predict latency while an audit runs (issue 6)

Command: `{cmd}`
Machine: {result["machine"]}; date {result["date"]}; commit {result["commit"]};
load average before/after: {result["load_before"]} / {result["load_after"]}.
Model `{args.model}`{" (untrained micro: latency does not depend on accuracy)" if args.untrained else ""} on
`{args.device}`; open-loop Poisson arrivals at {args.rate}/s of one-image `POST /v1/predict`
(preset `{args.preset}`) for {args.duration:.0f} s per phase; audit suite `{args.suite}`, batch
{args.audit_batch}.

| phase | requests | p50 ms | p90 ms | p99 ms | max ms |
|---|---|---|---|---|---|
| idle | {idle["requests"]} | {idle["p50_ms"]:.0f} | {idle["p90_ms"]:.0f} | {idle["p99_ms"]:.0f} | {idle["max_ms"]:.0f} |
| audit running | {busy["requests"]} | {busy["p50_ms"]:.0f} | {busy["p90_ms"]:.0f} | {busy["p99_ms"]:.0f} | {busy["max_ms"]:.0f} |

p99 ratio audit/idle: **{result["p99_ratio"]:.2f}x** ({ok} the 3x target); p50 ratio
{result["p50_ratio"]:.2f}x. Response codes idle {idle["codes"]}, during the audit {busy["codes"]}.
The audit processed {audited:.0f} images during the loaded phase and waited
{yielded:.1f} s for predict traffic (`deqguard_audit_yield_seconds_total`).
"""
        write_section("audit-latency", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
