"""Keep freed CPU memory inside the process, so that a forward's tensors do not page-fault.

Why: glibc's malloc serves large blocks with ``mmap`` and returns them with ``munmap`` when they
are freed (and trims the top of its heap); the next forward allocates the same sizes again and
the kernel zero-fills every page on first touch. On the served defended path (``tiny``, batch
64, one thread) that was 100k-350k minor page faults and 10-20% of the CPU time of every
forward (``python benchmarks/probe_f.py alloc``). With ``mmap`` off and a high trim threshold the
process keeps its peak heap and reuses it, as PyTorch's caching allocator does on a GPU; the
cost is that memory freed after a peak is not given back to the OS. Nothing numerical changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_MAX = 2**31 - 1  # mallopt takes an int


@functools.cache
def retain_freed_memory() -> bool:
    """Ask glibc to keep freed memory (no ``mmap`` for large blocks, trim only above 2 GiB).

    Process-wide and idempotent. Returns True when applied, False where the C library is not
    glibc (macOS, musl, Windows), which then keeps its own policy.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_MAX))
