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
