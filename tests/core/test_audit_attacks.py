"""The attacks the audit suites rely on: PGD's best iterate and restarts, the straight-through
surrogate of the served prediction, APGD-T where CE is misleading (toy models, fast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deqguard.attacks import (
    DefendedSurrogate,
    IntermediateSpec,
    PGDConfig,
    ServedSurrogate,
    apgd_attack,
    pgd_attack,
)
from deqguard.defense import DefenseParams, defended_forward
from tests._toys import MisleadingImageDEQ, mean_half_images

EPS = 8 / 255


def _shift(x: torch.Tensor) -> torch.Tensor:
    """s = mean(x) - 0.5 per image [B]."""
    return x.mean(dim=(1, 2, 3)) - 0.5


def _rising(x: torch.Tensor) -> torch.Tensor:
    """Logits whose CE (label 0) always rises with s: PGD moves every pixel up by a step."""
    s = _shift(x)
    return torch.stack([torch.zeros_like(s), 50 * s], dim=1)


def _rising_grad_falling_loss(x: torch.Tensor) -> torch.Tensor:
    """Straight-through: the gradient of _rising, the value of its mirror image (CE falls with
    s), so each PGD step lowers the loss and the fooling iterate is not the highest-loss one."""
    u = _rising(x)
    return u + (-u - u).detach()


def _band(x: torch.Tensor) -> torch.Tensor:
    """Wrong (class 1) only while 3/255 < s < 5/255."""
    s = _shift(x)
    inside = ((s > 3 / 255) & (s < 5 / 255)).float()
    return torch.stack([torch.zeros_like(s), 2 * inside - 1], dim=1)


def test_pgd_keeps_the_first_fooling_iterate() -> None:
    """The path crosses the band at step 2 (s = 4/255) and ends outside it (s = 8/255): the
    image counts as fooled and the example returned is the fooling iterate."""
    x, y = mean_half_images(2), torch.zeros(2, dtype=torch.long)
    cfg = PGDConfig(eps=EPS, steps=10, step_size=2 / 255, random_start=False)
    for surrogate in (_rising, _rising_grad_falling_loss):
        res = pgd_attack(surrogate, x, y, cfg, decider=_band)
        assert not bool(res.correct.any())
        assert bool((_band(res.x_adv).argmax(1) == 1).all())  # the returned example fools
        torch.testing.assert_close(_shift(res.x_adv), torch.full((2,), 4 / 255), atol=1e-5, rtol=0)
        torch.testing.assert_close(res.logits, _band(res.x_adv))
        assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6
    # The paper's protocol judges the last iterate only, which this path leaves unfooled.
    last = pgd_attack(_rising, x, y, PGDConfig(**{**cfg.to_dict(), "every_iterate": False}),
                      decider=_band)  # fmt: skip
    assert bool(last.correct.all())
    torch.testing.assert_close(_shift(last.x_adv), torch.full((2,), 8 / 255), atol=1e-5, rtol=0)


def test_pgd_restarts_attack_only_the_images_still_robust() -> None:
    """Image 0 (marked by one bright pixel) is wrong wherever it goes, image 1 never: the later
    steps and restarts run on image 1 alone, and image 0 keeps its random start (the first
    iterate judged, which fooled)."""
    x, y = mean_half_images(2), torch.zeros(2, dtype=torch.long)
    x[0, 0, 0, 0] = 0.95
    sizes: list[int] = []
    starts: list[torch.Tensor] = []

    def surrogate(v: torch.Tensor) -> torch.Tensor:
        sizes.append(v.shape[0])
        if len(sizes) == 1:
            starts.append(v[0].clone())
        return _rising(v)

    def judge(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(v.shape[0], 2)
        out[:, 1] = torch.where(v[:, 0, 0, 0] > 0.8, 1.0, -1.0)
        return out

    cfg = PGDConfig(eps=EPS, steps=3, restarts=3)
    gen = torch.Generator().manual_seed(0)
    res = pgd_attack(surrogate, x, y, cfg, decider=judge, generator=gen)
    assert res.correct.tolist() == [False, True]
    assert sizes[0] == 2 and all(n == 1 for n in sizes[1:])
    assert len(sizes) == 3 * 4  # 3 restarts x (3 steps + the last iterate)
    torch.testing.assert_close(res.x_adv[0], starts[0])  # its fooling start point
    assert float((res.x_adv - x).abs().max()) <= EPS + 1e-6


def test_served_surrogate_has_the_served_value_and_the_unrolled_gradient(model) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g), torch.tensor([1, 2])
    params = DefenseParams(R=2, Tf=2)
    served = ServedSurrogate(model, params, steps=4, grad="exact", ka=2)
    ref = DefendedSurrogate(model, params, IntermediateSpec(4, 2, 0.5), steps=4, grad="exact")
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, sur = served(xa), ref(xb)
    torch.testing.assert_close(out, defended_forward(model, x, params, steps=4).logits)
    (ga,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xa)
    # straight-through: the gradient is the unrolled surrogate's, weighted by CE's derivative at
    # the served value (softmax(value) - onehot(y))
    w = (out.softmax(1) - F.one_hot(y, out.shape[1])).detach()
    (gb,) = torch.autograd.grad((w * sur).sum(), xb)
    torch.testing.assert_close(ga, gb)
    assert float(ga.abs().sum()) > 0
    undefended = ServedSurrogate(model, DefenseParams(R=0), steps=4, ka=2)
    torch.testing.assert_close(
        undefended(x), defended_forward(model, x, DefenseParams(R=0), steps=4).logits
    )


def test_apgd_t_breaks_what_ce_attacks_cannot_and_leaves_the_global_rng() -> None:
    model = MisleadingImageDEQ().eval()
    served = ServedSurrogate(model, DefenseParams(R=0), steps=4, ka=2)
    x, y = mean_half_images(4), torch.zeros(4, dtype=torch.long)
    state = torch.random.get_rng_state()
    x_ce, ok_ce = apgd_attack(served, x, y, loss="ce", n_iter=20, seed=1)
    x_t, ok_t = apgd_attack(served, x, y, loss="targeted", n_iter=20, n_target_classes=3, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert bool(ok_ce.all()) and not bool(ok_t.any())
    pgd = pgd_attack(
        served, x, y, PGDConfig(restarts=3), generator=torch.Generator().manual_seed(0)
    )
    assert bool(pgd.correct.all())  # PGD-10 with restarts misses them too
    for xa in (x_ce, x_t):
        assert float((xa - x).abs().max()) <= EPS + 1e-6
    # only two target classes: capped at classes - 1, never an error
    with pytest.raises(ValueError, match="loss"):
        apgd_attack(served, x, y, loss="nope")  # type: ignore[arg-type]
