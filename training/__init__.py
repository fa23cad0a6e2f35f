"""Training loops and recipes for deqguard models (imports deqguard, never the reverse)."""
