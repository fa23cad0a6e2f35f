"""Training: losses against hand computations, random depths, resume, DDP, CLI (real CIFAR-10).

Everything runs a tiny MDEQ (f at 16x16, 8/16 channels) on a few hundred real images, so the
suite stays fast on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deqguard.attacks import pgd_at_attack, trades_attack
from deqguard.configs import ModelConfig, SolverConfig
from deqguard.data import CifarSplit, DatasetError, load_cifar10, load_test
from deqguard.dynamics import deq_forward
from training.cli import main as cli_main
from training.config import TrainConfig
from training.losses import pgd_at_loss, trades_loss
from training.trainer import Trainer

TINY = ModelConfig(
    name="test-tiny",
    branch_channels=(8, 16),
    head_channels=(4, 8),
    final_channels=32,
    block_expansion=2,
    stem_stride=2,
    num_groups=4,
)


@pytest.fixture(scope="module")
def cifar_small() -> CifarSplit:
    try:
        return load_cifar10(train=True).head(240)
    except DatasetError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"CIFAR-10 not available: {exc}")


def _cfg(tmp_path: Path, **kw: object) -> TrainConfig:
    base = dict(
        name="t",
        out_dir=str(tmp_path),
        method="trades",
        solver_steps=3,
        phantom_k=1,
        attack_steps=1,
        attack_step_size=2 / 255,
        batch_size=8,
        total_steps=4,
        pretrain_steps=2,
        n_val=40,
        val_samples=0,
        val_every=0,
        progress=False,
        threads=1,
        device="cpu",
        checkpoint_every_min=60.0,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- losses by hand
def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = (z - z.max(1, keepdim=True).values).exp()
    return e / e.sum(1, keepdim=True)


def test_trades_and_pgd_at_losses_match_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    nat = torch.randn(5, 4, generator=g, dtype=torch.float64)
    adv = torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    p_nat, p_adv = _softmax(nat), _softmax(adv)
    ce = -torch.log(p_nat[torch.arange(5), y]).mean()
    kl = (p_nat * (p_nat.log() - p_adv.log())).sum()
    expected = ce + 6.0 * kl / 5
    assert torch.allclose(trades_loss(nat, adv, y, 6.0).double(), expected, atol=1e-6)
    ce_adv = -torch.log(p_adv[torch.arange(5), y]).mean()
    assert torch.allclose(pgd_at_loss(adv, y).double(), ce_adv, atol=1e-6)


def _linear_setup() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 2, 2, generator=g, dtype=torch.float64)
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    return x, w, y


def _proj(xa: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.minimum(torch.maximum(xa, x - eps), x + eps).clamp(0, 1)


def test_pgd_at_attack_matches_hand_computed_steps() -> None:
    x, w, y = _linear_setup()
    eps, alpha, steps = 8 / 255, 2 / 255, 3
    got = pgd_at_attack(
        lambda xa: xa.flatten(1) @ w,
        x,
        y,
        eps=eps,
        step_size=alpha,
        steps=steps,
        generator=torch.Generator().manual_seed(5),
    )
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    xa = (x + (2 * u - 1) * eps).clamp(0, 1)
    onehot = F.one_hot(y, 5).double()
    for _ in range(steps):
        grad = ((_softmax(xa.flatten(1) @ w) - onehot) @ w.T / len(y)).view_as(x)
        xa = _proj(xa + alpha * grad.sign(), x, eps)
    assert torch.allclose(got, xa)
    assert (got - x).abs().max() <= eps + 1e-12


def test_trades_attack_matches_hand_computed_steps() -> None:
    x, w, _ = _linear_setup()
    eps, alpha, steps = 8 / 255, 2 / 255, 2
    nat = x.flatten(1) @ w
    got = trades_attack(
        lambda xa: xa.flatten(1) @ w,
        x,
        nat,
        eps=eps,
        step_size=alpha,
        steps=steps,
        generator=torch.Generator().manual_seed(3),
    )
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    xa = x + 0.001 * noise
    p_nat = _softmax(nat)
    for _ in range(steps):
        # d/dx sum KL(p_nat || p_adv) = (p_adv - p_nat) W^T
        grad = ((_softmax(xa.flatten(1) @ w) - p_nat) @ w.T).view_as(x)
        xa = _proj(xa + alpha * grad.sign(), x, eps)
    assert torch.allclose(got, xa)


# --------------------------------------------------------------------------- trainer
def test_few_steps_lower_the_loss(tmp_path: Path, cifar_small: CifarSplit) -> None:
    cfg = _cfg(tmp_path, method="clean", pretrain_steps=100, total_steps=100, lr=3e-3)
    tr = Trainer(cfg, data=cifar_small, model_config=TINY)
    torch.manual_seed(0)
    x = tr.train_split.float_images()[:64]
    y = tr.train_split.labels[:64]

    def loss() -> float:
        with torch.no_grad():
            ((logits, _, _),) = tr.step_module([(x, None)], unrolled=True)
        return float(F.cross_entropy(logits, y))

    before = loss()
    for step in range(24):
        tr.train_step(step)
    assert loss() < before - 0.05


def test_random_depth_draws_every_k(tmp_path: Path, cifar_small: CifarSplit) -> None:
    tr = Trainer(
        _cfg(tmp_path, random_intermediate="batch", solver_steps=8),
        data=cifar_small,
        model_config=TINY,
    )
    gen = torch.Generator().manual_seed(0)
    draws = [tr._depth(8, 4, gen) for _ in range(300)]
    assert all(bool((d == d[0]).all()) for d in draws)  # one depth per forward call
    assert {int(d[0]) for d in draws} == set(range(1, 9))
    tr_s = Trainer(
        _cfg(tmp_path, random_intermediate="sample", solver_steps=8),
        data=cifar_small,
        model_config=TINY,
    )
    per_sample = torch.cat([tr_s._depth(8, 16, gen) for _ in range(40)])
    assert set(per_sample.tolist()) == set(range(1, 9))
    assert tr_s._depth(8, 4, gen) is not None
    assert Trainer(_cfg(tmp_path), data=cifar_small, model_config=TINY)._depth(8, 4, gen) is None


def test_trades_step_runs_with_random_depth_and_jacobian(
    tmp_path: Path, cifar_small: CifarSplit
) -> None:
    cfg = _cfg(tmp_path, random_intermediate="batch", pretrain_steps=0, jac_prob=1.0)
    tr = Trainer(cfg, data=cifar_small, model_config=TINY)
    stats = tr.train_step(0)
    assert {"loss", "task_loss", "jac", "clean_acc", "robust_acc"} <= set(stats)
    assert stats["loss"] > stats["task_loss"]  # the penalty was added
    assert tr.state.pretrain_end == 0


@pytest.mark.parametrize("method", ["trades", "pgd-at"])
def test_resumed_run_continues_the_same_schedule(
    tmp_path: Path, cifar_small: CifarSplit, method: str
) -> None:
    """Both training attacks (the core's, deqguard.attacks.training): a run stopped after 3
    steps and resumed ends bit-identical to the uninterrupted one."""
    cfg = _cfg(tmp_path, name="full", random_intermediate="batch", jac_prob=0.5, method=method)
    full = Trainer(cfg, data=cifar_small, model_config=TINY)
    full.fit()
    cfg_b = replace(cfg, name="split")
    first = Trainer(cfg_b, data=cifar_small, model_config=TINY)
    first.fit(max_new_steps=3)
    assert first.state.step == 3 and not first.state.finished
    lr_next = first.lr(3)
    resumed = Trainer(cfg_b, data=cifar_small, model_config=TINY)
    assert resumed.load_checkpoint()
    assert resumed.state.step == 3
    assert resumed.lr(resumed.state.step) == lr_next
    x_a, y_a = full.batch(3)
    x_b, y_b = resumed.batch(3)
    assert torch.equal(x_a, x_b) and torch.equal(y_a, y_b)  # same data/augmentation stream
    resumed.fit(resume=True)
    assert resumed.state.step == full.state.step == 4
    # bit-identical: a resumed run draws the same numbers and does the same arithmetic
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    opt_a = full.optimizer.state_dict()["state"]
    opt_b = resumed.optimizer.state_dict()["state"]
    for i in opt_a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[i][key], opt_b[i][key]), (i, key)


def test_resume_refuses_a_different_schedule(tmp_path: Path, cifar_small: CifarSplit) -> None:
    cfg = _cfg(tmp_path, total_steps=1, pretrain_steps=1)
    Trainer(cfg, data=cifar_small, model_config=TINY).fit()
    other = Trainer(replace(cfg, lr=5e-4), data=cifar_small, model_config=TINY)
    with pytest.raises(ValueError, match="lr"):
        other.load_checkpoint()


def test_fit_validates_and_keeps_best(tmp_path: Path, cifar_small: CifarSplit) -> None:
    cfg = _cfg(tmp_path, total_steps=3, pretrain_steps=1, val_samples=8, val_pgd_steps=1)
    tr = Trainer(cfg, data=cifar_small, model_config=TINY)
    state = tr.fit()
    assert state.finished and state.best_step == 3
    run = tmp_path / "t"
    assert (run / "best.safetensors").is_file() and (run / "state.safetensors").is_file()
    assert (run / "best.json").is_file() and (run / "state.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_pgd" in r for r in records) and any("loss" in r for r in records)
    assert any(p.name.startswith("events") for p in (run / "tb").iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, out_dir: str, data: CifarSplit) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = _cfg(Path(out_dir), total_steps=2, pretrain_steps=1, jac_prob=1.0)
    tr = Trainer(cfg, data=data, model_config=TINY)
    x0, _ = tr.batch(0)
    tr.fit()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    bufs = torch.cat([b.float().flatten() for b in tr.model.buffers()])
    torch.save({"params": flat, "buffers": bufs, "x0": x0}, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_keeps_replicas_identical(
    tmp_path: Path, cifar_small: CifarSplit
) -> None:
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(tmp_path), cifar_small), nprocs=2, join=True
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not torch.equal(r0["x0"], r1["x0"])  # the ranks saw different data
    assert torch.allclose(r0["params"], r1["params"], atol=1e-6)
    assert torch.allclose(r0["buffers"], r1["buffers"], atol=1e-6)


# --------------------------------------------------------------------------- config and CLI
def test_cli_merges_file_and_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text('name = "x"\nmethod = "pgd-at"\nattack_steps = 3\njac_weight = 2.0\n')
    assert cli_main(["--config", str(f), "--attack-steps", "5", "--print-config"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "pgd-at" and out["attack_steps"] == 5 and out["jac_weight"] == 2.0
    assert out["attack_solver_steps"] is None


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"metod": "trades"})
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="fgsm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="time_budget_min"):
        TrainConfig(schedule="time")
    with pytest.raises(SystemExit):
        cli_main(["--random-intermediate", "sometimes"])


def test_shipped_recipes_parse() -> None:
    root = Path(__file__).resolve().parents[2] / "training" / "configs"
    from training.config import load_config_file

    a = TrainConfig.from_dict(load_config_file(root / "micro-trades.toml"))
    b = TrainConfig.from_dict(load_config_file(root / "micro-trades-ri.toml"))
    assert a.random_intermediate == "off" and b.random_intermediate == "batch"
    diff = {k for k, v in a.to_dict().items() if b.to_dict()[k] != v}
    assert diff == {"name", "random_intermediate"}  # same seed, same budget


def _eq11_logits(
    model: torch.nn.Module, x: torch.Tensor, solver: SolverConfig, i: int, ka: int, lam: float
) -> torch.Tensor:
    """Eq. 11 as documented in training/evaluate.py: z[i] of the N-step solver held constant,
    one plain f step, ``ka`` damped steps, the head; the graph reaches x through the stem."""
    with torch.no_grad():
        z = deq_forward(model, x, solver, steps=i, record=False).state
    inj = model.inject(x)
    z = model.cell(z, inj)
    for _ in range(ka):
        z = (1 - lam) * z + lam * model.cell(z, inj)
    return model.head(z)


def _correct_under_pgd(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    solver: SolverConfig,
    spec: tuple[int, int, float] | str | None,
    *,
    steps: int,
    batch_size: int,
) -> torch.Tensor:
    """The documented evaluation protocol written out: per batch, l_inf PGD (eps 8/255, uniform
    random start from one generator seeded 0 for the whole run, ``steps`` sign steps of 2/255,
    ball then [0, 1] projection) on the Eq. 11 surrogate ``spec`` (None: no attack), judged by
    the undefended head at z[N]; ``spec = "solver"``: on the solver's own gradient (the core's
    ``SolverGradSurrogate``, itself checked against finite differences in
    tests/core/test_solver_gradient.py). Per-sample correctness [n] bool."""
    from deqguard.attacks import SolverGradSurrogate

    eps, alpha = 8 / 255, 2 / 255
    gen = torch.Generator().manual_seed(0)
    out = []
    for start in range(0, len(y), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if spec is not None:
            u = torch.rand(xb.shape, generator=gen, dtype=xb.dtype)
            xa = (xb + (2 * u - 1) * eps).clamp(0, 1)
            for _ in range(steps):
                xa = xa.detach().requires_grad_(True)
                if spec == "solver":
                    logits = SolverGradSurrogate(model, solver, steps=solver.max_steps)(xa)
                else:
                    logits = _eq11_logits(model, xa, solver, *spec)
                loss = F.cross_entropy(logits, yb)
                (g,) = torch.autograd.grad(loss, xa)
                xa = torch.minimum(torch.maximum(xa + alpha * g.sign(), xb - eps), xb + eps)
                xa = xa.clamp(0, 1)
            xb = xa.detach()
        with torch.no_grad():
            out.append(deq_forward(model, xb, solver, record=False).logits.argmax(1) == yb)
    return torch.cat(out)


def _plant_a_head(run_dir: Path, cfg: TrainConfig) -> None:
    """Replace the run's selected weights by the same network with a planted classifier.

    After one training step the micro model gives every image the same class, so all the
    evaluation's accuracies are 0 on the first 4 test images and no attack has a decision to
    flip. The planted head gives logits 1 for the label and 0 elsewhere on images 0-2 and -1
    for the label on image 3 (clean: right, right, right, wrong), and adds a large random map
    off the span of those 4 images' features: the clean logits stay exact, but a perturbation
    of the input moves them a lot, so the attacks flip some decisions and not others."""
    from training.checkpoint import read_best, write_best
    from training.evaluate import load_run_model

    model, _ = load_run_model(run_dir)
    test = load_test(n=4)
    x, y = test.float_images(), test.labels
    feats: list[torch.Tensor] = []
    hook = model.classifier.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    with torch.no_grad():
        deq_forward(
            model, x, SolverConfig(name=cfg.solver, max_steps=cfg.solver_steps), record=False
        )
    hook.remove()
    (h,) = feats  # the head at z[N]: [4, F]
    h = h.double()
    target = F.one_hot(y, 10).double() * torch.tensor([1.0, 1.0, 1.0, -1.0])[:, None]
    w = torch.linalg.pinv(h) @ (target - model.classifier.bias.detach().double())  # [F, 10]
    off_span = torch.eye(h.shape[1], dtype=torch.float64) - h.T @ torch.linalg.pinv(h.T)
    noise = torch.randn(h.shape[1], 10, generator=torch.Generator().manual_seed(0))
    w = w + 20.0 * off_span @ noise.double()
    weights, meta = read_best(run_dir)
    weights["classifier.weight"] = w.T.float().contiguous()
    write_best(run_dir, weights, {k: v for k, v in meta.items() if k != "weights_sha256"})


def test_evaluate_exports_a_verified_entry(tmp_path: Path, cifar_small: CifarSplit) -> None:
    """The exported metrics are what the documented protocol gives, recomputed here from the
    store's model (not the evaluator's loader) with the surrogate and PGD written out in this
    file: clean accuracy, the screen, the strongest intermediate attack rerun on all images,
    the final-state attack (i = N, 1 + final_ka steps, lam 0.5), their minimum and the
    per-sample worst case (correct under all three). The run gets a planted head (see
    ``_plant_a_head``) so that these numbers are not all 0. The evaluator's Eq. 11 surrogate is
    also checked on its own, value and input gradient, where numbers are not coarsened to
    4-image accuracies.

    Not asserted: robust <= clean accuracy. The evaluator judges each attack on its own, and PGD
    from a random start may land a clean-misclassified image on a correct decision; only
    ``pgd10_per_sample_worst_acc`` (clean & intermediate & final) is bounded by clean."""
    from deqguard.attacks import IntermediateSpec
    from deqguard.store import load_entry
    from training.evaluate import eq11_surrogate
    from training.evaluate import main as eval_main

    cfg = _cfg(tmp_path, name="m", model="micro", total_steps=1, pretrain_steps=1)
    cfg = replace(cfg, val_samples=4, val_pgd_steps=1)
    Trainer(cfg, data=cifar_small).fit()
    store = tmp_path / "store"
    argv = ["--run", str(tmp_path / "m"), "--store", str(store), "--n-test", "4"]
    argv += ["--screen", "2", "--grid", "1:1:1,2:1:0.5", "--final-ka", "1", "--steps", "1"]
    argv += ["--batch-size", "2"]
    _plant_a_head(tmp_path / "m", cfg)
    assert eval_main(argv) == 0
    entry = load_entry(store, "m")
    m = entry.manifest.metrics
    assert set(m["pgd10_intermediate_screen"]["accuracy"]) == {
        "z1-plain-Ka1-lam1",
        "z2-plain-Ka1-lam0.5",
    }
    assert entry.manifest.training_args["steps_done"] == 1

    model = entry.model
    n = cfg.solver_steps
    solver = SolverConfig(name=cfg.solver, max_steps=n)
    assert entry.manifest.solver == solver  # the decision's solver went into the entry
    test = load_test(n=4)
    x, y = test.float_images(), test.labels

    # the evaluator's surrogate against the formula, for every spec it ran
    for i, ka, lam in [(1, 1, 1.0), (2, 1, 0.5), (n, 1, 0.5)]:
        xa = x[:2].clone().requires_grad_(True)
        xb = x[:2].clone().requires_grad_(True)
        got = eq11_surrogate(model, solver, IntermediateSpec(i, ka, lam))(xa)
        ref = _eq11_logits(model, xb, solver, i, ka, lam)
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        (g_got,) = torch.autograd.grad(F.cross_entropy(got, y[:2]), xa)
        (g_ref,) = torch.autograd.grad(F.cross_entropy(ref, y[:2]), xb)
        torch.testing.assert_close(g_got, g_ref, atol=1e-7, rtol=1e-4)

    def acc(c: torch.Tensor) -> float:
        return float(c.float().mean())

    run = dict(steps=1, batch_size=2)
    clean = _correct_under_pgd(model, x, y, solver, None, **run)
    assert clean.tolist() == [True, True, True, False]  # the planted head is in the entry
    screen = {
        "z1-plain-Ka1-lam1": acc(
            _correct_under_pgd(model, x[:2], y[:2], solver, (1, 1, 1.0), **run)
        ),
        "z2-plain-Ka1-lam0.5": acc(
            _correct_under_pgd(model, x[:2], y[:2], solver, (2, 1, 0.5), **run)
        ),
    }
    worst = min(screen, key=screen.__getitem__)  # ties: the first in grid order
    inter = _correct_under_pgd(
        model,
        x,
        y,
        solver,
        {"z1-plain-Ka1-lam1": (1, 1, 1.0), "z2-plain-Ka1-lam0.5": (2, 1, 0.5)}[worst],
        **run,
    )
    final = _correct_under_pgd(model, x, y, solver, (n, 1, 0.5), **run)
    assert m["clean_acc"] == acc(clean)
    assert m["pgd10_intermediate_screen"] == {"n_images": 2, "accuracy": screen}
    assert m["pgd10_intermediate_attack"].startswith(f"Eq. 11 {worst} ")
    assert m["pgd10_intermediate_acc"] == acc(inter)
    assert m["pgd10_final_n_images"] == 4
    assert m["pgd10_final_acc"] == acc(final)
    assert m["pgd10_min_acc"] == min(acc(final), acc(inter))
    by_solver = _correct_under_pgd(model, x, y, solver, "solver", **run)
    assert m["pgd10_solver_n_images"] == 4 and m["pgd10_solver_acc"] == acc(by_solver)
    assert "backpropagated through" in m["pgd10_solver_attack"]
    assert m["pgd10_per_sample_worst_acc"] == acc(clean & inter & final & by_solver)
    assert m["pgd10_per_sample_worst_acc"] <= min(m["clean_acc"], m["pgd10_min_acc"])
    assert m["pgd10_min_acc"] < m["clean_acc"]  # not vacuous: the attacks do flip decisions

    # one attack more on the exported entry, merged into its metrics: the same attacks again
    extra = argv[:6] + ["--steps", "1", "--batch-size", "2"]
    assert eval_main(extra + ["--extra-solver"]) == 0
    assert eval_main(extra + ["--extra-final-ka", "1"]) == 0
    m2 = load_entry(store, "m").manifest.metrics
    assert m2["pgd10_solver_acc"] == acc(by_solver) and m2["pgd10_solver_n_images"] == 4
    assert m2["pgd10_solver_attack"] == m["pgd10_solver_attack"]
    assert m2["pgd10_final_ka1_acc"] == acc(final) and m2["pgd10_final_ka1_n_images"] == 4
    assert {"pgd10_solver_seconds", "pgd10_final_ka1_seconds"} <= set(m2)


def test_state_is_safetensors_and_json_and_refuses_a_torn_pair(
    tmp_path: Path, cifar_small: CifarSplit
) -> None:
    """The committed run state holds no pickle, and weights that do not match their JSON (a
    half-copied or hand-edited pair) are refused rather than resumed from."""
    from safetensors.torch import load_file

    from training.checkpoint import CheckpointError, read_state

    cfg = _cfg(tmp_path, total_steps=2, pretrain_steps=1)
    Trainer(cfg, data=cifar_small, model_config=TINY).fit()
    run = tmp_path / "t"
    tensors = load_file(run / "state.safetensors")
    assert any(k.startswith("model.") for k in tensors)
    assert any(k.startswith("optim.") and k.endswith(".exp_avg_sq") for k in tensors)
    meta = json.loads((run / "state.json").read_text())
    assert meta["step"] == 2 and meta["finished"] and meta["total_steps"] == 2
    assert not list(run.glob("*.pt"))
    blob = bytearray((run / "state.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (run / "state.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="sha256"):
        read_state(run)
