"""Attacks: eps-ball, loss increase, Eq. 11 semantics and gradient, the AutoAttack wrapper."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deqguard.attacks import (
    AutoAttackConfig,
    DefendedSurrogate,
    IntermediateSpec,
    IntermediateSurrogate,
    PGDConfig,
    SurrogateDecision,
    defended_decider,
    intermediate_grid,
    intermediate_subset,
    pgd_attack,
    run_autoattack,
    square_attack,
    transfer_attack,
    undefended_decider,
)
from deqguard.defense import DefenseParams, get_preset
from deqguard.dynamics import deq_forward

EPS = 8 / 255


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3])


def _in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float = EPS) -> bool:
    return bool((x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0.0 and x_adv.max() <= 1.0)


def test_grid_and_subsets() -> None:
    grid = intermediate_grid(8)
    assert len(grid) == 144 and len(set(grid)) == 144
    assert {s.i for s in grid} == set(range(1, 9)) and {s.Ka for s in grid} == set(range(1, 10))
    assert intermediate_subset("full") == sorted(grid, key=lambda s: (s.i, s.Ka, s.lam))
    assert len(intermediate_subset("half")) == 72
    assert 1 <= len(intermediate_subset("quick")) <= 8
    assert IntermediateSpec.parse("z3-Ka5-lam0.5") == IntermediateSpec(3, 5, 0.5)
    for bad in ("z3", "nope", "z3-Ka0-lam0.5"):
        with pytest.raises(ValueError):
            IntermediateSpec.parse(bad)


def test_eq11_lambda1_equals_plain_steps_and_gradient_is_autograds(model) -> None:
    m64 = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    i, k = 3, 2
    sur = IntermediateSurrogate(m64, IntermediateSpec(i, k, 1.0))
    traj = deq_forward(m64, x, steps=i).trajectory
    z = traj.states[i - 1]
    # Value: k plain fixed-point steps from z[i].
    x_ref = x.clone().requires_grad_(True)
    inj = m64.inject(x_ref)
    zz = z
    for _ in range(k):
        zz = m64.cell(zz, inj)
    ref = m64.head(zz)
    x_s = x.clone().requires_grad_(True)
    out = sur(x_s)
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-10)
    # Gradient: autograd through the same k steps (z[i] held), and a finite difference.
    y = torch.tensor([1, 2])
    (g_ref,) = torch.autograd.grad(F.cross_entropy(ref, y, reduction="sum"), x_ref)
    (g_s,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), x_s)
    torch.testing.assert_close(g_s, g_ref, atol=1e-10, rtol=1e-8)
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    h = 1e-6

    def loss_at(xx: torch.Tensor) -> torch.Tensor:
        inj2 = m64.inject(xx)
        z2 = z
        for _ in range(k):
            z2 = m64.cell(z2, inj2)
        return F.cross_entropy(m64.head(z2), y, reduction="sum")

    with torch.no_grad():
        fd = (loss_at(x + h * v) - loss_at(x - h * v)) / (2 * h)
    torch.testing.assert_close((g_s * v).sum(), fd, atol=1e-5, rtol=1e-4)


def test_pgd_stays_in_ball_and_raises_loss(model, data) -> None:
    x, y = data[0][:2], data[1][:2]
    sur = IntermediateSurrogate(model, IntermediateSpec(2, 1, 0.5))
    with torch.no_grad():
        before = F.cross_entropy(sur(x), y, reduction="none")
    cfg = PGDConfig(steps=2, restarts=2)
    res = pgd_attack(sur, x, y, cfg, generator=torch.Generator().manual_seed(0))
    assert _in_ball(res.x_adv, x)
    assert float(res.loss.mean()) > float(before.mean())
    with pytest.raises(ValueError, match="restarts"):
        PGDConfig(restarts=0)


def test_pgd_judged_by_decider_and_transfer(model, data) -> None:
    x, y = data
    sur = IntermediateSurrogate(model, IntermediateSpec(1, 1, 0.5))
    dec = undefended_decider(model, steps=4)
    res = transfer_attack(sur, dec, x, y, PGDConfig(steps=1))
    assert _in_ball(res.x_adv, x)
    torch.testing.assert_close(res.logits, dec(res.x_adv))
    assert torch.equal(res.correct, res.logits.argmax(1) == y)


def test_defended_surrogate_without_defense_is_the_intermediate_one(model, data) -> None:
    x, y = data
    spec = IntermediateSpec(3, 2, 0.5)
    a = IntermediateSurrogate(model, spec)
    b = DefendedSurrogate(model, get_preset("off"), spec, grad="exact")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = a(xa), b(xb)
    torch.testing.assert_close(la, lb)
    (ga,) = torch.autograd.grad(F.cross_entropy(la, y), xa)
    (gb,) = torch.autograd.grad(F.cross_entropy(lb, y), xb)
    torch.testing.assert_close(ga, gb)


def test_adaptive_pgd_through_the_defense_stays_in_ball(model, data) -> None:
    x, y = data
    params = DefenseParams(R=2, Tf=2)
    for grad in ("bpda", "exact"):
        sur = DefendedSurrogate(model, params, IntermediateSpec(4, 1, 0.5), steps=4, grad=grad)
        res = pgd_attack(
            sur, x[:2], y[:2], PGDConfig(steps=1), decider=defended_decider(model, params, steps=4)
        )
        assert _in_ball(res.x_adv, x[:2])
        assert bool(torch.isfinite(res.loss).all())


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_wrapper_has_decider_value_and_surrogate_gradient() -> None:
    sur = _Linear()
    x = torch.rand(3, 3, 8, 8, requires_grad=True)
    const = torch.tensor([5.0] + [0.0] * 9)
    wrap = SurrogateDecision(lambda v: const.expand(v.shape[0], 10), sur)
    out = wrap(x)
    torch.testing.assert_close(out, const.expand(3, 10))
    (g1,) = torch.autograd.grad(out[:, 3].sum(), x)
    (g2,) = torch.autograd.grad(sur(x)[:, 3].sum(), x)
    torch.testing.assert_close(g1, g2)


def test_autoattack_judges_with_the_decider() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    y = torch.zeros(6, dtype=torch.long)
    always_right = lambda v: F.one_hot(torch.zeros(v.shape[0], dtype=torch.long), 10).float() * 5  # noqa: E731
    cfg = AutoAttackConfig(version="custom", attacks=("apgd-ce",), apgd_iters=3)
    x_adv, correct = run_autoattack(SurrogateDecision(always_right, _Linear()), x, y, cfg)
    assert bool(correct.all())  # the surrogate alone is easy to fool; the decider is not
    assert _in_ball(x_adv, x)
    # The undefended surrogate on its own: AutoAttack flips predictions of a linear model.
    y_sur = _Linear()(x).argmax(1).detach()
    big = AutoAttackConfig(eps=0.5, version="custom", attacks=("apgd-ce",), apgd_iters=3)
    x_adv2, correct2 = run_autoattack(SurrogateDecision(None, _Linear()), x, y_sur, big)
    assert _in_ball(x_adv2, x, 0.5) and not bool(correct2.all())


def test_square_against_a_decider_stays_in_ball() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 8, 8, generator=g)
    lin = _Linear()
    y = lin(x).argmax(1).detach()
    x_adv, correct = square_attack(lambda v: lin(v), x, y, queries=20)
    assert _in_ball(x_adv, x)
    assert correct.shape == (4,)
