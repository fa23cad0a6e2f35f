"""A/B of the audits' judge without the defense: ``defended_forward(...).logits`` (a head at
every state, for the per-step entropy) against ``served_logits`` (one head, at the served
state), on the served copy of ``micro-trades-ri@2``.

    python benchmarks/ab_served_logits.py [-n 128]

One thread, no autograd; pause other jobs (SIGSTOP). Prints the largest logit difference, whether
the decisions agree, and wall seconds (2 x 3 alternating repeats).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deqguard.cpu_memory import retain_freed_memory
from deqguard.data import load_test
from deqguard.defense import DefenseParams, defended_forward, served_logits
from deqguard.store import default_store_root, load_entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=128, help="first n test images (one batch)")
    args = p.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    entry = load_entry(default_store_root(), "micro-trades-ri@2", "cpu", inference=True)
    model, solver, off = entry.model, entry.manifest.solver, DefenseParams(R=0)
    x = load_test(n=args.n).float_images("cpu")
    runs = {
        "defended_forward": lambda: defended_forward(model, x, off, solver, steps=8).logits,
        "served_logits": lambda: served_logits(model, x, off, solver, steps=8),
    }
    with torch.no_grad():
        a, b = (f() for f in runs.values())
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(6):
            for k, f in runs.items():
                t = time.perf_counter()
                f()
                times[k].append(round(time.perf_counter() - t, 3))
    print(json.dumps({"n": args.n, "logit_max_abs_diff": float((a - b).abs().max()),
                      "decisions_agree": int((a.argmax(1) == b.argmax(1)).sum()),
                      "wall_s": times}))  # fmt: skip


if __name__ == "__main__":
    main()
