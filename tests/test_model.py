"""MDEQ classifier: sizes, state layout, per-sample independence of f, dropout semantics."""

from __future__ import annotations

import pytest
import torch

from deqguard.configs import ModelConfig, get_model_config, list_model_configs
from deqguard.models import build_model


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "expected"), [("tiny", 0.16e6), ("large", 11.1e6)])
def test_parameter_counts_match_the_published_sizes(name, expected):
    n = _count(build_model(name))
    assert abs(n - expected) / expected < 0.02, n


def test_micro_is_the_cpu_size():
    model = build_model("micro")
    assert model.config.branch_resolutions == (16, 8)
    assert 0.3e6 < _count(model) < 0.42e6
    assert set(list_model_configs()) >= {"micro", "tiny", "large", "xl"}


def test_bad_configs_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="head_channels"):
        ModelConfig(name="x", branch_channels=(16, 32), head_channels=(8,), final_channels=10)
    with pytest.raises(ValueError, match="num_groups"):
        ModelConfig(name="x", branch_channels=(12,), head_channels=(8,), final_channels=10)
    with pytest.raises(ValueError, match="unknown model config"):
        get_model_config("huge")


def test_flatten_unflatten_round_trip():
    model = build_model("tiny")
    z = torch.randn(3, model.state_size)
    parts = model.unflatten(z)
    assert [tuple(p.shape) for p in parts] == [(3, 24, 32, 32), (3, 24, 16, 16)]
    assert torch.equal(model.flatten(parts), z)


def test_cell_is_per_sample_so_subsets_give_the_same_rows():
    torch.manual_seed(0)
    model = build_model("micro").eval()
    x = torch.rand(5, 3, 32, 32)
    z = torch.randn(5, model.state_size)
    with torch.no_grad():
        inj = model.inject(x)
        full = model.cell(z, inj)
        idx = torch.tensor([3, 1])
        sub = model.cell(z[idx], inj.select(idx))
    torch.testing.assert_close(sub, full[idx], atol=1e-5, rtol=1e-5)


def test_variational_dropout_is_fixed_within_a_forward_and_off_in_eval():
    torch.manual_seed(0)
    model = build_model("micro", dropout=0.3).train()
    x = torch.rand(4, 3, 32, 32)
    z = torch.randn(4, model.state_size)
    inj = model.inject(x)
    assert inj.masks is not None and inj.masks[0].shape == (4, 32, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.cell(z, inj), model.cell(z, inj))
        other = model.cell(z, model.inject(x))  # a new forward draws new masks
    assert not torch.allclose(other, model.cell(z, inj))
    model.eval()
    assert model.inject(x).masks is None


def test_head_takes_any_state():
    model = build_model("micro").eval()
    with torch.no_grad():
        logits = model.head(torch.randn(7, model.state_size))
    assert logits.shape == (7, 10)
