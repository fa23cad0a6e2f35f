"""Backpropagation through the served solve: the differentiable Broyden takes the served
solver's very steps, its gradient is the served prediction's true one (finite differences),
and the attack surrogate built on it returns the served logits bit for bit."""

from __future__ import annotations

import pytest
import torch

from deqguard.attacks.apgd import ServedSurrogate, SolverGradSurrogate
from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams, defended_forward
from deqguard.dynamics import cell_fn
from deqguard.solvers import BroydenSolver
from deqguard.solvers.broyden import DifferentiableBroydenSolver
from tests._toys import ToyClassifier


@pytest.mark.parametrize("freeze", [False, True])
def test_the_differentiable_broyden_takes_the_same_steps(model, freeze) -> None:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fn = cell_fn(model, model.inject(x))
    z0 = model.zero_state(4, x.device, x.dtype)
    tol = 0.0
    with torch.no_grad():
        if freeze:  # a tolerance that half the rows reach by step 4: masked steps after it
            _, t0 = BroydenSolver(SolverConfig(max_steps=4, tol=0)).solve(fn, z0)
            assert t0 is not None
            tol = float(t0.residuals[-1].median())
        cfg = SolverConfig(max_steps=8, tol=tol)
        a, ta = BroydenSolver(cfg).solve(fn, z0)
        b, tb = DifferentiableBroydenSolver(cfg).solve(fn, z0)
    assert ta is not None and tb is not None
    for za, zb in zip(ta.states, tb.states, strict=True):
        assert torch.equal(za, zb)
    assert torch.equal(a.nfe, b.nfe)
    if freeze:
        assert len(set(a.nfe.tolist())) > 1  # rows froze at different steps: masked steps ran


def test_resetting_some_rows_forgets_the_same_memory() -> None:
    torch.manual_seed(0)
    a_mat = torch.randn(6, 6, dtype=torch.float64) * 0.1
    b = torch.randn(3, 6, dtype=torch.float64)

    def fn(z, index):
        return z @ a_mat.T + (b if index is None else b[index])

    cfg = SolverConfig(max_steps=4, tol=0)
    which = torch.tensor([True, False, True])
    mems = []
    for solver in (BroydenSolver(cfg), DifferentiableBroydenSolver(cfg)):
        state, _ = solver.solve(fn, torch.zeros_like(b), record=False)
        solver._reset_memory(state, which)
        k = state.memory["count"]
        mems.append((state.memory["us"][:, :k], state.memory["vts"][:, :k]))
    for plain, diff in zip(*mems, strict=True):
        assert torch.equal(plain, diff)
    assert bool((mems[1][0][which] == 0).all()) and bool((mems[1][0][~which] != 0).any())


def test_a_full_memory_wraps_around_and_restarts_the_same_way() -> None:
    # memory 3 over 8 steps: the buffer fills (appends), then its slots are replaced in the
    # served solver's order; a retarget of every row mid-way restarts it from empty
    torch.manual_seed(0)
    a_mat = torch.randn(6, 6, dtype=torch.float64) * 0.3
    b = torch.randn(3, 6, dtype=torch.float64)

    def fn(z, index):
        return torch.tanh(z @ a_mat.T + (b if index is None else b[index]))

    cfg = SolverConfig(max_steps=8, tol=0, memory=3)
    runs = []
    for solver in (BroydenSolver(cfg), DifferentiableBroydenSolver(cfg)):
        state, traj = solver.solve(fn, torch.zeros_like(b))
        solver.retarget(fn, state)  # every row: the memory restarts
        state = solver.advance(fn, state, 5, traj)
        assert traj is not None
        runs.append(traj.states)
    for za, zb in zip(*runs, strict=True):
        assert torch.equal(za, zb)


def _toy() -> ToyClassifier:
    # s = 0.95 and 4 steps: far from the fixed point, where a short unrolling from the served
    # state misses most of the input's influence (the case the surrogate exists for)
    return ToyClassifier(dim=10, in_dim=5, s=0.95, seed=3).double().eval()


def _finite_difference_grad(model, solver_cfg, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def loss(v: torch.Tensor) -> torch.Tensor:
        logits = defended_forward(model, v, DefenseParams(R=0), solver_cfg, steps=4).logits
        return logits.gather(1, y[:, None]).sum()

    h, g = 1e-6, torch.zeros_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[i] = h
            e = e.view_as(x)
            g.view(-1)[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    return g


def test_the_gradient_is_the_served_predictions_own() -> None:
    model = _toy()
    cfg = SolverConfig(max_steps=4, tol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 1, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 2])
    want = _finite_difference_grad(model, cfg, x, y)

    def grad_of(surrogate) -> torch.Tensor:
        v = x.clone().requires_grad_(True)
        surrogate(v).gather(1, y[:, None]).sum().backward()
        assert v.grad is not None
        return v.grad

    exact = grad_of(SolverGradSurrogate(model, cfg, steps=4))
    torch.testing.assert_close(exact, want, atol=1e-7, rtol=1e-6)
    unrolled = grad_of(ServedSurrogate(model, DefenseParams(R=0), cfg, steps=4, ka=2))
    assert (unrolled - want).abs().max() > 100 * (exact - want).abs().max()  # the contrast


@pytest.mark.parametrize("state", [None, 5])
def test_its_value_is_the_served_logits(model, state) -> None:
    """Undefended: the served solve's logits (deq_forward, one head at the served state) bit
    for bit, and defended_forward's at R = 0 to float rounding (its head runs on every state)."""
    from deqguard.dynamics import deq_forward

    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    served = deq_forward(model, x, None, steps=8, state_index=state, record=False).logits
    defended = defended_forward(model, x, DefenseParams(R=0, state=state), None, steps=8).logits
    surrogate = SolverGradSurrogate(model, None, steps=8, state=state)
    got = surrogate(x.clone().requires_grad_(True))
    assert got.requires_grad  # the graph to x
    assert torch.equal(got.detach(), served)
    torch.testing.assert_close(got.detach(), defended, atol=1e-5, rtol=0)
    assert torch.equal(got.argmax(1), defended.argmax(1))
    with pytest.raises(ValueError, match="served state"):
        SolverGradSurrogate(model, None, steps=8, state=9)
    with pytest.raises(ValueError, match="anderson"):
        SolverGradSurrogate(model, SolverConfig(name="anderson"), steps=8)


def test_undefended_grad_solver_switches_every_undefended_attack() -> None:
    from deqguard.audit import AuditConfig, build_suite

    for suite in ("quick", "adaptive"):
        for defense in ("off", "paper"):
            base = build_suite(AuditConfig(model="t", suite=suite, defense=defense))
            cfg = AuditConfig(model="t", suite=suite, defense=defense, undefended_grad="solver")
            plans = build_suite(cfg)
            assert [p.name for p in plans] == [p.name for p in base]  # same attacks, same seeds
            for old, new in zip(base, plans, strict=True):
                want = "solver" if old.grad == "undefended" else old.grad
                assert (new.grad, new.select, new.family) == (want, old.select, old.family)
            assert any(p.grad == "solver" for p in plans)
            assert cfg.to_dict()["undefended_grad"] == "solver"
            assert AuditConfig.from_dict(cfg.to_dict()) == cfg
    # at the default, the fingerprint of an audit begun before the option is unchanged
    assert "undefended_grad" not in AuditConfig(model="t").to_dict()
    with pytest.raises(ValueError, match="undefended_grad must be one of"):
        AuditConfig(model="t", undefended_grad="bptt")


def _audit_with_solver_surrogate(model, monkeypatch, defense, y_params, seed, **kw):
    """A 2-image quick audit on ``model`` (labels: its served predictions) that records the
    ``params`` of every SolverGradSurrogate call; returns (report, recorded params)."""
    from deqguard.attacks import apgd as apgd_module
    from deqguard.audit import AuditConfig, AuditRunner

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    y = defended_forward(model, x, y_params, None, steps=2).logits.argmax(1)
    seen: list[object] = []
    real = apgd_module.SolverGradSurrogate.forward

    def counted(self, v):
        seen.append(self.params)
        return real(self, v)

    monkeypatch.setattr(apgd_module.SolverGradSurrogate, "forward", counted)
    base = dict(n=2, batch_size=2, steps=2, pgd_steps=1, apgd_iters=2, sanity_images=2)
    cfg = AuditConfig(model="t", defense=defense, suite="quick", **base, **kw)
    return AuditRunner(cfg, model=model, images=x, labels=y).run(), seen


def test_an_audit_runs_on_the_solver_gradient(model, monkeypatch) -> None:
    report, calls = _audit_with_solver_surrogate(
        model, monkeypatch, "off", DefenseParams(R=0), 3, undefended_grad="solver"
    )
    assert {a["grad"] for a in report["attacks"]} == {"solver"}
    assert report["clean"]["correct"] == 2  # labels are the served predictions
    assert calls  # the attacks and sanity checks ran on it


MIXED = [DefenseParams(R=3, Tf=2), DefenseParams(R=0), DefenseParams(R=2, Tf=3, eps=2 / 255)]


@pytest.mark.parametrize("mode", ["bpda", "exact"])
def test_the_differentiable_defended_forward_serves_the_same_values(model, mode) -> None:
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    served = defended_forward(model, x, MIXED, None, steps=8, trace=True)
    v = x.clone().requires_grad_(True)
    solver = DifferentiableBroydenSolver(SolverConfig())
    got = defended_forward(model, v, MIXED, solver, steps=8, trace=True, differentiable=mode)
    assert torch.equal(got.logits.detach(), served.logits)
    assert torch.equal(got.x_final, served.x_final) and torch.equal(got.acted, served.acted)
    assert got.trace is not None and served.trace is not None
    assert torch.equal(got.trace.states, served.trace.states)
    got.logits[:, 0].sum().backward()
    assert v.grad is not None and bool((v.grad.flatten(1).norm(dim=1) > 0).all())
    surrogate = SolverGradSurrogate(model, None, steps=8, params=MIXED[0], grad=mode)
    one = defended_forward(model, x[:1], MIXED[0], None, steps=8).logits
    assert torch.equal(surrogate(x[:1].clone().requires_grad_(True)).detach(), one)


def test_the_exact_defended_gradient_is_the_served_predictions_own() -> None:
    """Through the defense, ``exact``: the derivative of the defended logits as computed
    (sign steps held, the clips differentiated), which central differences reproduce while no
    sign flips."""
    model = _toy()
    cfg = SolverConfig(max_steps=4, tol=0)
    params = DefenseParams(R=2, Tf=2, beta=0.01, eps=0.05)
    x = torch.rand(2, 1, 1, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.tensor([1, 0])

    def loss(v: torch.Tensor) -> torch.Tensor:
        return defended_forward(model, v, params, cfg, steps=4).logits.gather(1, y[:, None]).sum()

    h, want = 1e-7, torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[i] = h
        e = e.view_as(x)
        want.view(-1)[i] = (loss(x + e) - loss(x - e)) / (2 * h)
    v = x.clone().requires_grad_(True)
    SolverGradSurrogate(model, cfg, steps=4, params=params, grad="exact")(v).gather(
        1, y[:, None]
    ).sum().backward()
    assert v.grad is not None
    torch.testing.assert_close(v.grad, want, atol=1e-6, rtol=1e-5)


def test_defended_grad_solver_gives_the_attacks_through_the_defense_that_gradient(
    model, monkeypatch
) -> None:
    from deqguard.audit import AuditConfig

    params = DefenseParams(R=1, Tf=2)
    report, seen = _audit_with_solver_surrogate(
        model, monkeypatch, params, params, 6, defended_grad="solver", attacks=("bpda-apgd-t",)
    )
    assert [a["name"] for a in report["attacks"]] == ["bpda-apgd-t"]
    assert seen and all(p == params for p in seen)  # attacks and sanity checks: defended
    assert report["config"]["defended_grad"] == "solver"
    assert "defended_grad" not in AuditConfig(model="t").to_dict()
