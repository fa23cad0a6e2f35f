"""Attacks: eps-ball, loss increase, Eq. 11 semantics and gradient, the defense's propagated
Jacobian against finite differences, the AutoAttack wrapper, Square against the defense."""

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
from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams, DefenseResult, defended_forward, get_preset
from deqguard.dynamics import deq_forward
from deqguard.models.mdeq import Injection

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


class _ToyImageDEQ(nn.Module):
    """A tiny DEQ on 3x4x4 images with the MDEQ API the defense uses: f(z; x) = 0.8 tanh(W z +
    U vec(x)), head = linear; float64 (``.float()`` for float32). While ``signs`` is a list,
    every input gradient that reaches ``inject`` (the defense's entropy steps) appends its
    sign, so a test can check that a perturbation left the sign pattern of the updates alone."""

    def __init__(self, dim: int = 16, classes: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.w = nn.Parameter(w / torch.linalg.matrix_norm(w, ord=2))
        self.u = nn.Parameter(torch.randn(dim, 48, generator=g, dtype=torch.float64) * 0.5)
        self.readout = nn.Parameter(torch.randn(classes, dim, generator=g, dtype=torch.float64) * 3)
        self.dim = dim
        self.signs: list[torch.Tensor] | None = None

    def inject(self, x: torch.Tensor) -> Injection:
        if self.signs is not None and x.requires_grad:
            x.register_hook(lambda g: self.signs.append(g.sign()))  # type: ignore[union-attr]
        return Injection(x.flatten(1) @ self.u.T)

    def cell_inner(self, z: torch.Tensor) -> list[torch.Tensor]:
        return [z @ self.w.T]

    def cell_outer(
        self, z: torch.Tensor, inner: list[torch.Tensor], injection: Injection
    ) -> torch.Tensor:
        return 0.8 * torch.tanh(inner[0] + injection.features)

    def cell(self, z: torch.Tensor, injection: Injection) -> torch.Tensor:
        return self.cell_outer(z, self.cell_inner(z), injection)

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.readout.T

    def zero_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch, self.dim, device=device, dtype=dtype)


# R differs per sample (4, 1, 0), so the defense's shrinking-subset path is taken (rounds 2-4
# update sample 0 alone). Sample 0: small steps, so the [0, 1] clip and the ball bind only
# after a few rounds; sample 1: beta < eps < 2 beta, both bind early. Tf = 1.
_JAC_PARAMS = [
    DefenseParams(beta=0.012, R=4, Tf=1, eps=0.05),
    DefenseParams(beta=0.03, R=1, Tf=1, eps=0.05),
    DefenseParams(R=0),
]
_JAC_STEPS = 4


def _jac_input() -> torch.Tensor:
    """[3, 3, 4, 4] float64 images: a third of the pixels within eps of 0 or 1, where the
    [0, 1] clip can bind, the rest well inside."""
    g = torch.Generator().manual_seed(2)
    x = 0.2 + 0.6 * torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    flat = x.view(3, -1)
    flat[:, 0::6] = 0.01 + 0.02 * torch.rand(3, 8, generator=g, dtype=torch.float64)
    flat[:, 3::6] = 0.99 - 0.02 * torch.rand(3, 8, generator=g, dtype=torch.float64)
    return x


def _defended(
    toy: _ToyImageDEQ, x: torch.Tensor, copies: int = 1
) -> tuple[list[torch.Tensor], DefenseResult]:
    """The defense's sign patterns on x, and its result (trace on). x holds ``copies`` blocks
    of the three samples (block-major), each block with ``_JAC_PARAMS``."""
    toy.signs = []
    res = defended_forward(
        toy, x, _JAC_PARAMS * copies, SolverConfig(tol=0.0), steps=_JAC_STEPS, trace=True
    )
    signs, toy.signs = toy.signs, None
    return signs, res


def test_exact_jacobian_of_the_defense_matches_finite_differences() -> None:
    """``DefenseTrace.jac[k]`` against central finite differences, in float64, of the defended
    input map x0 -> ``trace.inputs[k]`` (the real map: solver, entropy gradients and all).

    Definition checked: the sign of each entropy gradient is piecewise constant in x0, so where
    the sign pattern does not change the map is elementwise piecewise linear and its exact
    derivative is diagonal, 1 or 0 per pixel (0 where the [0, 1] clip, not the eps-ball which
    moves with x0, bound the pixel last; BPDA would be 1 everywhere). Each FD column perturbs
    one pixel position by +-h (h = 1e-6) in every sample (samples are independent; all columns
    run as one batch). The test first checks that the sign pattern of every entropy step is the
    same at x0 +- h as at x0, so FD and ``jac`` differentiate the same linear piece; then the
    whole FD Jacobian (48 x 48 per sample and step, off-diagonal included) must equal
    diag(jac[k]) to 1e-7. Inputs near 0 and 1 make the [0, 1] clip bind (checked), pixels also
    end on the ball and strictly inside it (checked), and R differs per sample."""
    toy = _ToyImageDEQ().eval()
    x0 = _jac_input()
    base_signs, base = _defended(toy, x0)
    assert len(base_signs) > 0  # the defense did take entropy steps
    jac = torch.stack(base.trace.jac)  # [N, B, 3, 4, 4]
    inputs = torch.stack(base.trace.inputs)
    assert set(jac.unique().tolist()) <= {0.0, 1.0}
    # the three cases the derivative has to get right all occur (at some step k, samples 0, 1)
    moved = (inputs - x0)[:, :2]
    in_box = (inputs[:, :2] == 0) | (inputs[:, :2] == 1)
    on_ball = (moved.abs() - 0.05).abs() < 1e-12
    assert bool(in_box.any())  # bound by the [0, 1] clip: derivative 0
    assert bool((on_ball & ~in_box).any())  # by the eps-ball (moves with x0): derivative 1
    assert bool(((moved != 0) & ~on_ball & ~in_box).any())  # unclipped: derivative 1
    torch.testing.assert_close(inputs[:, 2], x0[2].expand_as(inputs[:, 2]), atol=0, rtol=0)
    assert bool((jac[:, 2] == 1).all())  # R = 0: the identity

    # All FD columns in one batch: block (sign, pixel p) is x0 with pixel p of every sample
    # moved by sign * h (the defense treats samples independently).
    h = 1e-6
    n_pix = x0[0].numel()
    e = (h * torch.eye(n_pix, dtype=torch.float64)).view(n_pix, 1, *x0.shape[1:])
    batch = torch.cat([x0 + e, x0 - e]).reshape(-1, *x0.shape[1:])  # [2 * 48 * 3, 3, 4, 4]
    signs, res = _defended(toy, batch, copies=2 * n_pix)
    # the same sign pattern in every block as at x0: the FD does not cross a jump of the map
    assert len(signs) == len(base_signs)
    for s, b in zip(signs, base_signs):
        assert torch.equal(s, b.repeat(2 * n_pix, 1, 1, 1))
    # rows of inputs[k]: (+ or -, perturbed pixel, sample); columns: the output pixel
    out = torch.stack(res.trace.inputs).view(_JAC_STEPS, 2, n_pix, 3, n_pix)
    fd = ((out[:, 0] - out[:, 1]) / (2 * h)).permute(0, 2, 3, 1)  # [k, b, out, in]
    expected = torch.diag_embed(jac.flatten(2))  # [k, b, out, in]
    torch.testing.assert_close(fd, expected, atol=1e-7, rtol=0)


def test_defended_surrogate_gradient_is_the_jacobian_times_the_unroll_gradient() -> None:
    """The adaptive surrogate's input gradient, against a hand-written chain: z[i] (i = 2) of
    the defended dynamics held fixed, the Eq. 11 unroll (Ka = 2, lam = 0.5) on x_i = F_i(x), CE.
    ``exact``: d/dx = jac * (gradient at x_i), checked with central FD of that chain along
    random directions (F_i is the real defended input map); ``bpda``: J = 1, the plain gradient
    at x_i."""
    toy = _ToyImageDEQ().eval()
    x = _jac_input()
    y = torch.tensor([0, 1, 2])
    spec = IntermediateSpec(2, 2, 0.5)
    _, base = _defended(toy, x)
    k = spec.i - 1
    z_i = base.trace.states[k]

    def chain(x_in: torch.Tensor) -> torch.Tensor:
        inj = toy.inject(x_in)
        z = z_i
        for _ in range(spec.Ka):
            z = 0.5 * z + 0.5 * toy.cell(z, inj)
        return F.cross_entropy(toy.head(z), y, reduction="sum")

    grads = {}
    for mode in ("exact", "bpda"):
        sur = DefendedSurrogate(
            toy, _JAC_PARAMS, spec, SolverConfig(tol=0.0), steps=_JAC_STEPS, grad=mode
        )
        xs = x.clone().requires_grad_(True)
        (grads[mode],) = torch.autograd.grad(F.cross_entropy(sur(xs), y, reduction="sum"), xs)
    x_i = base.trace.inputs[k].clone().requires_grad_(True)
    (g_at_xi,) = torch.autograd.grad(chain(x_i), x_i)
    torch.testing.assert_close(grads["bpda"], g_at_xi, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grads["exact"], base.trace.jac[k] * g_at_xi, atol=1e-12, rtol=1e-10)
    assert bool((base.trace.jac[k] == 0).any())  # exact and bpda really differ here
    g = torch.Generator().manual_seed(4)
    h = 1e-6
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fd = (
                chain(_defended(toy, x + h * v)[1].trace.inputs[k])
                - chain(_defended(toy, x - h * v)[1].trace.inputs[k])
            ) / (2 * h)
        torch.testing.assert_close((grads["exact"] * v).sum(), fd, atol=1e-6, rtol=1e-6)


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


def _margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logit of the label minus the best other logit, [B] (< 0: misclassified)."""
    other = logits.clone()
    other[torch.arange(len(y)), y] = -float("inf")
    return logits[torch.arange(len(y)), y] - other.max(1).values


def test_square_against_the_defended_toy_keeps_a_fooling_point_whenever_a_query_fooled() -> None:
    """Square on the full defended pipeline of a toy DEQ (R = 2 entropy steps after every solver
    step), with every query logged. Each queried row is assigned to the sample whose eps-ball
    holds it. Then: results stay in the ball (fooling ones on its surface: Square uses the
    vertices of the ball); Square lowered the margin of every sample below its clean margin
    (some query did) and fooled some but not all; ``correct`` is the decider's verdict on the
    returned x_adv; and a sample is returned correct exactly when no query fooled it, i.e.
    whenever any query fooled the defended model, the returned example fools it too (robust
    samples come back as their clean image)."""
    toy = _ToyImageDEQ().float().eval()
    params = DefenseParams(beta=2 / 255, R=2, Tf=1, eps=8 / 255)
    decide = defended_decider(toy, params, SolverConfig(tol=0.0), steps=4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 4, 4, generator=g)
    with torch.no_grad():
        clean = decide(x)
    y = clean.argmax(1)  # every sample starts correct
    eps = 0.1  # large for 4x4 images with 5 classes: most samples break, not all
    queries: list[tuple[torch.Tensor, torch.Tensor]] = []

    def logged(v: torch.Tensor) -> torch.Tensor:
        out = decide(v)
        queries.append((v.detach().clone(), out.detach().clone()))
        return out

    x_adv, correct = square_attack(logged, x, y, eps=eps, queries=100)
    assert _in_ball(x_adv, x, eps)
    # Square moves to the ball's vertices: a fooling example uses the radius it was given
    radius = (x_adv - x).flatten(1).abs().amax(1)
    assert torch.equal((radius - eps).abs() < 1e-6, ~correct)  # robust ones: radius 0
    q_x = torch.cat([q for q, _ in queries])
    q_logits = torch.cat([lg for _, lg in queries])
    dist = (q_x[:, None] - x[None]).flatten(2).abs().amax(2)  # [queries, samples]
    owner = dist.argmin(1)
    assert bool((dist[torch.arange(len(owner)), owner] <= eps + 1e-6).all())
    assert int(((dist <= eps + 1e-6).sum(1) == 1).sum()) == len(owner)  # balls do not overlap
    q_margin = _margin(q_logits, y[owner])
    best = torch.stack([q_margin[owner == b].min() for b in range(len(y))])
    any_fooled = torch.stack([(q_logits[owner == b].argmax(1) != y[b]).any() for b in range(8)])
    assert bool((best < _margin(clean, y) - 1e-3).all())  # Square lowered every margin
    assert 0 < int(any_fooled.sum()) < 8  # both cases occur
    with torch.no_grad():
        final = decide(x_adv)
    assert torch.equal(correct, final.argmax(1) == y)
    assert torch.equal(correct, ~any_fooled)  # a fooling point is kept whenever one was found
    assert bool((_margin(final, y)[any_fooled] < 0).all())
    assert torch.equal(x_adv[correct], x[correct])
