"""deqguard.cpu_memory: with it, repeated forwards reuse pages instead of page-faulting new ones.

Each case runs in a fresh interpreter: the allocator policy is process-wide, and the default
policy is what the comparison needs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys, torch
from deqguard.cpu_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
torch.set_num_threads(1)
def step():
    # a forward's pattern: temporaries of the same sizes, written and freed; 40 MiB is above
    # the largest block glibc's default ever serves from its heap (32 MiB), like the Broyden
    # memory of a batch ([64, 8, 30720] floats: 63 MiB)
    a = torch.empty(2 << 20).fill_(1.0)  # 8 MiB
    b = torch.empty(10 << 20).fill_(2.0)  # 40 MiB
    c = a.sum() + b.sum()
    del a, b
    return c
faults = []
for _ in range(20):
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _run(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retained_memory_stops_page_faults_of_repeated_allocations() -> None:
    default, retained = _run("default"), _run("retain")
    assert retained["applied"] is True
    pages = (48 << 20) // 4096  # what one step touches
    # glibc's default returns the large blocks: every step faults its pages in again
    assert min(default["faults"][-6:]) > pages // 2
    # retained: after warm-up the steps reuse the heap. Not every step: on a loaded machine one
    # step in a while was seen to fault one block in again (2026-12-03: 10240 pages once in the
    # last 6, the rest 0), so the claim is about most steps, which a no-op still fails
    late = retained["faults"][-10:]
    assert sum(f >= pages // 20 for f in late) <= 2, late


def test_retain_is_idempotent() -> None:
    from deqguard.cpu_memory import retain_freed_memory

    assert retain_freed_memory() == retain_freed_memory()
