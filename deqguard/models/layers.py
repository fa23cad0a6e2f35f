"""Building blocks of the MDEQ classifier (Bai et al. 2020), written for deqguard.

Inside f only per-sample normalisation (GroupNorm) is used, so f of one sample never depends on
the others: the solver may evaluate f on any subset of a batch and get the same numbers.

ReLUs and residual additions run in place on tensors the block just created (never on its
inputs or on a tensor another caller holds, such as ``inner``): on the CPU, writing a fresh
output costs 2-4x an in-place pass over the same data (``benchmarks/probe_f.py inplace``), and
none of the overwritten tensors is needed by autograd (GroupNorm, BatchNorm and convolutions
save their inputs, ReLU its output). The values are the same bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=bias)


class BranchBlock(nn.Module):
    """Residual block of one branch: widen, GN, ReLU, narrow, dropout, + injection, GN, + residual.

    ``forward(z, injection, mask)``: z [B, C, H, W]; injection broadcastable to z or None;
    mask [B, C, 1, 1] (variational dropout, already scaled) or None.
    """

    def __init__(self, channels: int, expansion: int, num_groups: int) -> None:
        super().__init__()
        wide = channels * expansion
        self.conv1 = weight_norm(conv3x3(channels, wide))
        self.gn1 = nn.GroupNorm(num_groups, wide)
        self.conv2 = weight_norm(conv3x3(wide, channels))
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)

    def forward(self, z: Tensor, injection: Tensor | None, mask: Tensor | None) -> Tensor:
        return self.outer(self.inner(z), z, injection, mask)

    def inner(self, z: Tensor) -> Tensor:
        """The residual path up to the second conv: depends on z alone (not on the input), so
        it can be reused while z is held and only the injection changes."""
        return self.conv2(self.gn1(self.conv1(z)).relu_())

    def outer(
        self, inner: Tensor, z: Tensor, injection: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        """The rest of the block given ``inner = self.inner(z)``."""
        out = inner
        if mask is not None:
            out = out * mask
        if injection is not None:
            out = out + injection if out is inner else out.add_(injection)
        out = self.gn2(out).add_(z)
        return self.gn3(out.relu_())


class ToFiner(nn.Module):
    """Coarse branch -> finer branch: 1x1 conv, GN, nearest upsampling by 2**levels."""

    def __init__(self, cin: int, cout: int, levels: int, num_groups: int) -> None:
        super().__init__()
        self.conv = conv1x1(cin, cout)
        self.gn = nn.GroupNorm(num_groups, cout)
        self.scale = 2**levels

    def forward(self, z: Tensor) -> Tensor:
        return F.interpolate(self.gn(self.conv(z)), scale_factor=self.scale, mode="nearest")


class ToCoarser(nn.Module):
    """Fine branch -> coarser branch: a chain of stride-2 3x3 convs with GN (ReLU in between)."""

    def __init__(self, cin: int, cout: int, levels: int, num_groups: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(levels):
            last = k == levels - 1
            width = cout if last else cin
            layers += [conv3x3(cin, width, stride=2), nn.GroupNorm(num_groups, width)]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


class Bottleneck(nn.Module):
    """Head bottleneck (expansion 4), BatchNorm without affine as in MDEQ's head."""

    expansion = 4

    def __init__(self, cin: int, planes: int) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes, affine=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, affine=False)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout, affine=False)
        self.shortcut: nn.Module = (
            nn.Sequential(conv1x1(cin, cout), nn.BatchNorm2d(cout))
            if cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu_()
        out = self.bn2(self.conv2(out)).relu_()
        out = self.bn3(self.conv3(out))
        return out.add_(self.shortcut(x)).relu_()


def variational_masks(
    shapes: list[tuple[int, int]], batch: int, p: float, device: torch.device, dtype: torch.dtype
) -> list[Tensor]:
    """One Bernoulli(1 - p) / (1 - p) mask per (sample, channel) for every branch: [B, C, 1, 1].

    Drawn once per forward so that every iteration of the solver sees the same f.
    """
    return [
        torch.empty(batch, c, 1, 1, device=device, dtype=dtype).bernoulli_(1 - p) / (1 - p)
        for c, _ in shapes
    ]
