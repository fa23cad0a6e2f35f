"""One image's answer as the device computed it, before any protocol shapes it (v1 JSON, v2
tensors): the worker fills it, the routes read it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ImageOutput"]


@dataclass
class ImageOutput:
    """One image's answer, as plain numpy/python values ready for any protocol."""

    probabilities: np.ndarray  # [C] float32
    class_index: int
    entropy: float  # of the returned prediction (nats), as the core computes it
    step_entropy: np.ndarray  # [N] float32
    acted: np.ndarray  # [N] bool
    post_entropy: np.ndarray  # [N] float32, NaN where the defense did not act
    state_index: int
    final_residual: float
    nfe: int
    grad_steps: int
