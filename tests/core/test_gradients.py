"""Training graphs: phantom = autograd through a hand-unrolled damped iteration; IFT = long
unrolled autograd; Jacobian penalty; random depth (Sec. 3.3)."""

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


def test_phantom_gradient_equals_autograd_through_a_hand_unrolled_damped_iteration():
    """phantom_steps against a reference written out here: f(z; x) = s tanh(W z + U x) by hand
    (not ``cell.cell``), one plain step from the detached z*, then K = 3 damped steps
    z <- (1 - lam) z + lam f(z), unrolled line by line; lam = 0.3 so that swapping the two
    weights would show. Values, parameter gradients, the input gradient and the gradient at
    z_leaf must agree; z* itself gets none (it is detached)."""
    torch.manual_seed(0)
    cell = ToyCell(dim=12, in_dim=6, s=0.7).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    z_star = torch.randn(4, 12, generator=g, dtype=torch.float64, requires_grad=True)
    lam = 0.3

    # the implementation
    x_ours = x.clone().requires_grad_(True)
    z, z_leaf, f_leaf = phantom_steps(cell, z_star, cell.inject(x_ours), damped_steps=3, lam=lam)
    cell.head(z).sin().sum().backward()
    ours = [p.grad.clone() for p in cell.parameters()] + [x_ours.grad, z_leaf.grad]
    assert z_star.grad is None
    assert z_leaf.is_leaf and z_leaf.requires_grad and torch.equal(z_leaf, z_star.detach())
    cell.zero_grad()

    # the reference: fresh leaves for the parameters, f written by hand
    w = cell.w.detach().clone().requires_grad_(True)
    u = cell.u.detach().clone().requires_grad_(True)
    readout = cell.readout.detach().clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    z0 = z_star.detach().clone().requires_grad_(True)

    def f(zz: torch.Tensor) -> torch.Tensor:
        return 0.7 * torch.tanh(zz @ w.T + x_ref @ u.T)

    z1 = f(z0)  # the plain step
    z2 = (1 - lam) * z1 + lam * f(z1)
    z3 = (1 - lam) * z2 + lam * f(z2)
    z4 = (1 - lam) * z3 + lam * f(z3)
    (z4 @ readout.T).sin().sum().backward()
    ref = [w.grad, u.grad, readout.grad, x_ref.grad, z0.grad]

    torch.testing.assert_close(f_leaf, z1, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(z, z4, atol=1e-12, rtol=1e-12)
    names = ["w", "u", "readout", "x", "z_leaf"]
    assert len(ours) == len(ref) == len(names)
    for name, a, b in zip(names, ours, ref, strict=True):
        assert b.abs().max() > 1e-3, name  # a gradient worth comparing
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


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
