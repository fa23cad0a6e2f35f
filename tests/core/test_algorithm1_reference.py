"""``defended_forward`` against a deliberately plain Algorithm 1 (the paper's pseudo-code).

The reference below runs one sample at a time with Python loops and shares nothing with
``deqguard.defense``: only the model and the solver's single step (``init`` / ``advance`` by one,
and ``retarget`` to put a changed f into a copied solver state). Algorithm 1, 0-based as printed:

    z[0] = 0, x[0] = x
    for t = 0..N-1:
        z[t+1] = Solve(z = f(z; x[t]); z[<=t])                       (line 4)
        x[t+1] = x[t]
        if (t + 1) mod Tf = 0:
            x_0 = x[t]; R times: x_i = Proj(x_{i-1} - beta sign grad_x H(f(z[t+1]; x_{i-1})))
            x[t+1] = x_R
            z[t+1] = Solve(z = f(z; x[t+1]); z[<=t])                 (line 13)

"Solve(...; z[<=t])" is one solver step from the solver's state after step t: the reference keeps
a deep copy of that state and, at line 13, steps from the copy under the new input. Compared:
the input sequence x[1..N], the states z[1..N], the prediction, and the cost counters (nfe
counted by wrapping f, not from the solver's bookkeeping).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from deqguard.configs import SolverConfig
from deqguard.defense import DefenseParams, defended_forward
from deqguard.models.mdeq import Injection
from deqguard.solvers import make_solver
from tests._toys import ToyClassifier


@dataclass
class Reference:
    inputs: list[Tensor]  # x[1..N], each [1, ...]
    jacs: list[Tensor]  # d x[t] / d x elementwise (autograd through the clips), each [1, ...]
    states: list[Tensor]  # z[1..N], each [1, D]
    post: list[float | None]  # Eq. 8 objective after the R updates, at interventions
    logits: Tensor  # [1, C]
    nfe: int
    grad_steps: int
    acted: list[bool]


def _entropy(logits: Tensor) -> Tensor:
    p = torch.softmax(logits, dim=-1)
    return -(p * torch.log(p)).sum()


def algorithm1(
    model: nn.Module, x: Tensor, p: DefenseParams, cfg: SolverConfig, n: int
) -> Reference:
    """Algorithm 1 for one sample x [1, ...], step by step."""
    solver = make_solver(cfg)
    calls = [0]

    def f_of(x_t: Tensor):
        inj: Injection = model.inject(x_t)

        def fn(z: Tensor, index: Tensor | None) -> Tensor:
            calls[0] += z.shape[0]
            return model.cell(z, inj)

        return fn

    x0 = x.clone().requires_grad_(True)  # x[t] keeps a graph to x0 (the sign steps have none)
    x_t = x0
    with torch.no_grad():
        st = solver.init(f_of(x_t.detach()), model.zero_state(1, x.device, x.dtype))
    inputs, jacs, states, post, acted = [], [], [], [], []
    grad_steps = 0
    for t in range(n):
        before = copy.deepcopy(st)  # the solver's state holding z[<=t]
        with torch.no_grad():
            st = solver.advance(f_of(x_t.detach()), st, 1)  # line 4
        x_next = x_t
        intervene = (t + 1) % p.Tf == 0 and p.R > 0
        if intervene:
            z_held = st.z
            xi = x_t
            for _ in range(p.R):  # lines 9-11, Eq. 8
                xd = xi.detach().requires_grad_(True)
                h = _entropy(model.head(model.cell(z_held, model.inject(xd))))
                (g,) = torch.autograd.grad(h, xd)
                xi = xi - p.beta * g.sign()
                xi = torch.minimum(torch.maximum(xi, x0 - p.eps), x0 + p.eps)
                xi = xi.clamp(0.0, 1.0)
                grad_steps += 1
            x_next = xi  # line 12
            xn = x_next.detach()
            with torch.no_grad():
                post.append(float(_entropy(model.head(model.cell(z_held, model.inject(xn))))))
                # line 13: one step from z[<=t] under x[t+1]
                st = solver.retarget(f_of(xn), before, reset_memory=False)
                st = solver.advance(f_of(xn), st, 1)
        else:
            post.append(None)
        acted.append(intervene)
        x_t = x_next
        inputs.append(x_t.detach())
        # elementwise ops only: the gradient of the sum is the diagonal of d x[t] / d x
        (jac,) = torch.autograd.grad(x_t.sum(), x0, retain_graph=True)
        jacs.append(jac)
        states.append(st.z)
    k = n if p.state is None else p.state
    with torch.no_grad():
        logits = model.head(states[k - 1])
    return Reference(inputs, jacs, states, post, logits, calls[0], grad_steps, acted)


def _say(what: str):
    """assert_close's message with what was compared appended."""
    return lambda msg: f"{what}: {msg}"


def _compare(model: nn.Module, x: Tensor, params: list[DefenseParams], cfg: SolverConfig, n: int):
    got = defended_forward(model, x, params, make_solver(cfg), steps=n, trace=True)
    assert got.trace is not None
    tol = {"atol": 1e-10, "rtol": 1e-10}
    for b, p in enumerate(params):
        ref = algorithm1(model, x[b : b + 1], p, cfg, n)
        where = f"sample {b} ({p})"
        for t in range(n):  # the dynamics first: the most telling message on a mismatch
            torch.testing.assert_close(
                got.trace.inputs[t][b : b + 1],
                ref.inputs[t],
                **tol,
                msg=_say(f"x[{t + 1}], {where}"),
            )
            torch.testing.assert_close(
                got.trace.states[t, b : b + 1],
                ref.states[t],
                **tol,
                msg=_say(f"z[{t + 1}], {where}"),
            )
        for t in range(n):  # the derivative adaptive attacks use (``exact``)
            torch.testing.assert_close(
                got.trace.jac[t][b : b + 1], ref.jacs[t], atol=0, rtol=0, msg=_say(f"J[{t + 1}]")
            )
        torch.testing.assert_close(
            got.logits[b : b + 1], ref.logits, **tol, msg=_say(f"prediction, {where}")
        )
        torch.testing.assert_close(got.x_final[b : b + 1], ref.inputs[-1], **tol, msg=_say(where))
        assert got.acted[:, b].tolist() == ref.acted, where
        for t in range(n):
            if ref.post[t] is None:
                assert torch.isnan(got.post_entropy[t, b]), where
            else:
                assert float(got.post_entropy[t, b]) == pytest.approx(ref.post[t], rel=1e-5)
        assert int(got.nfe[b]) == ref.nfe, f"nfe, {where}"
        assert int(got.grad_steps[b]) == ref.grad_steps, f"grad_steps, {where}"
    return got


PAPER = DefenseParams(beta=2 / 255, R=10, Tf=2, eps=8 / 255)
TOY_SETTINGS = {
    "paper": [PAPER] * 3,
    "Tf1": [DefenseParams(beta=3 / 255, R=4, Tf=1, eps=8 / 255)] * 3,
    "TfN": [DefenseParams(beta=4 / 255, R=5, Tf=8, eps=16 / 255)] * 3,
    "R0": [DefenseParams(R=0)] * 3,
    "projection-binds": [DefenseParams(beta=4 / 255, R=6, Tf=2, eps=1 / 255)] * 3,
    "mixed": [
        PAPER,
        DefenseParams(R=0),
        DefenseParams(beta=1 / 255, R=3, Tf=3, eps=2 / 255, state=6),
        DefenseParams(beta=3 / 255, R=2, Tf=1, eps=8 / 255, state=8),
        DefenseParams(beta=4 / 255, R=7, Tf=8, eps=0.5 / 255),
        DefenseParams(beta=2 / 255, R=1, Tf=4, eps=8 / 255, state=4),
    ],
}


@pytest.fixture(scope="module")
def toy() -> ToyClassifier:
    return ToyClassifier(dim=12, in_dim=6, s=0.9, seed=3).double().eval()


def _toy_images(batch: int) -> Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.rand(batch, 1, 1, 6, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("setting", sorted(TOY_SETTINGS))
@pytest.mark.parametrize(
    "cfg",
    [
        SolverConfig(name="broyden", tol=0.0),
        SolverConfig(name="broyden", tol=1e-3),  # samples freeze, interventions un-freeze them
        SolverConfig(name="broyden", tol=0.0, memory=3),  # the secant buffer wraps
        SolverConfig(name="anderson", tol=0.0, memory=3),
        SolverConfig(name="picard", tol=0.0),
    ],
    ids=["broyden", "broyden-freeze", "broyden-m3", "anderson", "picard"],
)
def test_toy_matches_algorithm1(toy, setting: str, cfg: SolverConfig) -> None:
    params = TOY_SETTINGS[setting]
    x = _toy_images(len(params))
    got = _compare(toy, x, params, cfg, 8)
    if setting == "projection-binds":  # the eps-ball, not the step count, limits the change
        assert float((got.x_final - x).abs().max()) == pytest.approx(1 / 255, abs=1e-12)


def test_toy_freezing_is_exercised(toy) -> None:
    """The tol = 1e-3 runs above do freeze samples, and the intervention at N un-freezes them."""
    x = _toy_images(3)
    cfg = SolverConfig(name="broyden", tol=1e-3)
    plain = defended_forward(toy, x, DefenseParams(R=0), make_solver(cfg), steps=8)
    assert int(plain.nfe.max()) < 9  # every sample stopped paying before step 8
    params = TOY_SETTINGS["TfN"][0]
    on = defended_forward(toy, x, params, make_solver(cfg), steps=8, trace=True)
    assert on.trace is not None
    s = on.trace.states
    assert torch.equal(s[6], s[5])  # frozen at steps 6 and 7
    assert bool((s[7] != s[6]).any(dim=1).all())  # z[8] redone under x[8]: every sample moved
    assert on.nfe.tolist() == (plain.nfe + 2).tolist()  # f at z[7] under x[8], then the step


def test_paper_setting_intervenes_at_2_4_6_8(toy) -> None:
    x = _toy_images(2)
    got = defended_forward(toy, x, PAPER, make_solver(SolverConfig(tol=0.0)), steps=8)
    assert got.acted.any(dim=1).nonzero().squeeze(1).add(1).tolist() == [2, 4, 6, 8]
    assert got.grad_steps.tolist() == [40, 40]
    assert got.nfe.tolist() == [1 + 8 + 2 * 4] * 2


MICRO_SETTINGS = {
    "paper": [PAPER] * 2,
    "Tf1": [DefenseParams(beta=2 / 255, R=2, Tf=1, eps=8 / 255)] * 2,
    "TfN-projection-binds": [DefenseParams(beta=2 / 255, R=3, Tf=4, eps=0.5 / 255)] * 2,
    "mixed": [
        DefenseParams(beta=2 / 255, R=3, Tf=2, eps=8 / 255),
        DefenseParams(R=0),
        DefenseParams(beta=1 / 255, R=2, Tf=3, eps=1 / 255, state=3),
        DefenseParams(beta=2 / 255, R=1, Tf=1, eps=8 / 255, state=2),
    ],
}


@pytest.fixture(scope="module")
def micro64(model):
    return copy.deepcopy(model).double().eval()


@pytest.mark.parametrize("setting", sorted(MICRO_SETTINGS))
def test_micro_matches_algorithm1(micro64, setting: str) -> None:
    params = MICRO_SETTINGS[setting]
    n = 4 if setting != "paper" else 8
    g = torch.Generator().manual_seed(11)
    x = torch.rand(len(params), 3, 32, 32, generator=g, dtype=torch.float64)
    got = _compare(micro64, x, params, SolverConfig(name="broyden", tol=1e-3), n)
    if setting == "TfN-projection-binds":
        assert float((got.x_final - x).abs().max()) == pytest.approx(0.5 / 255, abs=1e-12)
