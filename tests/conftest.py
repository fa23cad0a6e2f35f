"""The suite mirrors the packages: ``tests/core`` (deqguard), ``tests/training``,
``tests/service`` (and ``tests/service/admin``), each with its own fixtures; shared helpers are
``tests/_live.py`` (the one live-server helper), ``tests/_toys.py`` and
``tests/_virtual_time.py``."""

import os

# The service serves gRPC on a fixed port (8001) by default: the suite starts many apps and
# servers, some at once, so it binds none unless a test asks for one (on a free port).
os.environ["DEQGUARD_GRPC_PORT"] = "0"
