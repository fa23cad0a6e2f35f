"""MDEQ classifier modules."""

from deqguard.models.mdeq import Injection, MDEQClassifier, build_model

__all__ = ["Injection", "MDEQClassifier", "build_model"]
