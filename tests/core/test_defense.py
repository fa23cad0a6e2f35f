"""Test-time defense: parameters, Algorithm 1's guarantees, per-sample batching, R = 0 equivalence."""

from __future__ import annotations

import copy

import pytest
import torch

from deqguard.defense import (
    PRESETS,
    DefenseParams,
    defended_forward,
    get_preset,
)
from deqguard.dynamics import deq_forward


@pytest.fixture(scope="module")
def images():
    from deqguard.data import DatasetError, load_test

    try:
        return load_test(n=8).float_images()
    except DatasetError:
        pytest.skip("CIFAR-10 not available")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("beta", -1.0),
        ("R", -1),
        ("R", 1.5),
        ("Tf", 0),
        ("eps", -0.1),
        ("state", 0),
        ("beta", float("nan")),
    ],
)
def test_params_validated_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        DefenseParams(**{field: value})


def test_presets() -> None:
    assert set(PRESETS) >= {"off", "paper", "fast", "strong"}
    assert get_preset("off").R == 0
    paper = get_preset("paper")
    assert (paper.Tf, paper.R, paper.beta, paper.eps) == (2, 10, 2 / 255, 8 / 255)
    strong = get_preset("strong")
    assert (strong.Tf, strong.R) == (1, 20)
    with pytest.raises(ValueError, match="unknown defense preset"):
        get_preset("nope")
    with pytest.raises(ValueError, match="unknown"):
        DefenseParams.from_dict({"R": 1, "tf": 2})


def test_r0_equals_undefended_forward(model, images) -> None:
    d = deq_forward(model, images)
    r = defended_forward(model, images, get_preset("off"))
    assert torch.equal(r.logits, d.logits)
    assert torch.equal(r.step_entropy, d.step_entropy)
    assert torch.equal(r.nfe, d.nfe)
    assert int(r.grad_steps.sum()) == 0 and not bool(r.acted.any())
    assert torch.equal(r.x_final, images)


def test_entropy_reduction_lowers_entropy_and_stays_in_ball(model, images) -> None:
    eps = 8 / 255
    off = defended_forward(model, images, get_preset("off"))
    on = defended_forward(model, images, get_preset("paper"))
    # Lower mean entropy at every state after the first intervention, and at z[N].
    assert float(on.step_entropy[-1].mean()) < float(off.step_entropy[-1].mean())
    assert bool((on.step_entropy[2:].mean(1) < off.step_entropy[2:].mean(1)).all())
    assert float((on.x_final - images).abs().max()) <= eps + 1e-6
    assert float(on.x_final.min()) >= 0.0 and float(on.x_final.max()) <= 1.0
    # Interventions after steps 2, 4, 6 and 8 (Algorithm 1: the last step included), R = 10 each.
    assert on.acted.any(dim=1).nonzero().squeeze(1).tolist() == [1, 3, 5, 7]
    assert on.grad_steps.tolist() == [40] * len(images)
    assert bool(torch.isfinite(on.post_entropy[on.acted]).all())
    assert bool(torch.isnan(on.post_entropy[~on.acted]).all())
    # Two evaluations per intervention (f at z[t-1] under x[t], the redone step) on top of the
    # undefended 1 + N (nobody converges at tol 1e-3 on this untrained model).
    assert off.nfe.tolist() == [1 + 8] * len(images)
    assert on.nfe.tolist() == (off.nfe + 2 * 4).tolist()


def test_mixed_batch_matches_each_sample_alone(model, images) -> None:
    mix = [
        DefenseParams(R=3, Tf=2),
        get_preset("off"),
        DefenseParams(R=2, Tf=3, beta=1 / 255, eps=4 / 255, state=3),
        DefenseParams(R=1, Tf=1, state=2),
    ]
    # float64: sign gradients amplify float32 batch-size-dependent rounding into flipped pixels.
    m64 = copy.deepcopy(model).double()
    x = images[:4].double()
    batched = defended_forward(m64, x, mix, steps=4)
    for i, p in enumerate(mix):
        alone = defended_forward(m64, x[i : i + 1], p, steps=4)
        torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-6, rtol=1e-6)
        assert batched.state_index[i] == alone.state_index[0]
        assert batched.nfe[i] == alone.nfe[0]
        assert batched.grad_steps[i] == alone.grad_steps[0]
        assert torch.equal(batched.acted[:, i], alone.acted[:, 0])
        torch.testing.assert_close(batched.x_final[i], alone.x_final[0], atol=1e-9, rtol=0)
    assert batched.grad_steps.tolist() == [6, 0, 2, 4]  # N = 4: steps {2, 4}, -, {3}, {1..4}
    assert batched.state_index.tolist() == [4, 4, 3, 2]


def test_r0_samples_pay_nothing(model, images) -> None:
    x = images[:4]
    mix = [get_preset("off"), DefenseParams(R=2, Tf=2), get_preset("off"), DefenseParams(R=1, Tf=1)]
    r = defended_forward(model, x, mix)
    off = deq_forward(model, x)
    assert r.grad_steps[[0, 2]].tolist() == [0, 0]
    assert r.nfe[[0, 2]].tolist() == off.nfe[[0, 2]].tolist()
    torch.testing.assert_close(r.logits[[0, 2]], off.logits[[0, 2]], atol=1e-4, rtol=1e-4)
    assert torch.equal(r.x_final[[0, 2]], x[[0, 2]])


def test_bad_inputs(model, images) -> None:
    with pytest.raises(ValueError, match="state"):
        defended_forward(model, images[:1], DefenseParams(state=9), steps=8)
    with pytest.raises(ValueError, match="DefenseParams"):
        defended_forward(model, images[:2], [get_preset("off")])


def test_entropy_descent_matches_a_plain_reference(model, images) -> None:
    """Eq. 8 written out naively (full f each step) equals the batched one that reuses the
    z-only part of f, per sample R and all."""
    from deqguard.defense import entropy_descent
    from deqguard.dynamics import prediction_entropy

    m64 = copy.deepcopy(model).double()
    x0 = images[:3].double()
    z = deq_forward(m64, x0, steps=3).state
    beta = torch.tensor([2 / 255, 1 / 255, 3 / 255], dtype=torch.float64)
    eps = torch.tensor([8 / 255, 2 / 255, 4 / 255], dtype=torch.float64)
    R = torch.tensor([3, 1, 2])
    got = entropy_descent(m64, z, x0, x0, beta, eps, R)
    for b in range(3):
        x = x0[b : b + 1].clone()
        for _ in range(int(R[b])):
            x.requires_grad_(True)
            h = prediction_entropy(m64.head(m64.cell(z[b : b + 1], m64.inject(x)))).sum()
            (g,) = torch.autograd.grad(h, x)
            with torch.no_grad():
                x = x - beta[b] * g.sign()
                x = torch.minimum(torch.maximum(x, x0[b : b + 1] - eps[b]), x0[b : b + 1] + eps[b])
                x = x.clamp(0, 1)
        torch.testing.assert_close(got[b : b + 1], x, atol=1e-12, rtol=0)


def test_resolve_defense_is_the_one_resolution_and_names_the_field() -> None:
    """Preset plus overrides under limits; each refusal names its field (what the service's
    422 and the admin's audit validation report)."""
    from deqguard.defense import (
        PRESETS,
        DefenseLimits,
        DefenseParamError,
        Preset,
        resolve_defense,
    )

    assert resolve_defense("paper") == PRESETS[Preset.PAPER]
    got = resolve_defense(Preset.FAST, {"R": 2, "state": 3})
    assert (got.R, got.Tf, got.state, got.beta) == (2, 4, 3, PRESETS["fast"].beta)
    limits = DefenseLimits(steps=8, max_R=50, unit_box=True)
    cases = [
        (("nope", {}, None), "preset"),
        (("off", {"bogus": 1}, None), "bogus"),
        (("off", {"R": -1}, None), "R"),
        (("off", {"R": 51}, limits), "R"),
        (("off", {"state": 9}, limits), "state"),
        (("off", {"Tf": 9}, limits), "Tf"),
        (("off", {"eps": 1.5}, limits), "eps"),
        (("off", {"beta": float("nan")}, limits), "beta"),
    ]
    for (preset, overrides, lim), field in cases:
        with pytest.raises(DefenseParamError) as err:
            resolve_defense(preset, overrides, lim)
        assert err.value.field == field and field in str(err.value), (overrides, err.value)
    assert resolve_defense("off", {"eps": 1.5}).eps == 1.5  # no unit box asked for
    # an audit's defense as written: a preset name as it is, or fields on an optional base
    from deqguard.defense import defense_from_spec

    assert defense_from_spec("paper") == "paper"
    assert defense_from_spec({"preset": "paper", "R": 2}) == resolve_defense("paper", {"R": 2})
    assert defense_from_spec({"R": 2}) == resolve_defense("off", {"R": 2})


def test_should_stop_changes_nothing_until_it_stops_the_forward(model, images) -> None:
    """``should_stop`` is checked before every f-evaluation and input-gradient step: never true,
    the result is the same bit for bit; true after k checks, the forward raises DefenseStopped
    at that step (the server stops a batch at shutdown with it)."""
    from deqguard.defense import DefenseStopped

    x = images[:2]
    params = [DefenseParams(R=3, Tf=2), get_preset("off")]
    plain = defended_forward(model, x, params, steps=4)
    calls: list[int] = []

    def never() -> bool:
        calls.append(1)
        return False

    checked = defended_forward(model, x, params, steps=4, should_stop=never)
    for name in ("logits", "nfe", "grad_steps", "x_final", "step_entropy", "final_residual"):
        assert torch.equal(getattr(checked, name), getattr(plain, name)), name
    total = len(calls)
    # 1 + 4 solver steps + 2 interventions x (3 gradient steps + 2 f-evaluations)
    assert total == 1 + 4 + 2 * (3 + 2)
    for k in (0, 3, total - 1):
        seen: list[int] = []

        def after_k(k: int = k, seen: list[int] = seen) -> bool:
            seen.append(1)
            return len(seen) > k

        with pytest.raises(DefenseStopped):
            defended_forward(model, x, params, steps=4, should_stop=after_k)
        assert len(seen) == k + 1  # stopped at the first check that said so


@pytest.mark.parametrize("state", [None, 3])
@pytest.mark.parametrize("tol", [0.0, "median"])
def test_served_logits_are_the_defended_forwards(model, state, tol) -> None:
    """The attacks' judge skips the per-step heads without the defense; the logits may change
    by float rounding only (with an early state, and with rows frozen part-way by the
    tolerance): the same iterates, the head on fewer rows."""
    from deqguard.configs import SolverConfig
    from deqguard.defense import served_logits

    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    if tol == "median":  # half the rows freeze before step 6
        with torch.no_grad():
            res = deq_forward(model, x, SolverConfig(max_steps=4, tol=0.0)).residuals
        assert res is not None
        tol = float(res[-1].median())
    solver = SolverConfig(max_steps=6, tol=tol)
    for params in (DefenseParams(R=0, state=state), DefenseParams(R=2, Tf=3, state=state)):
        with torch.no_grad():
            want = defended_forward(model, x, params, solver, steps=6).logits
            got = served_logits(model, x, params, solver, steps=6)
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (params, (got - want).abs().max())
        assert torch.equal(got.argmax(1), want.argmax(1))
        if params.active:
            assert torch.equal(got, want)  # defended_forward itself
