"""MDEQ classifier: sizes, state layout, f against a hand-written reference, per-sample
independence of f, dropout semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deqguard.configs import ModelConfig, get_model_config, list_model_configs
from deqguard.models import build_model
from deqguard.models.mdeq import Injection


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


def _wn_weight(conv: torch.nn.Module) -> torch.Tensor:
    """Weight normalisation by hand: g * v / ||v|| with the norm over all but the output dim."""
    g = conv.parametrizations.weight.original0
    v = conv.parametrizations.weight.original1
    return g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)


def _group_norm(x: torch.Tensor, gn: torch.nn.GroupNorm) -> torch.Tensor:
    """GroupNorm by hand (biased variance, per sample and group), with gn's affine if any."""
    b, c = x.shape[:2]
    xg = x.reshape(b, gn.num_groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + gn.eps)).reshape_as(x)
    if gn.affine:
        y = y * gn.weight.view(1, c, 1, 1) + gn.bias.view(1, c, 1, 1)
    return y


def _reference_cell(
    model: torch.nn.Module,
    z: torch.Tensor,
    features: torch.Tensor,
    masks: list[torch.Tensor] | None,
) -> torch.Tensor:
    """f(z; x) of a two-branch MDEQ written out from the documented layers (layers.py, mdeq.py),
    without calling any of the model's forward methods: an independent reference for ``cell``."""
    cfg = model.config
    assert cfg.num_branches == 2
    (c0, c1), (r0, r1) = cfg.branch_channels, cfg.branch_resolutions
    n0 = c0 * r0 * r0
    # flat state: each branch channels-last (H, W, C), finest first
    branches = [
        z[:, :n0].reshape(-1, r0, r0, c0).permute(0, 3, 1, 2),
        z[:, n0:].reshape(-1, r1, r1, c1).permute(0, 3, 1, 2),
    ]
    outs = []
    for i, (blk, b) in enumerate(zip(model.blocks, branches)):
        h = F.conv2d(b, _wn_weight(blk.conv1), padding=1)
        h = F.conv2d(F.relu(_group_norm(h, blk.gn1)), _wn_weight(blk.conv2), padding=1)
        if masks is not None:
            h = h * masks[i]
        if i == 0:
            h = h + features
        outs.append(_group_norm(F.relu(_group_norm(h, blk.gn2) + b), blk.gn3))
    to_fine, to_coarse = model.fuse[0][1], model.fuse[1][0]
    up = _group_norm(F.conv2d(outs[1], to_fine.conv.weight), to_fine.gn)
    up = up.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest, factor 2
    down = _group_norm(
        F.conv2d(outs[0], to_coarse.body[0].weight, stride=2, padding=1), to_coarse.body[1]
    )
    fused = []
    for acc, post in zip((outs[0] + up, outs[1] + down), model.post_fuse):
        conv, gn = post[1], post[2]
        fused.append(_group_norm(F.conv2d(F.relu(acc), _wn_weight(conv)), gn))
    return torch.cat([f.permute(0, 2, 3, 1).reshape(f.shape[0], -1) for f in fused], dim=1)


def test_cell_matches_a_hand_written_composition_of_the_layers():
    """Eval mode (no masks): ``cell`` is exactly the documented composition, in float64."""
    torch.manual_seed(0)
    model = build_model("micro").eval().double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    z = torch.randn(3, model.state_size, dtype=torch.float64)
    with torch.no_grad():
        inj = model.inject(x)
        assert inj.masks is None
        got = model.cell(z, inj)
        ref = _reference_cell(model, z, inj.features, None)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_variational_dropout_uses_the_forwards_masks_and_is_off_in_eval():
    """Training mode: f applies exactly the masks drawn by ``inject`` (Bernoulli(1 - p) / (1 - p)
    per sample and channel), so every f call of one forward sees the same f; a new forward draws
    new masks; eval mode draws none."""
    torch.manual_seed(0)
    p = 0.3
    model = build_model("micro", dropout=p).train().double()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    z = torch.randn(4, model.state_size, dtype=torch.float64)
    inj = model.inject(x)
    assert inj.masks is not None
    assert [tuple(m.shape) for m in inj.masks] == [(4, 32, 1, 1), (4, 64, 1, 1)]
    values = torch.cat([m.flatten() for m in inj.masks])
    scaled = torch.tensor(1 / (1 - p), dtype=torch.float64)
    assert bool(((values == 0) | torch.isclose(values, scaled)).all())
    assert bool((values == 0).any()) and bool((values != 0).any())
    with torch.no_grad():
        got = model.cell(z, inj)
        torch.testing.assert_close(
            got, _reference_cell(model, z, inj.features, inj.masks), atol=1e-10, rtol=1e-10
        )
        torch.testing.assert_close(model.cell(z, inj), got, atol=0, rtol=0)  # same masks, same f
        unmasked = model.cell(z, Injection(inj.features, None))
        other = model.cell(z, model.inject(x))  # a new forward draws new masks
    assert (got - unmasked).abs().max() > 1e-3  # the masks do act
    assert (got - other).abs().max() > 1e-3
    model.eval()
    assert model.inject(x).masks is None


def test_head_takes_any_state():
    model = build_model("micro").eval()
    with torch.no_grad():
        logits = model.head(torch.randn(7, model.state_size))
    assert logits.shape == (7, 10)


@pytest.mark.parametrize("name", ["micro", "large"])
def test_outer_head_is_head_of_cell_outer_bit_for_bit(name):
    """The defense's input-gradient step skips the flat state between f and the head
    (``outer_head``): the same logits and the same input gradient, bit for bit, and the head's
    pooling is the mean over (H, W)."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.rand(3, 3, 32, 32)
    z = torch.randn(3, model.state_size)
    with torch.no_grad():
        inner = model.cell_inner(z)

    def grad_of(fn):
        xi = x.clone().requires_grad_(True)
        logits = fn(Injection(model.inject(xi).features))
        (g,) = torch.autograd.grad(logits.square().sum(), xi)
        return logits.detach(), g

    fused, g_fused = grad_of(lambda inj: model.outer_head(z, inner, inj))
    flat, g_flat = grad_of(lambda inj: model.head(model.cell_outer(z, inner, inj)))
    assert torch.equal(fused, flat)
    assert torch.equal(g_fused, g_flat)
    with torch.no_grad():
        branches = model.unflatten(model.cell_outer(z, inner, Injection(model.inject(x).features)))
        y = model.head_incre[0](branches[0])
        for i, down in enumerate(model.head_down):
            y = model.head_incre[i + 1](branches[i + 1]) + down(y)
        mean_pooled = model.classifier(model.head_final(y).mean(dim=(2, 3)))
    torch.testing.assert_close(flat, mean_pooled, atol=1e-5, rtol=1e-5)
