"""Core fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model():
    """An untrained micro model with a sharpened classifier, so entropies are far from log 10
    and attacks have decisions to flip (shared by the defense, attack and audit tests)."""
    import torch

    from deqguard.models import build_model

    torch.manual_seed(0)
    m = build_model("micro").eval()
    with torch.no_grad():
        m.classifier.weight.mul_(30)
    return m
