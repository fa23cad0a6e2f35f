"""HTTP service for deqguard: FastAPI app and device worker (imports deqguard, never the reverse)."""
