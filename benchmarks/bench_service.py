"""Load generator for the HTTP service: throughput and p50/p99 latency under concurrency.

For each preset and concurrency level, closed-loop clients (asyncio + httpx, one image per
request, raw PNG bodies of real CIFAR-10 test images) keep exactly ``c`` requests in flight for a
fixed time. Next to it: the offline batched throughput of the same model (``defended_forward`` on
full batches in this process, no HTTP) and the same server with batch size 1.

    python benchmarks/bench_service.py --model micro-trades-ri --write

Targets (issue 5): at 32 clients, HTTP throughput >= 0.8x offline batched, and >= 4x the
batch-size-1 server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import git_commit, load_average, machine, now, write_section  # noqa: E402
from deqguard.data import load_test  # noqa: E402
from deqguard.defense import defended_forward, get_preset  # noqa: E402
from deqguard.store import default_store_root, load_entry  # noqa: E402
from service.imaging import encode_png  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Level:
    preset: str
    concurrency: int
    batch: int
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    load: str
    mean_batch: float
    client_cpu_ms: float = float("nan")  # load generator CPU per request (this process)
    server_cpu_ms: float = float("nan")  # server process CPU per request (all its threads)
    device_busy: float = float("nan")  # batch seconds / wall seconds (over 1 with several workers)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m service.cli` on a free port with the given settings."""

    def __init__(self, store: Path, model: str, **settings: object) -> None:
        self.port = _free_port()
        env = {**os.environ, "DEQGUARD_MODEL_STORE": str(store), "DEQGUARD_MODEL": model}
        env.update({f"DEQGUARD_{k.upper()}": str(v) for k, v in settings.items()})
        env.setdefault("DEQGUARD_LOG_LEVEL", "warning")
        self.log = open(f"/tmp/bench-service-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--port", str(self.port)],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(self.log.name).read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def _batch_stats(url: str) -> tuple[float, float, float]:
    """(images batched, batches, device seconds) so far, from the server's /metrics."""
    text = httpx.get(url + "/metrics").text
    total = count = busy = 0.0
    for line in text.splitlines():
        if line.startswith("deqguard_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("deqguard_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("deqguard_inference_duration_seconds_sum"):
            busy += float(line.split()[-1])
    return total, count, busy


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _RawConnection:
    """A minimal HTTP/1.1 keep-alive client (one connection, one request at a time).

    On a shared machine the load generator's CPU is taken from the server: httpx costs several
    CPU milliseconds per request, this a fraction of one (the ``client CPU`` column shows it).
    It handles exactly what the service sends: a status line, headers, a Content-Length body.
    """

    def __init__(self, url: str) -> None:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        self.host, _, port = hostport.partition(":")
        self.port = int(port or 80)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, content_type: str) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def _run_level(
    url: str,
    pngs: list[bytes],
    preset: str,
    concurrency: int,
    seconds: float,
    min_requests: int,
    client_kind: str = "raw",
) -> tuple[list[float], int, float, float]:
    """Closed-loop clients; returns (latencies s, errors, elapsed s, client CPU s)."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    raw = [_RawConnection(url) for _ in range(concurrency)]
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        stop_at = time.perf_counter() + seconds
        counter = 0

        async def post(k: int, body: bytes) -> int:
            if client_kind == "raw":
                return await raw[k].post(f"/v1/predict?preset={preset}", body, "image/png")
            r = await client.post(
                url + "/v1/predict",
                content=body,
                headers={"Content-Type": "image/png"},
                params={"preset": preset},
            )
            return r.status_code

        async def worker(k: int) -> None:
            nonlocal errors, counter
            while time.perf_counter() < stop_at or counter < min_requests:
                i = counter
                counter += 1
                t0 = time.perf_counter()
                if await post(k, pngs[i % len(pngs)]) == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1

        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        finally:
            for conn in raw:
                conn.close()
        return latencies, errors, time.perf_counter() - t0, time.process_time() - cpu0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] * 1000.0


def bench_server(
    server: Server,
    pngs: list[bytes],
    presets: list[str],
    levels: list[int],
    seconds: float,
    batch: int,
    client_kind: str = "raw",
) -> list[Level]:
    out = []
    for preset in presets:
        # one short warm-up request per preset
        asyncio.run(_run_level(server.url, pngs, preset, 1, 0.0, 1, client_kind))
        for c in levels:
            s0, n0, b0 = _batch_stats(server.url)
            cpu0 = _process_cpu_s(server.proc.pid)
            load0 = load_average()
            lat, errors, elapsed, cpu = asyncio.run(
                _run_level(server.url, pngs, preset, c, seconds, c, client_kind)
            )
            s1, n1, b1 = _batch_stats(server.url)
            server_cpu = _process_cpu_s(server.proc.pid) - cpu0
            level = Level(
                preset=preset,
                concurrency=c,
                batch=batch,
                requests=len(lat),
                seconds=elapsed,
                p50_ms=_pct(lat, 0.5),
                p99_ms=_pct(lat, 0.99),
                errors=errors,
                load=f"{load0} / {load_average()}",
                mean_batch=(s1 - s0) / max(1.0, n1 - n0),
                client_cpu_ms=1000.0 * cpu / max(1, len(lat) + errors),
                server_cpu_ms=1000.0 * server_cpu / max(1, len(lat) + errors),
                device_busy=(b1 - b0) / elapsed,
            )
            print(
                f"server batch {batch:3d} {preset:6s} c={c:4d}: {level.throughput:7.2f} img/s  "
                f"p50 {level.p50_ms:8.1f} ms  p99 {level.p99_ms:8.1f} ms  mean batch "
                f"{level.mean_batch:5.1f}  device busy {level.device_busy:4.0%}  errors {errors}  "
                f"server CPU {level.server_cpu_ms:.1f} ms/req  client CPU {level.client_cpu_ms:.2f} ms/req  "
                f"load {level.load}",
                flush=True,
            )
            out.append(level)
    return out


def bench_offline(
    store: Path, model: str, x: torch.Tensor, presets: list[str], batch: int, seconds: float
) -> dict[str, float]:
    entry = load_entry(store, model, inference=True)  # what the server runs
    steps = entry.manifest.solver.max_steps or 8
    out = {}
    for preset in presets:
        params = get_preset(preset)
        defended_forward(entry.model, x[:batch], params, entry.manifest.solver, steps=steps)
        n, t0 = 0, time.perf_counter()
        i = 0
        while time.perf_counter() - t0 < seconds or n < 2 * batch:
            xb = x[(i * batch) % len(x) :][:batch]
            if len(xb) < batch:
                xb = x[:batch]
            defended_forward(entry.model, xb, params, entry.manifest.solver, steps=steps)
            n += len(xb)
            i += 1
        out[preset] = n / (time.perf_counter() - t0)
        print(f"offline batch {batch} {preset}: {out[preset]:.2f} img/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="micro-trades-ri")
    p.add_argument("--model-store", type=Path, default=default_store_root())
    p.add_argument("--presets", default="off,paper")
    p.add_argument("--concurrency", default="1,8,32,128")
    p.add_argument("--batch", type=int, default=32, help="server max batch size")
    p.add_argument("--delay-ms", type=float, default=5.0, help="server max batching delay")
    p.add_argument("--seconds", type=float, default=20.0, help="time per level")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--skip-bs1", action="store_true", help="skip the batch-size-1 server")
    p.add_argument(
        "--fill-fraction",
        type=float,
        default=None,
        help="DEQGUARD_BATCH_FILL_FRACTION of the batched server (default: the service's)",
    )
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="load generator HTTP client (raw: minimal keep-alive HTTP/1.1, the least CPU)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat everything (offline, batched server, batch-1 server) this many times and "
        "report each row's median round (the range shows the spread: shared VMs are noisy)",
    )
    p.add_argument("--write", action="store_true", help="write docs/BENCHMARKS.md's section")
    p.add_argument("--section", default="bench-service", help="section key in BENCHMARKS.md")
    args = p.parse_args(argv)
    presets = args.presets.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    split = load_test(n=256)
    pngs = [encode_png(img.numpy()) for img in split.images]
    x = split.float_images()
    started = now()
    load_before = load_average()
    # no deadline or queue limit: this measures throughput, not the overload policy
    common = {
        "max_batch_delay_ms": args.delay_ms,
        "default_preset": "off",
        "queue_size": 100_000,
        "default_deadline_ms": 3_600_000,
    }
    if args.threads:
        common["torch_threads"] = args.threads
    if args.fill_fraction is not None:
        common["batch_fill_fraction"] = args.fill_fraction

    offline_runs: dict[str, list[float]] = {k: [] for k in presets}
    level_runs: dict[tuple[str, int, int], list[Level]] = {}
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"--- round {r + 1} of {args.rounds}", flush=True)
        offline_r = bench_offline(
            args.model_store, args.model, x, presets, args.batch, args.seconds
        )
        for k, v in offline_r.items():
            offline_runs[k].append(v)
        server = Server(args.model_store, args.model, max_batch_size=args.batch, **common)
        try:
            got = bench_server(server, pngs, presets, levels, args.seconds, args.batch, args.client)
        finally:
            server.stop()
        if not args.skip_bs1:
            server1 = Server(args.model_store, args.model, max_batch_size=1, **common)
            try:
                got += bench_server(server1, pngs, presets, [32], args.seconds, 1, args.client)
            finally:
                server1.stop()
        for lv in got:
            level_runs.setdefault((lv.preset, lv.concurrency, lv.batch), []).append(lv)
    offline = {k: statistics.median(v) for k, v in offline_runs.items()}
    spread = {
        key: (min(lv.throughput for lv in runs), max(lv.throughput for lv in runs))
        for key, runs in level_runs.items()
    }
    chosen = {
        key: sorted(runs, key=lambda lv: lv.throughput)[(len(runs) - 1) // 2]
        for key, runs in level_runs.items()
    }
    batched = [lv for key, lv in chosen.items() if key[2] == args.batch]
    single = [lv for key, lv in chosen.items() if key[2] == 1]

    cmd = "python benchmarks/bench_service.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        f"## HTTP service: throughput and latency ({args.model}, presets {args.presets})",
        "",
        f"`{cmd.strip()}` - {started}, commit {git_commit()}.",
        f"Machine: {machine()}. Load average before/after: {load_before} / {load_average()} "
        "(shared machine: the load generator, the server and other jobs share the cores).",
        "",
        f"Server: max batch {args.batch}, max delay {args.delay_ms} ms; one image per request "
        "(raw PNG of a CIFAR-10 test image), closed-loop clients "
        f"({'minimal keep-alive HTTP/1.1 on asyncio' if args.client == 'raw' else 'httpx'}) for "
        f"{args.seconds:.0f} s per level (at least one request per client). "
        + (
            f"{args.rounds} rounds of everything; each row is its median round, with the range "
            "over rounds; offline figures are medians over rounds."
            if args.rounds > 1
            else "One round."
        ),
        "",
        "| preset | clients | server batch | img/s | img/s range | p50 ms | p99 ms | mean batch | device busy | errors | server CPU ms/req | client CPU ms/req | vs offline | vs batch-1 server |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bs1 = {lv.preset: lv.throughput for lv in single}
    for lv in batched + single:
        lo, hi = spread[(lv.preset, lv.concurrency, lv.batch)]
        vs_off = lv.throughput / offline[lv.preset]
        vs_one = (
            f"{lv.throughput / bs1[lv.preset]:.2f}x" if lv.batch > 1 and lv.preset in bs1 else "-"
        )
        lines.append(
            f"| {lv.preset} | {lv.concurrency} | {lv.batch} | {lv.throughput:.2f} | "
            f"{lo:.1f}-{hi:.1f} | "
            f"{lv.p50_ms:.0f} | {lv.p99_ms:.0f} | {lv.mean_batch:.1f} | {lv.device_busy:.0%} | "
            f"{lv.errors} | {lv.server_cpu_ms:.1f} | {lv.client_cpu_ms:.2f} | {vs_off:.2f}x | "
            f"{vs_one} |"
        )
    lines += [
        "",
        "Offline batched (the served model, `defended_forward` on batches of "
        f"{args.batch}, no HTTP): "
        + ", ".join(
            f"{k} {v:.2f} img/s (rounds: {', '.join(f'{r:.1f}' for r in offline_runs[k])})"
            for k, v in offline.items()
        )
        + ".",
    ]
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.section, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
