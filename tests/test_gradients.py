"""Training graphs: phantom = autograd through the same steps; IFT = long unrolled autograd;
Jacobian penalty; random depth (Sec. 3.3)."""

from __future__ import annotations

import torch

from deqguard.configs import SolverConfig
from deqguard.gradients import (
    implicit_step,
    jacobian_penalty,
    phantom_steps,
    sample_depth,
    select_at_depth,
    train_forward,
)
from deqguard.models import build_model
from deqguard.solvers import Trajectory
from tests._toys import ToyCell


def _grads(model):
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_phantom_gradient_equals_autograd_through_the_same_steps():
    torch.manual_seed(0)
    model = build_model("micro").eval().double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    z_star = torch.randn(3, model.state_size, dtype=torch.float64)

    inj = model.inject(x)
    z, _, _ = phantom_steps(model, z_star, inj, damped_steps=3, lam=0.5)
    model.head(z).square().sum().backward()
    ours = _grads(model)
    model.zero_grad()

    inj = model.inject(x)
    ref = model.cell(z_star.detach(), inj)
    for _ in range(3):
        ref = 0.5 * ref + 0.5 * model.cell(ref, inj)
    model.head(ref).square().sum().backward()
    for a, b in zip(ours, _grads(model), strict=True):
        torch.testing.assert_close(a, b)


def test_ift_gradient_matches_long_unrolled_autograd_in_float64():
    torch.manual_seed(0)
    cell = ToyCell(dim=12, in_dim=6, s=0.7).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)

    # Reference: 200 unrolled steps with full backprop (converged to machine precision).
    z = cell.zero_state(4, "cpu", torch.float64)
    inj = cell.inject(x)
    for _ in range(200):
        z = cell.cell(z, inj)
    cell.head(z).sin().sum().backward()
    ref = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone()]
    cell.zero_grad()
    x.grad = None

    with torch.no_grad():
        z_star = cell.zero_state(4, "cpu", torch.float64)
        inj0 = cell.inject(x)
        for _ in range(200):
            z_star = cell.cell(z_star, inj0)
    z = implicit_step(
        cell,
        z_star,
        cell.inject(x),
        SolverConfig(name="broyden", max_steps=60, tol=1e-13, memory=60),
    )
    cell.head(z).sin().sum().backward()
    ours = [p.grad.clone() for p in cell.parameters()] + [x.grad.clone()]
    for a, b in zip(ours, ref, strict=True):
        rel = (a - b).norm() / b.norm()
        assert rel < 1e-4, rel


def test_jacobian_penalty_estimates_the_frobenius_norm():
    torch.manual_seed(0)
    cell = ToyCell(dim=10, in_dim=4, s=0.7).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    z = torch.randn(2, 10, dtype=torch.float64, requires_grad=True)
    fz = cell.cell(z, cell.inject(x))
    est = jacobian_penalty(fz, z, n_vectors=4000)
    jac = torch.autograd.functional.jacobian(lambda zz: cell.cell(zz, cell.inject(x)), z)
    exact = sum(jac[b, :, b, :].pow(2).sum() for b in range(2)) / fz.numel()
    assert abs(est.item() - exact.item()) / exact.item() < 0.1
    est.backward()  # differentiable (create_graph)
    assert cell.w.grad is not None


def test_random_depth_draws_every_k_and_per_sample_varies():
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_depth(8, 4, generator=g) for _ in range(400)])
    assert (draws == draws[:, :1]).all()  # per batch: one depth for all samples
    assert set(draws[:, 0].tolist()) == set(range(1, 9))
    per = sample_depth(8, 256, per_sample=True, generator=g)
    assert set(per.tolist()) == set(range(1, 9))


def test_select_at_depth_picks_best_of_first_k():
    traj = Trajectory()
    res = torch.tensor([[0.9, 0.5], [0.3, 0.6], [0.4, 0.1]])  # [T=3, B=2]
    for t in range(3):
        traj.append(torch.full((2, 1), float(t + 1)), res[t])
    depth = torch.tensor([3, 2])
    best = select_at_depth(traj, depth)
    assert best[:, 0].tolist() == [2.0, 1.0]
    last = select_at_depth(traj, depth, mode="last")
    assert last[:, 0].tolist() == [3.0, 2.0]


def test_train_forward_modes_give_gradients():
    torch.manual_seed(0)
    model = build_model("micro", dropout=0.2).train()
    x = torch.rand(4, 3, 32, 32)
    for mode in ("phantom", "unrolled"):
        model.zero_grad()
        out = train_forward(
            model, x, SolverConfig(max_steps=4), mode=mode, depth=torch.full((4,), 2)
        )
        out.logits.logsumexp(1).sum().backward()
        assert model.stem[0].weight.grad is not None
        assert model.blocks[0].conv1.parametrizations.weight.original1.grad.abs().sum() > 0
