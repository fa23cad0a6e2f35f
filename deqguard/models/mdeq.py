"""The MDEQ classifier: stem -> equilibrium cell f(z; x) -> classification head.

The three parts are separately callable so that solvers, the test-time defense and the attacks
compose them freely:

- ``injection = model.inject(x)``: x [B, 3, 32, 32] in [0, 1] -> an :class:`Injection`.
- ``model.cell(z, injection)``: f(z; x) on the *flat* state z [B, D], D = ``config.state_size``.
- ``model.head(z)``: logits [B, num_classes] from any flat state.

The flat state concatenates the branches' feature maps (finest first), each [B, C_i, H_i, W_i]
flattened in channels-last order (H, W, C); ``model.unflatten`` / ``model.flatten`` convert.
Channels-last because the unflattened views are then channels-last tensors without a copy, and
oneDNN's convolutions ran 1.2-2.6x faster in that layout on CPU than in NCHW at batch 16-32
(docs/BENCHMARKS.md, service notes); cuDNN prefers it too. Nothing outside this module depends
on the order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from deqguard.configs import ModelConfig, get_model_config
from deqguard.models.layers import (
    Bottleneck,
    BranchBlock,
    ToCoarser,
    ToFiner,
    conv1x1,
    conv3x3,
    variational_masks,
)

__all__ = ["Injection", "MDEQClassifier", "build_model"]


@dataclass
class Injection:
    """What f needs from the input: the stem features and this forward's dropout masks.

    Attributes:
        features: [B, C_0, H_0, W_0], injected into branch 0 only.
        masks: one [B, C_i, 1, 1] variational-dropout mask per branch, or None (eval / p = 0).
    """

    features: Tensor
    masks: list[Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    def select(self, index: Tensor) -> Injection:
        """The injection of a subset of samples (index: int64 [b])."""
        masks = None if self.masks is None else [m[index] for m in self.masks]
        return Injection(self.features[index], masks)

    def detach(self) -> Injection:
        masks = None if self.masks is None else [m.detach() for m in self.masks]
        return Injection(self.features.detach(), masks)


class MDEQClassifier(nn.Module):
    """Multiscale DEQ classifier (see module docstring for the composable API)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        chans = config.branch_channels
        c0 = chans[0]
        g = config.num_groups
        nb = config.num_branches

        self.stem = nn.Sequential(
            conv3x3(3, c0, stride=config.stem_stride),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
            conv3x3(c0, c0),
            nn.BatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        self.stem_inject: nn.Module = (
            nn.Sequential(conv1x1(c0, c0), nn.BatchNorm2d(c0), nn.ReLU(inplace=True))
            if nb > 2
            else nn.Identity()
        )

        self.blocks = nn.ModuleList(BranchBlock(c, config.block_expansion, g) for c in chans)
        self.fuse = nn.ModuleList()
        for i in range(nb):
            row = nn.ModuleList()
            for j in range(nb):
                if j > i:
                    row.append(ToFiner(chans[j], chans[i], j - i, g))
                elif j < i:
                    row.append(ToCoarser(chans[j], chans[i], i - j, g))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.post_fuse = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(inplace=True),
                torch.nn.utils.parametrizations.weight_norm(conv1x1(c, c)),
                nn.GroupNorm(g // 2, c, affine=False),
            )
            for c in chans
        )

        heads = config.head_channels
        exp = Bottleneck.expansion
        self.head_incre = nn.ModuleList(Bottleneck(c, h) for c, h in zip(chans, heads, strict=True))
        self.head_down = nn.ModuleList(
            nn.Sequential(
                conv3x3(heads[i] * exp, heads[i + 1] * exp, stride=2, bias=True),
                nn.BatchNorm2d(heads[i + 1] * exp),
                nn.ReLU(inplace=True),
            )
            for i in range(nb - 1)
        )
        self.head_final = nn.Sequential(
            nn.Conv2d(heads[-1] * exp, config.final_channels, kernel_size=1),
            nn.BatchNorm2d(config.final_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Linear(config.final_channels, config.num_classes)

        res = config.branch_resolutions
        self._shapes = [(c, r) for c, r in zip(chans, res, strict=True)]
        self._sizes = [c * r * r for c, r in self._shapes]

    # ----------------------------------------------------------------- state layout
    @property
    def state_size(self) -> int:
        return sum(self._sizes)

    def flatten(self, branches: list[Tensor]) -> Tensor:
        """List of [B, C_i, H_i, W_i] -> flat [B, D] (each branch in channels-last order)."""
        return torch.cat([b.permute(0, 2, 3, 1).flatten(1) for b in branches], dim=1)

    def unflatten(self, z: Tensor) -> list[Tensor]:
        """Flat [B, D] -> list of [B, C_i, H_i, W_i] in channels-last memory (views, no copy)."""
        parts = torch.split(z, self._sizes, dim=1)
        return [
            p.view(z.shape[0], r, r, c).permute(0, 3, 1, 2)
            for p, (c, r) in zip(parts, self._shapes, strict=True)
        ]

    def zero_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch, self.state_size, device=device, dtype=dtype)

    # ----------------------------------------------------------------- the three parts
    def inject(self, x: Tensor) -> Injection:
        """Stem features for x [B, 3, H, W] in [0, 1]; draws dropout masks in training mode."""
        x = x.contiguous(memory_format=torch.channels_last)  # see the module docstring
        feats = self.stem_inject(self.stem(x))
        masks = None
        if self.training and self.config.dropout > 0:
            masks = variational_masks(
                self._shapes, x.shape[0], self.config.dropout, x.device, feats.dtype
            )
        return Injection(feats, masks)

    def cell(self, z: Tensor, injection: Injection) -> Tensor:
        """f(z; x): flat [B, D] -> flat [B, D]. Per-sample: no statistic crosses the batch."""
        return self.cell_outer(z, self.cell_inner(z), injection)

    def cell_inner(self, z: Tensor) -> list[Tensor]:
        """The part of f that depends on z alone: each branch block's residual path
        [B, C_i, H_i, W_i] (most of f's MACs). Reusable while z is held fixed and only the
        input changes, as in the test-time defense's input updates."""
        return [blk.inner(b) for blk, b in zip(self.blocks, self.unflatten(z), strict=True)]

    def cell_outer(self, z: Tensor, inner: list[Tensor], injection: Injection) -> Tensor:
        """f(z; x) given ``inner = self.cell_inner(z)``: injection, norms, fusion."""
        return self.flatten(self.cell_outer_branches(z, inner, injection))

    def cell_outer_branches(
        self, z: Tensor, inner: list[Tensor], injection: Injection
    ) -> list[Tensor]:
        """``cell_outer`` before flattening: the branches [B, C_i, H_i, W_i] of f(z; x)."""
        branches = self.unflatten(z)
        masks = injection.masks
        outs = [
            blk.outer(
                h, b, injection.features if i == 0 else None, None if masks is None else masks[i]
            )
            for i, (blk, h, b) in enumerate(zip(self.blocks, inner, branches, strict=True))
        ]
        fused = []
        for i, row in enumerate(self.fuse):
            # outs[i] + sum_j layer(outs[j]), accumulated in place into the first new tensor
            # (a + b == b + a exactly, so the values are unchanged); outs[i] itself is never
            # written, other rows read it (with one branch post_fuse's ReLU may overwrite it:
            # nothing reads it afterwards)
            acc: Tensor | None = None
            for j, layer in enumerate(row):
                if j != i:
                    y = layer(outs[j])
                    acc = y.add_(outs[i]) if acc is None else acc.add_(y)
            fused.append(self.post_fuse[i](outs[i] if acc is None else acc))
        return fused

    def outer_head(self, z: Tensor, inner: list[Tensor], injection: Injection) -> Tensor:
        """``head(cell_outer(z, inner, injection))`` without the flat state in between (the
        test-time defense's input-gradient step: no concatenation, no copies, and their
        backward passes, for the same logits)."""
        return self.head_branches(self.cell_outer_branches(z, inner, injection))

    def head(self, z: Tensor) -> Tensor:
        """Logits [B, num_classes] from a flat state [B, D]."""
        # A branch view of a flat state has batch stride D, not C*H*W, so every conv would copy
        # it into a dense tensor; the first block has two convs on it (conv1, shortcut): copy
        # once here instead.
        return self.head_branches(
            [b.contiguous(memory_format=torch.channels_last) for b in self.unflatten(z)]
        )

    def head_branches(self, branches: list[Tensor]) -> Tensor:
        """Logits [B, num_classes] from the branches [B, C_i, H_i, W_i] of a state."""
        y = self.head_incre[0](branches[0])
        for i, down in enumerate(self.head_down):
            y = self.head_incre[i + 1](branches[i + 1]) + down(y)  # both are ReLU outputs
        y = self.head_final(y)
        # global average pool over (H, W) as a sum over the rows of an (H*W, C) view, then a
        # division of the [B, C] sums: for a channels-last y the view needs no copy, and the
        # sum's backward is a broadcast view of the [B, C] gradient, which the ReLU backward
        # before it reads in place (mean's backward wrote a full [B, H*W, C] tensor, and the
        # pooling op's backward left channels-last, which made that ReLU backward 4x slower)
        pooled = y.permute(0, 2, 3, 1).flatten(1, 2).sum(1).div_(y.shape[2] * y.shape[3])
        return self.classifier(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of x with the default solver (see :func:`deqguard.dynamics.deq_forward`)."""
        from deqguard.dynamics import deq_forward

        return deq_forward(self, x, record=False).logits


def build_model(config: ModelConfig | str, **overrides: object) -> MDEQClassifier:
    """Build an (untrained) MDEQ classifier from a config or a registered config name."""
    if isinstance(config, str):
        config = get_model_config(config, **overrides)
    elif overrides:
        config = config.with_overrides(**overrides)
    return MDEQClassifier(config)
