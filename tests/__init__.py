"""deqguard test suite."""
