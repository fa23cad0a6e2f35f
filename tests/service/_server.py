"""The service under test: a tiny model store and the command and environment that serve it."""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["TEST_MODEL", "build_test_store", "service_command", "service_env"]

TEST_MODEL = "test-micro"


def build_test_store(root: Path, name: str = TEST_MODEL) -> Path:
    """A model store with one ``micro`` entry: seeded random init, classifier scaled up so that
    predictions are confident enough for entropy changes to show (no training: fast)."""
    import torch

    from deqguard.models import build_model
    from deqguard.store import save_entry

    torch.manual_seed(0)
    model = build_model("micro").eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    save_entry(root, name, model, version="1", metrics={"note": "random init, tests only"})
    return root


def service_command() -> list[str]:
    return [sys.executable, "-m", "service.cli", "--port", "{port}"]


def service_env(store: Path, **extra: object) -> dict[str, str]:
    env = {
        "DEQGUARD_MODEL_STORE": str(store),
        "DEQGUARD_MODEL": TEST_MODEL,
        "DEQGUARD_HOST": "127.0.0.1",
        "DEQGUARD_LOG_LEVEL": "warning",
        "DEQGUARD_TORCH_THREADS": "2",
        # no request of ours should hit the default deadline on a busy CPU; tests that check
        # deadlines set their own
        "DEQGUARD_DEFAULT_DEADLINE_MS": "3600000",
    }
    env.update({f"DEQGUARD_{k.upper()}": str(v) for k, v in extra.items()})
    return env
