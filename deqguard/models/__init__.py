"""MDEQ classifier modules."""

from deqguard.models.inference import is_inference_only, prepare_for_inference
from deqguard.models.mdeq import Injection, MDEQClassifier, build_model

__all__ = [
    "Injection",
    "MDEQClassifier",
    "build_model",
    "is_inference_only",
    "prepare_for_inference",
]
