"""How an audit shares the device: a gate every f-evaluation of its model passes first.

An audit running beside online traffic (the service's admin audits) hands :class:`AuditRunner`
a :class:`DeviceGate`; :func:`gate_model` routes the audited model copy's f-evaluations, forward
and backward, through ``gate.acquire``, which may wait (to yield the device) or raise
:class:`~deqguard.audit.engine.AuditCancelled` (to stop mid-batch). ``release`` says that the
audit does no device work until its next ``acquire``. The core knows nothing of what the gate
waits for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

__all__ = ["DeviceGate", "gate_model"]


class DeviceGate(Protocol):
    """Shares the device between an audit and other work."""

    def acquire(self) -> None:
        """Before each f-evaluation and each batch: may block; raises to stop the audit."""

    def release(self) -> None:
        """After each batch (and when the audit ends): no device work until ``acquire``."""


class _GateInBackward(torch.autograd.Function):
    """Identity whose backward passes the gate first, so that the backward passes of attacks
    and of the defense also yield one f-evaluation at a time."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, gate: Callable[[], None]) -> torch.Tensor:  # type: ignore[override]
        ctx.gate = gate
        return z.view_as(z)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.gate()
        return grad, None


def _gate_backward(t: Any, gate: Callable[[], None]) -> Any:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        return _GateInBackward.apply(t, gate)
    return t


def gate_model(model: torch.nn.Module, gate: Callable[[], None]) -> None:
    """Route this model object's f-evaluations (and their backward) through ``gate``: the
    parts of f that callers use directly (``cell_inner``/``cell_outer``, which ``cell``
    composes), or ``cell`` itself on models without them. Only this instance changes."""
    parts = [n for n in ("cell_inner", "cell_outer") if hasattr(model, n)] or ["cell"]
    for name in parts:
        fn = getattr(model, name)

        def gated(*args: Any, _fn: Callable[..., Any] = fn, **kwargs: Any) -> Any:
            gate()
            out = _fn(*args, **kwargs)
            if not torch.is_grad_enabled():
                return out
            if isinstance(out, torch.Tensor):
                return _gate_backward(out, gate)
            if isinstance(out, list | tuple):  # cell_inner: one tensor per branch
                return type(out)(_gate_backward(t, gate) for t in out)
            return out

        setattr(model, name, gated)  # this instance only
