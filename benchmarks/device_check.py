"""The CUDA path in one short run on a GPU machine: correctness, bf16, memory, speed, service.

Why: the service and the trainer both run on CUDA when there is a GPU (training with bf16
autocast by default), and the development machines have none. This program is the prepared
check for a session that is lent one (the `device` tool: one command, a few minutes): every
section runs on its own (a failure is recorded, the next section still runs), within a time
budget, and writes what it measured to ``--out`` as JSON and Markdown for docs/BENCHMARKS.md.

Sections:
  env       torch, CUDA, GPU, CPU cores.
  parity    the shipped models, float32, CUDA against this machine's CPU on the same images:
            undefended logits, decisions, per-step entropies; the ``paper`` defense's
            decisions, intervention steps and gradient steps.
  bf16      autocast bf16 on CUDA against float32 CUDA: how many decisions agree (undefended and
            ``paper``), i.e. whether bf16 serving would change answers.
  training  one campaign recipe (TRADES; TRADES + Sec. 3.3) on CUDA, bf16 autocast (the default)
            and float32: finite losses, samples/s, peak memory.
  speed     samples/s and peak memory, undefended and ``paper``, at several batch sizes on
            CUDA, and at batch 64 on this machine's CPU in the same run (the only ratio quoted).
  audit     the ``quick`` audit (undefended, then ``paper``) on a few images: images/s, so a
            later session can plan audits on a GPU.
  service   the app in process on CUDA (needs fastapi & co.; skipped when missing): /v1/predict
            with ``paper`` acts at steps 2, 4, 6, 8, and /metrics answers.

Data: ``--images FILE.npz`` (``images`` uint8 [N, 3, 32, 32], ``labels`` int64 [N]; written by
``scripts/device_prepare.sh`` from the first test images, since the CIFAR-10 root does not
travel), else the CIFAR-10 test split through deqguard.data.

    python benchmarks/device_check.py --out /tmp/device-check --images .device/test1000.npz
    python benchmarks/device_check.py --out /tmp/dc --device cpu --small   # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODELS = ("micro-trades-ri", "micro-trades")
STORE = Path(__file__).resolve().parents[1] / "model_store"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Check:
    """Runs sections within a time budget and collects their results."""

    def __init__(
        self, device: str, budget_s: float, small: bool, images: torch.Tensor, labels: torch.Tensor
    ) -> None:
        self.dev = torch.device(device)
        self.small = small
        self.images, self.labels = images, labels
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {}
        self.models: tuple[str, ...] = MODELS

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, fn: Callable[[], dict[str, Any]], need_s: float) -> None:
        if self.left() < need_s:
            self.results[name] = {
                "skipped": f"{self.left():.0f} s left of the budget, needs ~{need_s:.0f}"
            }
            log(f"{name}: skipped (budget)")
            return
        log(f"{name}: start")
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # recorded, and the next section still runs
            out = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        out["seconds"] = round(time.perf_counter() - t0, 1)
        self.results[name] = out
        log(f"{name}: {json.dumps(_brief(out))}")

    def sync(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)

    def peak_reset(self) -> None:
        if self.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak_mib(self) -> float | None:
        if self.dev.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.dev) / 2**20, 1)

    def batch(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n images (repeated when n exceeds what was loaded), float in [0, 1]."""
        reps = -(-n // len(self.labels))
        x = self.images.repeat(reps, 1, 1, 1)[:n].to(device).float().div_(255)
        return x, self.labels.repeat(reps)[:n].to(device)


def _brief(out: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in out.items() if k != "traceback"}


def _load(name: str, device: torch.device):  # type: ignore[no-untyped-def]
    from deqguard.store import load_entry

    return load_entry(STORE, name, device, inference=True)


def env_section(chk: Check) -> dict[str, Any]:
    out: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
    }
    if chk.dev.type == "cuda":
        p = torch.cuda.get_device_properties(chk.dev)
        out |= {
            "gpu": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
        }
    return out


def _forwards(model, x: torch.Tensor, solver, preset: str):  # type: ignore[no-untyped-def]
    from deqguard.defense import defended_forward, get_preset
    from deqguard.dynamics import deq_forward

    und = deq_forward(model, x, solver, steps=8)
    res = defended_forward(model, x, get_preset(preset), solver, steps=8)
    return und, res


def parity_section(chk: Check) -> dict[str, Any]:
    n = 8 if chk.small else 512
    out: dict[str, Any] = {"images": n}
    cpu = torch.device("cpu")
    for name in chk.models:
        e_cpu, e_dev = _load(name, cpu), _load(name, chk.dev)
        solver = e_dev.manifest.solver
        x, y = chk.batch(n, cpu)
        u_c, d_c = _forwards(e_cpu.model, x, solver, "paper")
        u_g, d_g = _forwards(e_dev.model, x.to(chk.dev), solver, "paper")
        u_g_pred, d_g_pred = u_g.logits.argmax(1).cpu(), d_g.prediction.cpu()
        out[name] = {
            "ref": e_dev.manifest.ref,
            "undefended_max_abs_logit_diff": float((u_c.logits - u_g.logits.cpu()).abs().max()),
            "undefended_decisions_agree": int((u_c.logits.argmax(1) == u_g_pred).sum()),
            "undefended_step_entropy_max_diff": float(
                (u_c.step_entropy - u_g.step_entropy.cpu()).abs().max()
            ),
            "undefended_accuracy_cpu_cuda": [
                float((u_c.logits.argmax(1) == y).float().mean()),
                float((u_g_pred == y).float().mean()),
            ],
            "paper_decisions_agree": int((d_c.prediction == d_g_pred).sum()),
            "paper_max_abs_logit_diff": float((d_c.logits - d_g.logits.cpu()).abs().max()),
            "paper_acted_steps_cuda": sorted(
                {int(t) + 1 for t in d_g.acted.any(1).nonzero().flatten().tolist()}
            ),
            "paper_acted_equal": bool(torch.equal(d_c.acted, d_g.acted.cpu())),
            "paper_grad_steps_equal": bool(torch.equal(d_c.grad_steps, d_g.grad_steps.cpu())),
            "paper_accuracy_cpu_cuda": [
                float((d_c.prediction == y).float().mean()),
                float((d_g_pred == y).float().mean()),
            ],
        }
    return out


def bf16_section(chk: Check) -> dict[str, Any]:
    if chk.dev.type != "cuda":
        return {"skipped": "bf16 autocast is checked on CUDA only"}
    n = 512
    out: dict[str, Any] = {"images": n}
    for name in chk.models:
        e = _load(name, chk.dev)
        x, y = chk.batch(n, chk.dev)
        u32, d32 = _forwards(e.model, x, e.manifest.solver, "paper")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            u16, d16 = _forwards(e.model, x, e.manifest.solver, "paper")
        out[name] = {
            "undefended_decisions_agree": int((u32.logits.argmax(1) == u16.logits.argmax(1)).sum()),
            "paper_decisions_agree": int((d32.prediction == d16.prediction).sum()),
            "undefended_accuracy_fp32_bf16": [
                float((u32.logits.argmax(1) == y).float().mean()),
                float((u16.logits.argmax(1) == y).float().mean()),
            ],
            "paper_accuracy_fp32_bf16": [
                float((d32.prediction == y).float().mean()),
                float((d16.prediction == y).float().mean()),
            ],
        }
    return out


def training_section(chk: Check) -> dict[str, Any]:
    from deqguard.data import CifarSplit
    from training.config import TrainConfig, load_config_file

    root = Path(__file__).resolve().parents[1] / "training" / "configs"
    recipe = load_config_file(root / "campaign-micro-trades.toml")
    data = CifarSplit(chk.images, chk.labels)
    steps = 1 if chk.small else 4
    out: dict[str, Any] = {"recipe": "campaign-micro-trades (TRADES, 3-step attack, N 8)"}
    batches = (16,) if chk.small else (64, 256)
    from training.trainer import Trainer

    for ri in ("off", "batch"):
        for bf16 in (True, False):
            for bs in batches:
                cfg = TrainConfig.from_dict(
                    dict(
                        recipe,
                        name="device-check",
                        random_intermediate=ri,
                        bf16=bf16,
                        batch_size=bs,
                        device=chk.dev.type,
                        pretrain_steps=0,
                        total_steps=1000,
                        n_val=min(100, len(data) // 10),
                        val_samples=0,
                        threads=None,
                        progress=False,
                        out_dir="/tmp/deqguard-device-check",
                    )
                )
                tr = Trainer(cfg, data=data)
                tr.train_step(0)  # warm-up (cuDNN autotuning, allocator)
                chk.sync()
                chk.peak_reset()
                times, losses = [], []
                for i in range(1, steps + 1):
                    t0 = time.perf_counter()
                    stats = tr.train_step(i)
                    chk.sync()
                    times.append(time.perf_counter() - t0)
                    losses.append(float(stats.get("loss", float("nan"))))
                key = f"{'trades_ri' if ri == 'batch' else 'trades'}_{'bf16' if bf16 else 'fp32'}_b{bs}"
                out[key] = {
                    "samples_per_s": round(bs / statistics.median(times), 1),
                    "losses": [round(v, 4) for v in losses],
                    "finite": all(v == v and abs(v) != float("inf") for v in losses),
                    "peak_mib": chk.peak_mib(),
                }
                if chk.left() < 60:
                    out["stopped"] = "budget"
                    return out
    return out


def _rate(chk: Check, fn: Callable[[], object], n: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(1 if chk.small else 3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return round(n / statistics.median(times), 1)


def speed_section(chk: Check) -> dict[str, Any]:
    from deqguard.cpu_memory import retain_freed_memory

    retain_freed_memory()
    out: dict[str, Any] = {}
    name = chk.models[0]
    e_dev = _load(name, chk.dev)
    solver = e_dev.manifest.solver
    from deqguard.defense import defended_forward, get_preset
    from deqguard.dynamics import deq_forward

    paper = get_preset("paper")
    for bs in (8,) if chk.small else (64, 256, 1024):
        x, _ = chk.batch(bs, chk.dev)
        row: dict[str, Any] = {}
        for label, fn in (
            ("undefended", lambda x=x: deq_forward(e_dev.model, x, solver, steps=8)),
            ("paper", lambda x=x: defended_forward(e_dev.model, x, paper, solver, steps=8)),
        ):
            chk.peak_reset()
            row[f"{label}_samples_per_s"] = _rate(chk, fn, bs, chk.dev)
            row[f"{label}_peak_mib"] = chk.peak_mib()
        out[f"{name}_{chk.dev.type}_b{bs}"] = row
        if chk.left() < 90:
            out["stopped"] = "budget"
            break
    if chk.dev.type == "cuda":  # the same run's CPU, batch 64: the one ratio worth quoting
        e_cpu = _load(name, torch.device("cpu"))
        x, _ = chk.batch(64, torch.device("cpu"))
        cpu = torch.device("cpu")
        out[f"{name}_cpu_b64"] = {
            "threads": torch.get_num_threads(),
            "undefended_samples_per_s": _rate(
                chk, lambda: deq_forward(e_cpu.model, x, solver, steps=8), 64, cpu
            ),
            "paper_samples_per_s": _rate(
                chk, lambda: defended_forward(e_cpu.model, x, paper, solver, steps=8), 64, cpu
            ),
        }
    return out


def audit_section(chk: Check) -> dict[str, Any]:
    """The quick suite's attacks without its sanity runs (about 8k white-box steps on 32 images,
    several minutes through the defense): a throughput figure for planning, not an audit."""
    from deqguard.audit import AuditCancelled, AuditConfig, AuditRunner
    from deqguard.store import load_entry

    entry = load_entry(STORE, chk.models[0], chk.dev)
    out: dict[str, Any] = {"model": entry.manifest.ref, "sanity": "off (see the docstring)"}
    for defense, n in (("off", 8 if chk.small else 128), ("paper", 8 if chk.small else 64)):
        x, y = chk.batch(n, chk.dev)
        cfg = AuditConfig(
            model=entry.manifest.ref,
            defense=defense,
            suite="quick",
            n=n,
            batch_size=8 if chk.small else 32,
            device=str(chk.dev),
            sanity_images=0,
            apgd_iters=5 if chk.small else 100,
        )
        runner = AuditRunner(
            cfg, model=entry.model, images=x, labels=y, solver=entry.manifest.solver
        )
        done: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        row: dict[str, Any] = {"images": n, "batch_size": cfg.batch_size}
        try:
            report = runner.run(progress=done.append, should_cancel=lambda: chk.left() < 45)
            row["worst_case"] = report.get("worst_case")
        except AuditCancelled:
            row["cancelled"] = f"budget, after {len(done)} of {runner.total_batches} batches"
        dt = time.perf_counter() - t0
        imgs = min(n, len(done) * cfg.batch_size)
        row |= {"seconds": round(dt, 1), "images_per_s": round(imgs / dt, 3) if imgs else None}
        out[defense] = row
    return out


def service_section(chk: Check) -> dict[str, Any]:
    try:
        import fastapi  # noqa: F401
        import pydantic_settings  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"service dependencies missing ({exc.name})"}
    from service.app import create_app
    from service.imaging import encode_png
    from service.settings import ServiceSettings
    from tests._inprocess import InProcessApp

    settings = ServiceSettings(model_store=STORE, model=chk.models[0], device=str(chk.dev))
    pngs = [encode_png(img.numpy()) for img in chk.images[:8]]
    out: dict[str, Any] = {}
    with InProcessApp(create_app(settings)) as client:
        files = [("images", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]
        r = client.post("/v1/predict", files=files, params={"preset": "paper"})
        out["predict_status"] = r.status_code
        if r.status_code == 200:
            body = r.json()
            out["acted_steps"] = sorted(
                {
                    s["step"]
                    for p in body["predictions"]
                    for s in p["entropy_trace"]
                    if s["defense_acted"]
                }
            )
            out["grad_steps"] = sorted({p["grad_steps"] for p in body["predictions"]})
            out["timing"] = body.get("timing")
            out["served_model"] = body.get("model")
        else:
            out["predict_body"] = r.text[:500]
        m = client.get("/metrics")
        out["metrics_status"] = m.status_code
        out["metrics_deqguard_series"] = sum(
            1 for line in m.text.splitlines() if line.startswith("deqguard_")
        )
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Device check", ""]
    for name, body in results.items():
        lines += [f"## {name}", "", "```json", json.dumps(_brief(body), indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=Path, default=None, help="npz with images, labels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--small", action="store_true", help="tiny sizes (a dry run on a CPU)")
    ap.add_argument("--sections", default="env,parity,bf16,training,speed,audit,service")
    ap.add_argument("--models", default=",".join(MODELS), help="shipped models to check")
    args = ap.parse_args(argv)
    if args.images is not None:
        import numpy as np

        with np.load(args.images) as f:
            images = torch.from_numpy(f["images"].copy())
            labels = torch.from_numpy(f["labels"].copy()).long()
    else:
        from deqguard.data import load_test

        split = load_test(n=1000)
        images, labels = split.images, split.labels
    chk = Check(args.device, args.budget_s, args.small, images, labels)
    chk.models = tuple(m for m in args.models.split(",") if m)
    need = {
        "env": 0,
        "parity": 30,
        "bf16": 20,
        "training": 60,
        "speed": 60,
        "audit": 60,
        "service": 30,
    }
    fns = {
        "env": env_section,
        "parity": parity_section,
        "bf16": bf16_section,
        "training": training_section,
        "speed": speed_section,
        "audit": audit_section,
        "service": service_section,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.sections.split(","):
        chk.section(name, lambda name=name: fns[name](chk), need[name])
        (args.out / "device_check.json").write_text(json.dumps(chk.results, indent=1))
        (args.out / "device_check.md").write_text(markdown(chk.results))
    failed = [k for k, v in chk.results.items() if "error" in v]
    log(f"done; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
