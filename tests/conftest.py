"""The suite mirrors the packages: ``tests/core`` (deqguard), ``tests/training``,
``tests/service`` (and ``tests/service/admin``), each with its own fixtures; shared helpers are
``tests/_live.py`` (the one live-server helper), ``tests/_toys.py`` and
``tests/_virtual_time.py``."""

import os

# The service serves gRPC on a fixed port (8001) by default: the suite starts many apps and
# servers, some at once, so it binds none unless a test asks for one (on a free port).
os.environ["DEQGUARD_GRPC_PORT"] = "0"

# One intra-op thread per process unless DEQGUARD_TEST_THREADS says otherwise. CI runs on
# whatever 2-core machine a session had, idle or busy: beside another multi-threaded process a
# 2-thread OpenMP team spin-waits on a core it does not get, and a test that takes 3 s alone
# took 64 s in a suite run beside two training processes. Subprocesses (CLI runs, servers)
# inherit the same setting. No test asserts a speed, so this changes only how long they take.
_threads = os.environ.get("DEQGUARD_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _threads)
os.environ.setdefault("MKL_NUM_THREADS", _threads)

import torch  # noqa: E402

torch.set_num_threads(int(_threads))
