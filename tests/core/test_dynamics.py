"""deq_forward: typed result, entropy (Eq. 6), early states."""

from __future__ import annotations

import math

import pytest
import torch

from deqguard.configs import SolverConfig
from deqguard.dynamics import deq_forward, prediction_entropy
from deqguard.models import build_model


@pytest.fixture(scope="module")
def model_and_x():
    torch.manual_seed(0)
    return build_model("micro").eval(), torch.rand(4, 3, 32, 32)


def test_entropy_is_eq6():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]])
    h = prediction_entropy(logits)
    assert h[0].item() == pytest.approx(math.log(4))
    p = torch.softmax(logits[1], 0)
    assert h[1].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)


def test_forward_result_shapes_and_defaults(model_and_x):
    model, x = model_and_x
    r = deq_forward(model, x, SolverConfig(max_steps=6, tol=0))
    assert r.logits.shape == (4, 10)
    assert r.step_logits.shape == (6, 4, 10) and r.step_entropy.shape == (6, 4)
    assert r.residuals.shape == (6, 4) and len(r.trajectory) == 6
    assert (r.state_index == 6).all()  # default: the last raw iterate z[N]
    torch.testing.assert_close(r.state, r.trajectory.states[-1])
    with torch.no_grad():
        torch.testing.assert_close(r.logits, model.head(r.state), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r.step_entropy, prediction_entropy(r.step_logits))
    assert (r.nfe == 7).all()


def test_per_sample_early_state(model_and_x):
    model, x = model_and_x
    idx = torch.tensor([1, 3, 6, 2])
    full = deq_forward(model, x, SolverConfig(max_steps=6, tol=0))
    r = deq_forward(model, x, SolverConfig(max_steps=6, tol=0), state_index=idx, record=False)
    for b in range(4):
        torch.testing.assert_close(r.state[b], full.trajectory.states[idx[b] - 1][b])
        torch.testing.assert_close(r.logits[b], full.step_logits[idx[b] - 1, b])
    best = deq_forward(model, x, SolverConfig(max_steps=6, tol=0), state_index=-1)
    torch.testing.assert_close(best.state, best.best_state)


def test_bad_state_index_is_refused(model_and_x):
    model, x = model_and_x
    with pytest.raises(ValueError, match="state_index"):
        deq_forward(model, x, state_index=9)


def test_bf16_autocast_keeps_float32_state_and_agrees(model_and_x):
    model, x = model_and_x
    ref = deq_forward(model, x, SolverConfig(max_steps=4, tol=0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = deq_forward(model, x, SolverConfig(max_steps=4, tol=0))
    assert r.state.dtype == torch.float32 and torch.isfinite(r.state).all()
    cos = torch.nn.functional.cosine_similarity(r.state, ref.state, dim=1)
    assert (cos > 0.95).all(), cos
