"""deqguard: adversarially robust deep equilibrium classifiers (core library, no web code)."""

__version__ = "0.1.0"
