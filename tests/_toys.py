"""Small deterministic fixed-point problems for solver and gradient tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deqguard.models.mdeq import Injection


def linear_contraction(
    batch: int, dim: int, scale: float = 0.6, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """A [dim, dim] with spectral norm ``scale`` (< 1) and offsets b [batch, dim]."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=dtype)
    a = a / torch.linalg.matrix_norm(a, ord=2) * scale
    b = torch.randn(batch, dim, generator=g, dtype=dtype)
    return a, b


class ToyCell(nn.Module):
    """f(z; x) = s * tanh(W z + U x): a contraction for s * ||W|| < 1, with an MDEQ-like API."""

    def __init__(self, dim: int = 12, in_dim: int = 6, s: float = 0.7, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(dim, dim, generator=g)
        self.w = nn.Parameter(w / torch.linalg.matrix_norm(w, ord=2))
        self.u = nn.Parameter(torch.randn(dim, in_dim, generator=g))
        self.readout = nn.Parameter(torch.randn(3, dim, generator=g))
        self.s = s
        self.dim = dim

    def inject(self, x: Tensor) -> Injection:
        return Injection(x @ self.u.T)

    def cell(self, z: Tensor, injection: Injection) -> Tensor:
        return self.s * torch.tanh(z @ self.w.T + injection.features)

    def head(self, z: Tensor) -> Tensor:
        return z @ self.readout.T

    def zero_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch, self.dim, device=device, dtype=dtype)


class ToyClassifier(ToyCell):
    """ToyCell with the classifier API the test-time defense uses: images [B, 1, 1, in_dim] in
    [0, 1], and f split into a z-only part (``cell_inner``) and the rest (``cell_outer``)."""

    def inject(self, x: Tensor) -> Injection:
        return Injection(x.flatten(1) @ self.u.T)

    def cell_inner(self, z: Tensor) -> list[Tensor]:
        return [z @ self.w.T]

    def cell_outer(self, z: Tensor, inner: list[Tensor], injection: Injection) -> Tensor:
        return self.s * torch.tanh(inner[0] + injection.features)

    def cell(self, z: Tensor, injection: Injection) -> Tensor:
        return self.cell_outer(z, self.cell_inner(z), injection)


class MisleadingImageDEQ(nn.Module):
    """A tiny image DEQ (MDEQ API: inject, cell, cell_inner/cell_outer, head) on which the CE
    gradient points away from the only wrong class reachable within eps.

    With s = mean(x) - 0.5 carried by the fixed point z* = s (f(z; x) = z / 2 + s / 2 in every
    coordinate), the logits are [0, b1 + alpha s, b2 - beta s, -10, ...] (10 classes). Class 0
    wins on images with mean 0.5; class 1 is out of reach within eps (b1 + alpha eps < 0) but
    dominates the softmax, so the CE gradient raises s; class 2 wins at s = -eps
    (b2 + beta eps > 0). PGD and APGD on CE therefore never fool it at eps, while APGD-T with
    class 2 among its targets (the third highest score) does, and so does any attack at a radius
    where class 1 becomes reachable (4 eps).
    """

    def __init__(self, eps: float = 8 / 255, dim: int = 4) -> None:
        super().__init__()
        self.alpha, self.beta = 0.3 / eps, 3.0 / eps
        self.b1, self.b2 = -0.35, -2.9
        self.dim = dim
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so .eval() etc. behave

    def inject(self, x: Tensor) -> Injection:
        s = x.mean(dim=(1, 2, 3)) - 0.5
        return Injection((s / 2)[:, None].expand(-1, self.dim) + 0 * self.anchor)

    def cell_inner(self, z: Tensor) -> list[Tensor]:
        return [z / 2]

    def cell_outer(self, z: Tensor, inner: list[Tensor], injection: Injection) -> Tensor:
        return inner[0] + injection.features

    def cell(self, z: Tensor, injection: Injection) -> Tensor:
        return self.cell_outer(z, self.cell_inner(z), injection)

    def head(self, z: Tensor) -> Tensor:
        s = z.mean(dim=1)
        rest = torch.full((z.shape[0], 7), -10.0, dtype=z.dtype, device=z.device)
        cols = [torch.zeros_like(s), self.b1 + self.alpha * s, self.b2 - self.beta * s]
        return torch.cat([torch.stack(cols, dim=1), rest], dim=1)

    def zero_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
        return torch.zeros(batch, self.dim, device=device, dtype=dtype)


def mean_half_images(n: int, seed: int = 0) -> Tensor:
    """n images [n, 3, 32, 32] in [0.4, 0.6] with mean 0.5 (MisleadingImageDEQ's class 0)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.1 * (2 * torch.rand(n, 3, 32, 32, generator=g) - 1)
    x = x - x.mean(dim=(1, 2, 3), keepdim=True) + 0.5
    return x.clamp(0.4, 0.6)
