"""Two quick probes of one f-evaluation on CPU (numbers quoted in docs/BENCHMARKS.md's notes).

    python benchmarks/probe_f.py compile   # micro-trades-ri's f, batch 64, 2 threads: eager vs torch.compile
    python benchmarks/probe_f.py profile   # tiny's f (random weights), batch 64, 1 thread: op breakdown
    python benchmarks/probe_f.py batch     # micro-trades-ri served path, batch 16 vs 32, off and paper
    python benchmarks/probe_f.py head      # head over 8 states x 32 rows: one call vs row chunks
    python benchmarks/probe_f.py alloc     # tiny served path, 1 thread: page faults and CPU time
                                           # with glibc's default vs deqguard.cpu_memory
    python benchmarks/probe_f.py inplace   # one [64, 120, 32, 32] channels-last tensor, 1 thread:
                                           # ReLU / add into a fresh tensor vs in place
    python benchmarks/probe_f.py broyden   # Broyden's coefficients over a [64, k, 30720] memory,
                                           # 1 thread: V^T x as bmm(V, x) vs bmm(x^T, V^T)
    python benchmarks/probe_f.py defended  # tiny served form, batch 64, 2 threads: op breakdown of
                                           # the undefended path and of Tf 2, R 10
    python benchmarks/probe_f.py gradstep [tiny|micro] [threads]
                                           # one input-gradient step of the defense (served form,
                                           # batch 64, random weights): float32 vs bf16 autocast,
                                           # and how many gradient signs agree
    python benchmarks/probe_f.py groupnorm # GroupNorm + ReLU forward and backward at f's shapes,
                                           # batch 64, 1 thread: NCHW vs channels-last vs
                                           # channels-last through an NCHW copy
    python benchmarks/probe_f.py gnlayout  # GroupNorm forward at micro's shapes, batch 64, 1 thread:
                                           # channels-last vs NCHW vs through a layout copy
    python benchmarks/probe_f.py trainstep [retain]
                                           # one campaign TRADES step (micro, batch 64, 1 thread):
                                           # op profile, CPU s, minor faults (retain: with
                                           # deqguard.cpu_memory's page reuse)

Not a benchmark with a target: a measurement of where f's time goes, to choose optimisations.
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from deqguard.dynamics import cached_weights  # noqa: E402


def _ms(fn, n: int = 20, clock=time.perf_counter, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t = clock()
    for _ in range(n):
        fn()
    return (clock() - t) / n * 1000


def compile_probe() -> None:
    from deqguard.data import load_test
    from deqguard.store import load_entry

    torch.set_num_threads(2)
    m = load_entry("model_store", "micro-trades-ri", "cpu").model.eval()
    x = load_test(n=64).float_images("cpu")
    with torch.no_grad(), cached_weights(m):
        inj = m.inject(x)
        z = m.zero_state(64, x.device, x.dtype)
        for _ in range(4):
            z = m.cell(z, inj)
        print("eager f ms", _ms(lambda: m.cell(z, inj)))
        print("eager head ms", _ms(lambda: m.head(z)))
        t0 = time.perf_counter()
        compiled = torch.compile(m.cell, dynamic=False)
        compiled(z, inj)
        print("compile s", time.perf_counter() - t0)
        print("compiled f ms", _ms(lambda: compiled(z, inj)))
        print("max |diff|", (compiled(z, inj) - m.cell(z, inj)).abs().max().item())


def profile_probe() -> None:
    from torch.profiler import ProfilerActivity, profile

    from deqguard.models import build_model

    torch.set_num_threads(1)
    m = build_model("tiny").eval()
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad(), cached_weights(m):
        inj = m.inject(x)
        z = m.zero_state(64, x.device, x.dtype)
        for _ in range(3):
            z = m.cell(z, inj)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                m.cell(z, inj)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def defended_probe() -> None:
    from torch.profiler import ProfilerActivity, profile

    from deqguard.configs import SolverConfig
    from deqguard.defense import DefenseParams, defended_forward
    from deqguard.models import build_model, prepare_for_inference

    torch.set_num_threads(2)
    torch.manual_seed(0)
    m = prepare_for_inference(build_model("tiny"))
    x = torch.rand(64, 3, 32, 32)
    cfg = SolverConfig(max_steps=8, tol=0.0)
    for params in (DefenseParams(R=0), DefenseParams(R=10, Tf=2)):
        defended_forward(m, x, params, cfg, steps=8)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            defended_forward(m, x, params, cfg, steps=8)
        print(f"R={params.R} Tf={params.Tf}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22))


_ALLOC_CHILD = """
import resource, sys, time, torch
from deqguard.configs import SolverConfig
from deqguard.cpu_memory import retain_freed_memory
from deqguard.defense import DefenseParams, defended_forward
from deqguard.models import build_model, prepare_for_inference
if sys.argv[1] == "retain":
    retain_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
m = prepare_for_inference(build_model("tiny"))
x = torch.rand(64, 3, 32, 32)
cfg = SolverConfig(max_steps=8, tol=0.0)
for p in (DefenseParams(R=0), DefenseParams(R=10, Tf=2)):
    defended_forward(m, x, p, cfg, steps=8)
    cpu, flt = [], []
    for _ in range(3):
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
        defended_forward(m, x, p, cfg, steps=8)
        cpu.append(time.process_time() - c0)
        flt.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(sys.argv[1], f"R={p.R}", "CPU s", [round(c, 2) for c in cpu], "faults", flt,
          "max RSS MiB", rss, flush=True)
"""


def alloc_probe() -> None:
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    for mode in ("default", "retain", "default", "retain"):  # separate processes: mallopt is global
        subprocess.run([sys.executable, "-c", _ALLOC_CHILD, mode], cwd=root, check=True)


def inplace_probe() -> None:
    import torch.nn.functional as F

    torch.set_num_threads(1)
    x = torch.randn(64, 120, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randn_like(x)
    for _ in range(2):
        print(
            "ms: relu", round(_ms(lambda: F.relu(x), 10), 2),
            "relu_", round(_ms(lambda: x.relu_(), 10), 2),
            "add", round(_ms(lambda: x + y, 10), 2),
            "add_", round(_ms(lambda: x.add_(y), 10), 2),
            flush=True,
        )  # fmt: skip


def batch_probe() -> None:
    from deqguard.data import load_test
    from deqguard.defense import defended_forward, get_preset
    from deqguard.store import load_entry

    entry = load_entry("model_store", "micro-trades-ri", "cpu")
    model = entry.model.eval()
    x = load_test(n=64).float_images("cpu")
    for preset in ("paper", "off"):
        params = get_preset(preset)
        for b in (16, 32):
            defended_forward(model, x[:b], params, entry.manifest.solver)
            t, n = time.perf_counter(), 0
            while time.perf_counter() - t < 6:
                defended_forward(model, x[:b], params, entry.manifest.solver)
                n += b
            print(preset, b, round(n / (time.perf_counter() - t), 1), "img/s", flush=True)


def _head_times(model: torch.nn.Module, states: torch.Tensor, kind: str) -> None:
    print(kind, "one call, 256 rows ms", round(_ms(lambda: model.head(states), 10), 1))
    for rows in (32, 64, 128):
        chunks = states.split(rows)
        ms = _ms(lambda chunks=chunks: [model.head(c) for c in chunks], 10)
        print(kind, f"chunks of {rows} rows ms", round(ms, 1), flush=True)


def head_probe() -> None:
    from deqguard.data import load_test
    from deqguard.store import load_entry

    torch.set_num_threads(2)
    x = load_test(n=32).float_images("cpu")
    for inference in (False, True):
        model = load_entry("model_store", "micro-trades-ri", "cpu", inference=inference).model
        with torch.no_grad(), cached_weights(model):
            inj = model.inject(x)
            z = model.zero_state(32, x.device, x.dtype)
            for _ in range(4):
                z = model.cell(z, inj)
            states = torch.cat([z] * 8)  # what head_on_states sees for N = 8, batch 32
            _head_times(model, states, "folded" if inference else "as saved")


def broyden_probe() -> None:
    """The coefficient product of Broyden's matvec in its two layouts (tiny's state size)."""
    torch.set_num_threads(1)
    b, m, d = 64, 8, 30720
    x = torch.randn(b, d)
    for k in (4, 8):
        full = torch.randn(b, m, d)
        vts = full[:, :k]  # the solver reads the filled slots as a view
        old = _ms(lambda: torch.bmm(vts, x.unsqueeze(2)))  # noqa: B023
        new = _ms(lambda: torch.bmm(x.unsqueeze(1), vts.transpose(1, 2)))  # noqa: B023
        diff = (
            (
                torch.bmm(vts, x.unsqueeze(2)).squeeze(2)
                - torch.bmm(x.unsqueeze(1), vts.transpose(1, 2)).squeeze(1)
            )
            .abs()
            .max()
        )
        print(f"k={k}: bmm(V, x) {old:.2f} ms, bmm(x^T, V^T) {new:.2f} ms, max diff {diff:.2e}")


def gradstep_probe() -> None:
    from deqguard.cpu_memory import retain_freed_memory
    from deqguard.dynamics import prediction_entropy
    from deqguard.models import build_model, prepare_for_inference
    from deqguard.models.mdeq import Injection

    name = sys.argv[2] if len(sys.argv) > 2 else "tiny"
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    retain_freed_memory()
    torch.manual_seed(0)
    m = prepare_for_inference(build_model(name))
    x = torch.rand(64, 3, 32, 32)
    with torch.no_grad():
        inj = m.inject(x)
        z = m.zero_state(64, x.device, x.dtype)
        for _ in range(4):
            z = m.cell(z, inj)
        inner = m.cell_inner(z)

    def step(bf16: bool) -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m.outer_head(z, inner, Injection(m.inject(xi).features)).float()
            (g,) = torch.autograd.grad(prediction_entropy(logits).sum(), xi)
        return g

    agree = (step(False).sign() == step(True).sign()).float().mean().item()
    print(f"{name}: gradient signs agreeing float32 vs bf16: {agree:.4f}")
    for _ in range(2):
        f32, b16 = _ms(lambda: step(False), 8), _ms(lambda: step(True), 8)
        print(f"{name}: grad step float32 {f32:.1f} ms, bf16 autocast {b16:.1f} ms (wall)")


class _GroupNormViaNCHW(torch.autograd.Function):
    """GroupNorm of a channels-last x computed by the NCHW kernels (copies in and out)."""

    @staticmethod
    def forward(ctx, x, w, b, groups, eps):  # type: ignore[override]
        n, c, h, wd = x.shape
        xc = x.contiguous()
        y, mean, rstd = torch.native_group_norm(xc, w, b, n, c, h * wd, groups, eps)
        ctx.save_for_backward(xc, w, mean, rstd)
        ctx.groups = groups
        return y.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        xc, w, mean, rstd = ctx.saved_tensors
        n, c, h, wd = xc.shape
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy.contiguous(), xc, mean, rstd, w, n, c, h * wd, ctx.groups, [True, True, True]
        )
        return gx.contiguous(memory_format=torch.channels_last), gw, gb, None, None


def _group_norm_by_sums(x: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm of a channels-last x [B, C, H, W] from per-channel sums over the dense
    [B, H*W, C] view (E[x^2] - E[x]^2: a candidate forward, not used by the model)."""
    b, c, h, w = x.shape
    g = gn.num_groups
    v = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    n = h * w * (c // g)
    mean = v.sum(1).view(b, g, -1).sum(2) / n
    sq = (v * v).sum(1).view(b, g, -1).sum(2) / n
    rstd = (sq - mean * mean + gn.eps).rsqrt()
    scale = rstd.repeat_interleave(c // g, dim=1) * gn.weight
    shift = gn.bias - mean.repeat_interleave(c // g, dim=1) * scale
    y = torch.addcmul(shift[:, None, :], v, scale[:, None, :])
    return y.view(b, h, w, c).permute(0, 3, 1, 2)


def groupnorm_probe() -> None:
    torch.set_num_threads(1)
    cl = torch.channels_last

    def cpu_ms(fn) -> float:
        return _ms(fn, 10, clock=time.process_time, warmup=2)

    for c, r in ((24, 32), (24, 16), (32, 16), (48, 16), (64, 8), (120, 32)):
        gn = torch.nn.GroupNorm(8 if c % 8 == 0 else 4, c)
        xs = torch.randn(64, c, r, r).contiguous(memory_format=cl)
        with torch.no_grad():
            err = (_group_norm_by_sums(xs, gn) - gn(xs)).abs().max().item()
            native = cpu_ms(functools.partial(gn, xs))
            by_sums = cpu_ms(functools.partial(_group_norm_by_sums, xs, gn))
        print(
            f"[64, {c}, {r}, {r}] channels-last forward: native {native:.2f} ms,"
            f" by sums {by_sums:.2f} ms (max diff {err:.1e})"
        )
        gy = torch.randn(64, c, r, r)
        for name, fmt in (("NCHW", torch.contiguous_format), ("channels-last", cl)):
            x = torch.randn(64, c, r, r).contiguous(memory_format=fmt).requires_grad_(True)
            g = gy.contiguous(memory_format=fmt)

            def fwd(x: torch.Tensor = x, gn: torch.nn.GroupNorm = gn) -> None:
                with torch.no_grad():
                    torch.relu_(gn(x))

            def both(x: torch.Tensor = x, g: torch.Tensor = g, gn: torch.nn.GroupNorm = gn) -> None:
                torch.autograd.grad(torch.relu(gn(x)), (x, gn.weight), g)

            print(
                f"[64, {c}, {r}, {r}] {name}: forward {cpu_ms(fwd):.2f} ms, forward + backward"
                f" {cpu_ms(both):.2f} ms"
            )
        x = torch.randn(64, c, r, r).contiguous(memory_format=cl).requires_grad_(True)
        g = gy.contiguous(memory_format=cl)

        def via(x: torch.Tensor = x, g: torch.Tensor = g, gn: torch.nn.GroupNorm = gn) -> None:
            y = _GroupNormViaNCHW.apply(x, gn.weight, gn.bias, gn.num_groups, gn.eps)
            torch.autograd.grad(torch.relu(y), (x, gn.weight), g)

        print(
            f"[64, {c}, {r}, {r}] channels-last via NCHW copies: forward + backward"
            f" {cpu_ms(via):.2f} ms"
        )


def gnlayout_probe() -> None:
    torch.set_num_threads(1)
    cl = torch.channels_last

    def cpu_ms(fn) -> float:
        return min(_ms(fn, 40, clock=time.process_time, warmup=5) for _ in range(3))

    with torch.no_grad():
        for c, r, g in ((64, 16, 8), (32, 16, 8), (128, 8, 8), (64, 8, 8)):
            gn = torch.nn.GroupNorm(g, c)
            x = torch.randn(64, c, r, r).contiguous(memory_format=cl)
            xn = x.contiguous()
            native = cpu_ms(lambda gn=gn, x=x: gn(x))
            via = cpu_ms(lambda gn=gn, x=x: gn(x.contiguous()).contiguous(memory_format=cl))
            nchw = cpu_ms(lambda gn=gn, xn=xn: gn(xn))
            copy = cpu_ms(lambda x=x: x.contiguous())
            print(
                f"[64, {c}, {r}, {r}] channels-last {native:.2f} ms, through NCHW {via:.2f},"
                f" NCHW alone {nchw:.2f}, one layout copy {copy:.2f}"
            )


def trainstep_probe() -> None:
    import resource

    from torch.profiler import ProfilerActivity, profile

    from training.config import TrainConfig, load_config_file
    from training.trainer import Trainer

    if "retain" in sys.argv[2:]:
        from deqguard.cpu_memory import retain_freed_memory

        retain_freed_memory()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config_file(root / "training" / "configs" / "campaign-micro-trades.toml")
    cfg = dict(cfg, name="probe", pretrain_steps=0, val_samples=0, jac_prob=0.0, progress=False)
    tr = Trainer(TrainConfig.from_dict(dict(cfg, out_dir="/tmp/deqguard-probe")))
    tr.train_step(0)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for i in range(1, 4):
        tr.train_step(i)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"CPU s / step {(time.process_time() - t0) / 3:.2f}, system s / step"
        f" {(r1.ru_stime - r0.ru_stime) / 3:.3f}, minor faults / step"
        f" {(r1.ru_minflt - r0.ru_minflt) // 3}"
    )
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(4, 7):
            tr.train_step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    {
        "groupnorm": groupnorm_probe,
        "gnlayout": gnlayout_probe,
        "trainstep": trainstep_probe,
        "gradstep": gradstep_probe,
        "broyden": broyden_probe,
        "compile": compile_probe,
        "profile": profile_probe,
        "batch": batch_probe,
        "head": head_probe,
        "defended": defended_probe,
        "alloc": alloc_probe,
        "inplace": inplace_probe,
    }[sys.argv[1] if len(sys.argv) > 1 else "profile"]()
