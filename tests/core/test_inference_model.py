"""The serving model: BatchNorm folded, weight norm baked in, channels-last state, chunked head.

Each of these is a speed change that must not change the numbers; these tests hold them to it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deqguard import dynamics
from deqguard.data import load_test
from deqguard.defense import defended_forward, get_preset
from deqguard.models import build_model, is_inference_only, prepare_for_inference
from deqguard.store import default_store_root, load_entry


def _model_with_real_batchnorm_statistics() -> nn.Module:
    """An untrained micro model whose BatchNorm layers are far from identity maps, so that a
    wrong fold (or none) shows in the outputs."""
    torch.manual_seed(0)
    model = build_model("micro")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_folded_model_computes_the_same_function():
    model = _model_with_real_batchnorm_statistics()
    folded = prepare_for_inference(model)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = defended_forward(model, x, get_preset("off"))
    out = defended_forward(folded, x, get_preset("off"))
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.step_entropy, ref.step_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.final_residual, ref.final_residual, atol=1e-5, rtol=1e-3)


def test_folded_shipped_model_defends_real_images_the_same():
    """With the defense on, the update is a sign of a gradient, so float-rounding differences
    flip a few pixels' steps (+-beta): logits agree closely, not bit for bit; decisions agree."""
    entry = load_entry(default_store_root(), "micro-trades-ri")
    folded = prepare_for_inference(entry.model)
    x = load_test(n=32).float_images("cpu")
    params = get_preset("paper")
    ref = defended_forward(entry.model, x, params, entry.manifest.solver)
    out = defended_forward(folded, x, params, entry.manifest.solver)
    assert torch.equal(out.grad_steps, ref.grad_steps) and int(ref.grad_steps.sum()) > 0
    assert (out.logits.argmax(1) == ref.logits.argmax(1)).float().mean() >= 31 / 32
    assert (out.logits - ref.logits).abs().max() < 0.05


def test_folded_model_has_no_batchnorm_or_parametrization_and_refuses_training():
    model = _model_with_real_batchnorm_statistics()
    folded = prepare_for_inference(model)
    assert is_inference_only(folded) and not is_inference_only(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert not any(parametrize.is_parametrized(m) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())
    with pytest.raises(RuntimeError, match="cannot be trained"):
        folded.train()
    folded.eval()  # still allowed
    assert not folded.training


def test_the_original_model_is_untouched_and_still_trains():
    """Regression: copying a weight-normed module and removing the parametrization from the copy
    deleted the original's weight too (the generated class is shared)."""
    model = _model_with_real_batchnorm_statistics()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_for_inference(model)
    assert all(parametrize.is_parametrized(b.conv1) for b in model.blocks)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    z = torch.randn(2, model.state_size)
    model.cell(z, model.inject(torch.rand(2, 3, 32, 32))).sum().backward()
    assert model.blocks[0].conv1.parametrizations.weight.original0.grad is not None


def test_state_layout_is_channels_last_views():
    model = build_model("micro")
    z = torch.randn(3, model.state_size)
    parts = model.unflatten(z)
    assert [tuple(p.shape) for p in parts] == [(3, 32, 16, 16), (3, 64, 8, 8)]
    for p in parts:
        assert p.stride(1) == 1  # channels are the fastest-moving dimension
        assert p.data_ptr() >= z.data_ptr()  # views into z, not copies
    assert torch.equal(model.flatten(parts), z)
    # the layout is (H, W, C) within each branch: element (b, c, h, w) of branch 0
    c, h, w = 5, 2, 3
    assert parts[0][1, c, h, w] == z[1, (h * 16 + w) * 32 + c]


def test_head_on_states_in_chunks_equals_one_call(monkeypatch):
    model = _model_with_real_batchnorm_statistics()
    states = torch.randn(4, 5, model.state_size)
    with torch.no_grad():
        whole = model.head(states.reshape(20, -1)).view(4, 5, -1)
        monkeypatch.setattr(dynamics, "HEAD_CHUNK_ROWS", 3)
        chunked = dynamics.head_on_states(model, states)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
