"""HTTP routers: v1 (deqguard's own API), v2 (KServe Open Inference Protocol), health."""
